"""One `mape-daemon run` in the lab router's namespace: its log, its state, its own first sync."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .netns import popen
from .topo import wait_for


class Daemon:
    """One `mape-daemon run` in the router's namespace, its log and its state folder."""

    def __init__(self, lab, tmp_path: Path, config: str, env: dict[str, str] | None = None):
        self.lab, self.dir = lab, tmp_path
        self.cfg = tmp_path / "mape.toml"
        self.cfg.write_text(config)
        self.log = tmp_path / "daemon.log"
        self.env = {**os.environ, "MAPE_STATE_DIR": str(tmp_path / "run"), "MAPE_LIB_DIR": str(tmp_path / "lib"),
                    **(env or {})}  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self, **env: str) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = popen(self.lab.ce, sys.executable, "-m", "mape_daemon", "run", "-c", str(self.cfg),
                              stdout=log, stderr=subprocess.STDOUT, env={**self.env, **env})  # fmt: skip
        return self

    def state(self) -> dict:
        try:
            return json.loads((self.dir / "run" / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_state(self, key: str, want, timeout: float = 30) -> None:
        """The state file says `key` is `want`: it is written after the sync's log lines."""
        try:
            wait_for(lambda: self.state().get(key) == want, timeout, f"state {key} == {want!r}")
        except TimeoutError as e:
            raise AssertionError(f"{e}; it is {self.state().get(key)!r}") from None

    def synced_by_me(self) -> bool:
        """This process's own sync is in the state file (not its killed predecessor's)."""
        return self.state().get("pid") == self.proc.pid and self.state().get("ok")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)

    def text(self) -> str:
        return self.log.read_text()

    def logged(self, line: str) -> bool:
        """A line (with its [cause]) that the daemon logged."""
        return any(text.endswith(line) for text in self.text().splitlines())
