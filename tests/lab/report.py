"""pytest plugin for the run inside the lab VM: writes each test's outcome to $MAPE_LAB_REPORT as
JSON ({nodeid: {outcome, text}}), which the host's proxy items turn back into results."""

from __future__ import annotations

import json
import os

_results: dict[str, dict] = {}


def pytest_runtest_logreport(report) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "text": ""})
    if report.failed:
        entry["outcome"] = "failed"
        entry["text"] += f"[{report.when}] {report.longreprtext}\n"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["text"] = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)


def pytest_sessionfinish(session) -> None:
    path = os.environ.get("MAPE_LAB_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_results, f)
