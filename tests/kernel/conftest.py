"""Fixtures for kernel tests: a fresh simulated ISP per test, torn down whatever happens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.lab.topo import Lab


@contextmanager
def running_lab(tmp_path, request, **kw) -> Iterator[Lab]:
    lab = Lab(tmp_path, **kw)
    failed = False
    try:
        lab.up()
        yield lab
    except BaseException:
        failed = True  # inside a test's `with`: pytest has not reported the failure yet
        raise
    finally:
        if failed or getattr(request.node, "rep_call_failed", False):
            for log in sorted(tmp_path.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        lab.down()


@pytest.fixture
def lab(tmp_path, request):
    with running_lab(tmp_path, request) as lab:
        yield lab


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call" and rep.failed:
        item.rep_call_failed = True
    return rep
