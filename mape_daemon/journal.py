"""What the daemon says: logging to journald (structured MAPE_* fields) or stderr, systemd's
notifications, and the lines each sync result gets, with what `status` shows of them.

The words of a sync's changes come from `report.describe`; this module adds what only a running
daemon knows: the hold-down that began, conflicts found and resolved, forwards that left or came
back into the port set, and the history and repair counts kept for `status`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from typing import Any

from . import forwards
from .config import Config, ForwardConfig
from .errors import MapeError, RetryableError
from .report import Line, describe
from .result import SyncResult

log = logging.getLogger("mape-daemon")
HISTORY = 20  # changes kept for `status`
PERSISTENT = 3  # consecutive failed syncs of a passing kind before the journal calls it an ERROR


class PlainFormatter(logging.Formatter):
    """For stderr: the journal's MAPE_CAUSE field, where a line has one, in brackets."""

    def format(self, record: logging.LogRecord) -> str:
        cause = getattr(record, "MAPE_CAUSE", None)
        if trigger := getattr(record, "MAPE_TRIGGER", None):
            cause = f"{cause}: {trigger}"
        text = f"[{cause}] {record.getMessage()}" if cause else record.getMessage()
        return f"mape-daemon: {record.levelname}: {text}" + (f"\n{self.formatException(record.exc_info)}"
                                                            if record.exc_info else "")  # fmt: skip


def setup_logging() -> None:
    """journald with structured fields under systemd; plain stderr otherwise (journald is not
    always running, and systemd-python then drops messages silently)."""
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="mape-daemon")
        handler.setFormatter(logging.Formatter("%(message)s"))  # the priority is a field of its own
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(PlainFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def notify(message: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        from systemd import daemon

        daemon.notify(message)


def status_line(result: SyncResult) -> str:
    p = result.params
    if p is None and result.error is not None:
        return f"error: {result.error} (retrying)"
    if p is None:
        return f"waiting: {result.selection.reason}"
    if result.selection.held:
        return f"holding {p.short()}: {result.selection.reason}"
    state = "tunnel up" if result.ok else f"error: {result.error}"
    return f"{p.describe()}, {state}"


def fields(result: SyncResult, event: str, cause: str, triggers: tuple[str, ...] = ()) -> dict[str, str]:
    out = {"MAPE_EVENT": event, "MAPE_CAUSE": cause, "MAPE_CHANGES": str(len(result.plan.actions))}
    if triggers:
        out["MAPE_TRIGGER"] = ",".join(triggers)
    if (p := result.params) is not None:
        out |= {"MAPE_METHOD": p.method, "MAPE_PREFIX": str(p.end_user_prefix), "MAPE_IPV4": str(p.ipv4)}
        if p.psid is not None:
            out["MAPE_PSID"] = str(p.psid)
    return out


class SyncJournal:
    """The journal lines of each sync, and what they leave for `status`."""

    def __init__(self) -> None:
        self.conflicts: tuple[str, ...] = ()
        self.active: list[ForwardConfig] = []  # forwards inside the last mapping's port set
        self.unavailable: list[str] = []  # forwards outside the port set, as said in the journal
        self.holding = False
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.repairs: Counter[str] = Counter()
        self.failures = 0  # consecutive failed syncs
        self.said_error = False  # the journal has an ERROR for the current run of failures

    def _failure(self, result: SyncResult, cause: str) -> None:
        """ERROR means a person must act: a kernel race that passes (a link vanishing mid-sync, the
        kernel changing during a read, ppp0 going away) is retried quietly, and becomes an ERROR
        only when it persists; anything else is an ERROR at once."""
        self.failures += 1
        done = f" after {result.applied} of {len(result.plan.actions)} changes" if result.plan else ""
        passing = isinstance(result.error, RetryableError)
        if passing and self.failures < PERSISTENT:
            log.info("sync did not finish%s: %s (retrying)", done, result.error, extra=fields(result, "retry", cause))
            return
        # A traceback only for what we did not expect; kernel refusals explain themselves.
        trace = result.error if not isinstance(result.error, MapeError) else None
        again = f" ({self.failures} times in a row)" if passing else ""
        log.error("sync failed%s%s: %s (retrying)", done, again, result.error, extra=fields(result, "error", cause),
                  exc_info=trace)  # fmt: skip
        self.said_error = True

    def report(self, result: SyncResult, config: Config, cause: str, triggers: tuple[str, ...] = ()) -> list[Line]:
        """Log the sync's lines; returns them (for the metrics)."""
        if result.error is not None:
            self._failure(result, cause)
        elif self.failures:
            if self.said_error:
                log.info("syncs work again after %d failure(s)", self.failures, extra=fields(result, "retry", cause))
            self.failures, self.said_error = 0, False
        lines = describe(result, cause)
        if result.moved_from is not None:
            backend, n = result.moved_from
            lines.insert(0, Line("teardown", f"our state in the {backend} backend (the record's) removed first, "
                                             f"{n} object(s): the config's backend is another"))  # fmt: skip
        if result.selection.held and not self.holding:
            lines.insert(0, Line("hold", f"prefix gone from {config.wan.interface}: {result.selection.reason}"))
        self.holding = result.selection.held
        for line in lines:
            log.info("%s", line.text, extra=fields(result, line.event, cause, triggers))
            self.history.append({"time": time.time(), "cause": ",".join(triggers) or cause, "event": line.event,
                                 "text": line.text})  # fmt: skip
        if any(line.event == "repair" for line in lines):
            self.repairs[",".join(triggers) or cause] += 1  # repair syncs, by what set them off
        for c in sorted(set(result.conflicts) - set(self.conflicts)):
            log.warning("conflict: %s", c, extra=fields(result, "conflict", cause))
        for c in sorted(set(self.conflicts) - set(result.conflicts)):
            log.info("conflict resolved: %s", c, extra=fields(result, "conflict", cause))
        self.conflicts = result.conflicts
        if result.params is not None:  # while MAP-E is off, what was said stays said
            self.active, unavailable = forwards.split(config, result.params.port_ranges)
            for u in sorted(set(unavailable) - set(self.unavailable)):
                log.warning("%s; disabled until the port set holds it", u,
                            extra=fields(result, "forward-unavailable", cause))  # fmt: skip
            for u in sorted(set(self.unavailable) - set(unavailable)):
                log.info("%s: usable again", u.partition(": ")[0], extra=fields(result, "forward", cause))
            self.unavailable = unavailable
        return lines
