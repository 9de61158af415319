"""Where kernel tests run.

Tests under tests/kernel/ need ip6tnl, ppp and friends. When this kernel can create an ip6tnl (a
user's Debian box, as root) they run here, in-process. Otherwise (the build machines and CI) they
run in lab VM boots, and each shows up here as a proxy item carrying the outcome it had inside. A
kernel test that is skipped in the VM, or that the VM never ran, fails: a missing lab is a
failure, never a pass.

A TCG VM keeps about one core busy, so the boots run two at a time (this machine has two cores),
each with one virtual CPU (more vCPUs than cores stall a guest's spinlocks), from the start of the
session: one queue boots the systemd VM and then half the plain tests (PLAIN_SPLIT, by file), the
other the rest of the plain tests. The host tests run meanwhile, before the proxies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from functools import cache
from pathlib import Path

import pytest

INSIDE_LAB = os.environ.get("MAPE_LAB_INSIDE") == "1"
IN_LAB_SYSTEMD = os.environ.get("MAPE_LAB_SYSTEMD") == "1"
ROOT = Path(__file__).resolve().parent.parent


@cache
def host_kernel_lacks() -> str | None:
    """Why this kernel cannot run the kernel tests, or None when it can."""
    if os.geteuid() != 0:
        return "not root"
    ns = f"mape-probe-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        r = subprocess.run(
            ["ip", "-n", ns, "link", "add", "p0", "type", "ip6tnl", "mode", "ipip6", "local", "::1", "remote", "::2"],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            return f"no ip6tnl ({r.stderr.strip()})"
        if subprocess.run(["modprobe", "-q", "ppp_generic"]).returncode:
            return "no ppp"
        return None
    except (OSError, subprocess.CalledProcessError) as e:
        return f"cannot probe: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# Files of plain kernel tests that boot their own (second) VM: about half the plain tests' time.
PLAIN_SPLIT = frozenset(
    {"test_daemon.py", "test_daemon_supervision.py", "test_nat_behaviour.py", "test_metrics_lab.py"}
)


def needs_systemd(item) -> bool:
    return "systemd" in item.path.relative_to(ROOT).parts


def pytest_itemcollected(item):
    if "kernel" in item.path.relative_to(ROOT).parts:
        item.add_marker(pytest.mark.kernel)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: a VM boots only for the tests selected
def pytest_collection_modifyitems(config, items):
    if INSIDE_LAB:
        return
    # Service tests install a package and drive systemd: always in a VM with systemd as PID 1.
    systemd = [i for i in items if i.get_closest_marker("kernel") and needs_systemd(i)]
    plain = [i for i in items if i.get_closest_marker("kernel") and not needs_systemd(i)]
    if plain and host_kernel_lacks() is None:
        plain = []  # this kernel can: run them here, in-process
    runners = {}
    queues = [
        [([i for i in systemd], True), ([i for i in plain if i.path.name in PLAIN_SPLIT], False)],
        [([i for i in plain if i.path.name not in PLAIN_SPLIT], False)],
    ]
    for q, queue in enumerate(queues):
        runs = []
        for n, (group, with_systemd) in enumerate(queue):
            if group:
                runs.append(LabRun(config, [i.nodeid for i in group], systemd=with_systemd, name=f"lab{q}{n}"))
                runners.update(dict.fromkeys(group, runs[-1]))
        if runs:
            threading.Thread(target=lambda runs=runs: [r.run_here() for r in runs], daemon=True).start()
    # Host tests first, while the VMs boot: the main thread only waits on a proxy's VM when it gets to it.
    items[:] = [i for i in items if i not in runners] + [
        LabProxy.from_parent(i.parent, name=i.name, runner=runners[i]) for i in items if i in runners
    ]


class LabRun:
    """One VM boot running its kernel tests in the background; results shared by the proxies."""

    def __init__(self, config, nodeids: list[str], systemd: bool = False, name: str = "lab"):
        self.config, self.nodeids, self.systemd, self.name = config, nodeids, systemd, name
        self.results: dict[str, dict] = {}
        self.error = ""
        self.lines: list[str] = []  # its output, shown by the main thread while it waits
        self.shown = 0
        self.done = threading.Event()

    def run_here(self) -> None:
        """Boot and run (in a queue's thread); never raises: a broken lab fails its tests."""
        try:
            self.results = self._run()
        except Exception as e:
            self.error = f"the lab run failed: {type(e).__name__}: {e}"
        finally:
            self.done.set()

    def get(self) -> dict[str, dict]:
        """Wait for the run, showing its output meanwhile (from this, the main, thread: the
        capture manager is not for other threads)."""
        capman = self.config.pluginmanager.getplugin("capturemanager")
        tw = self.config.get_terminal_writer()
        while True:
            finished = self.done.is_set()
            new, self.shown = self.lines[self.shown :], len(self.lines)
            if new:
                with capman.global_and_fixture_disabled():
                    tw.write("".join(new))
                    tw.flush()
            if finished:
                return self.results
            self.done.wait(1)

    def _run(self) -> dict[str, dict]:
        from tests.lab import vm

        vm.CACHE.mkdir(exist_ok=True)
        report = vm.CACHE / f"report-{uuid.uuid4().hex[:8]}.json"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.lab.report",
            "-q",
            "--color=no",
            "--durations=12",  # the slowest, for balancing the queues
            *self.nodeids,
        ]

        at_line_start = [True]

        def echo(text: str) -> None:
            """VM output arrives in pieces, not lines: prefix the run's name where a line begins."""
            out = []
            for piece in text.splitlines(keepends=True):
                if at_line_start[0]:
                    out.append(f"{self.name}| ")
                out.append(piece)
                at_line_start[0] = piece.endswith("\n")
            self.lines.append("".join(out))

        if self.systemd:
            echo("building the Debian package for the service tests (packaging/build-deb.sh)\n")
            # No package index after set-up: the wheels come from bootstrap's wheelhouse, and an
            # index that cannot be reached shows it (a registry outage cannot fail the tests).
            offline = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
                       "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}  # fmt: skip
            deb = subprocess.run([str(ROOT / "packaging" / "build-deb.sh")], capture_output=True, text=True,
                                 env=offline)  # fmt: skip
            if deb.returncode:
                self.error = f"building the Debian package failed:\n{deb.stdout}{deb.stderr}"
                return {}
        mode = "with systemd as PID 1" if self.systemd else f"(this kernel: {host_kernel_lacks()})"
        echo(f"booting the lab VM for {len(self.nodeids)} kernel test(s) {mode}\n")
        try:
            result = vm.run(cmd, timeout=2400, echo=echo, env={"MAPE_LAB_REPORT": str(report)}, systemd=self.systemd,
                            cpus=1)  # two boots at a time on two cores  # fmt: skip
        except vm.LabError as e:
            self.error = f"the lab VM could not start: {e}"
            return {}
        try:
            results = json.loads(report.read_text())
        except (OSError, ValueError):
            results = {}
        finally:
            report.unlink(missing_ok=True)
        if result.status not in (0, 1) or not results:
            tail = "".join(result.output.splitlines(keepends=True)[-40:])
            self.error = f"the lab VM run ended with status {result.status}:\n{tail}"
        return results


class LabProxy(pytest.Item):
    def __init__(self, *, runner: LabRun, **kw):
        super().__init__(**kw)
        self.runner = runner
        self.add_marker(pytest.mark.kernel)

    def runtest(self) -> None:
        outcome = self.runner.get().get(self.nodeid)
        if outcome is None:
            raise LabFailure(f"{self.nodeid} did not run in the lab VM. {self.runner.error}")
        if outcome["outcome"] == "skipped":
            raise LabFailure(f"kernel test skipped in the lab (a lab gap, not a pass): {outcome['text']}")
        if outcome["outcome"] != "passed":
            raise LabFailure(outcome["text"])

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, LabFailure):
            return f"[in the lab VM]\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.name} [lab VM]"


class LabFailure(Exception):
    pass
