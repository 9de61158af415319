"""miniupnpd kept in step with the mapping: UPnP IGD and NAT-PMP that tell the truth.

miniupnpd has no include directive and no reload, so we write its whole config file: the
external address (the MAP IPv4), the tunnel as its external interface, permission rules that deny
every port outside the set and every [[forward]]ed or snat.reserved port, then the user's own miniupnpd.conf (their
listening_ip, uuid and permission rules: miniupnpd takes the first rule that matches, so theirs can
only narrow what ours leave). A console asking for a port outside the set gets UPnP error 606 and
an IGDv2 AddAnyPortMapping gets a port inside it. Whenever the file changes, or the tunnel is
recreated (miniupnpd's rules name the interface by index), miniupnpd is restarted. Without a
mapping the file refuses every request, and miniupnpd keeps running to be restarted on its return.

miniupnpd is *started* (upnp.start) when the file first appears: at boot it was skipped for want
of the file (the drop-in's ConditionPathExists), and a restart would not start it when the prefix
comes late (an ONU slower than the router after a power cut). CHECK_AFTER seconds after a start
or restart, upnp.check says whether it runs: one that failed is said (and shown by `status`) and
started again at the next try. `mape-daemon cleanup` removes the file and restarts miniupnpd,
which then does not come back (nothing stale is granted).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from . import desired
from .config import Config, UpnpConfig
from .files import write_atomic
from .kernel import commands
from .mapcalc import MapParams, range_text, without

# Keys of the user's miniupnpd.conf that we set: theirs are kept, commented out.
OURS = ("ext_ifname", "ext_ip", "ext_perform_stun", "ext_stun_host", "ext_stun_port")
# miniupnpd's nftables rules go to a table of their own (packaging/miniupnpd makes it), not to its
# default `inet filter`, which is often the user's own firewall table. A base that names one wins.
TABLE_KEYS = ("upnp_table_name", "upnp_nat_table_name")
TABLE = "miniupnpd"
ANY = "0.0.0.0/0 0-65535"  # any LAN host, any internal port
RESTART_TIMEOUT = 60.0
CHECK_AFTER = 10.0  # seconds after a start or restart (--no-block) before upnp.check asks
CLOSED = f"# No MAP-E mapping now (no prefix, or mape-daemon stopped): every request is refused.\ndeny 0-65535 {ANY}\n"


class UpnpError(Exception):
    """miniupnpd could not be brought in step: said in the journal, retried at the next sync."""


def _key(line: str) -> str | None:
    """The option a miniupnpd.conf line sets (None for comments, blanks and permission rules)."""
    text = line.strip()
    if not text or text.startswith("#") or "=" not in text:
        return None
    return text.partition("=")[0].strip()


def _value(base: list[str], key: str) -> str | None:
    values = [line.partition("=")[2].strip().strip("'\"") for line in base if _key(line) == key]
    return values[-1] if values else None


def render(base_text: str, base_path: Path, params: MapParams, cfg: Config) -> str:
    """The whole miniupnpd.conf: ours, then the user's with the keys we set commented out."""
    base = base_text.splitlines()
    allow = desired.pool_ranges(params, desired.reserved(cfg))  # the SNAT pool: no forwarded or reserved port
    ports = sum(hi - lo + 1 for lo, hi in allow)
    out = [
        f"# Written by mape-daemon for miniupnpd (run it with -f {cfg.upnp.file}); rewritten whenever the",
        f"# MAP-E mapping changes. Edit {base_path} instead: it is copied below.",
        f"# {params.ipv4}: {ports} ports for UPnP in {len(allow)} range(s) (the set minus forwarded and reserved).",
        f"ext_ip={params.ipv4}",
        f"ext_ifname={cfg.tunnel.name}",
    ]
    if _value(base, "ext_ifname6") is None:  # the tunnel is IPv4 only: IPv6 pinholes stay on the WAN
        out.append(f"ext_ifname6={_value(base, 'ext_ifname') or cfg.wan.interface}")
    out += [f"{key}={TABLE}" for key in TABLE_KEYS if _value(base, key) is None]
    out.append("# Only the set's ports: the BR sends this line no other; the first rule that matches wins.")
    out += [f"deny {range_text(r)} {ANY}" for r in without(((0, 65535),), allow)]
    out.append(f"# ---- {base_path}")
    out += [f"# (set by mape-daemon above) {line}" if _key(line) in OURS else line for line in base]
    return "\n".join(out) + "\n"


class Miniupnpd:
    """The file we write and the start or restart that makes miniupnpd read it; one per daemon."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.done: tuple[str, int] | None = None  # (file text, tunnel ifindex) miniupnpd was restarted on
        self.offering: str | None = None  # the MAP IPv4 miniupnpd grants ports of, once restarted on it
        self.clock = clock
        self.check_at: float | None = None  # when upnp.check is due after the last start or restart
        self.start_next = False  # the last check found it not running: start it, not restart

    def update(self, cfg: Config, params: MapParams | None) -> str | None:
        """Bring miniupnpd in step; returns what changed, for the journal, or None. UpnpError if
        it could not: nothing is remembered then, so the next sync tries again."""
        settings = cfg.upnp
        if not settings.enabled:
            return self._remove(settings, "upnp.enabled is false")
        self._check(settings)
        if params is None:
            text, index = _closed(settings.file), 0
            if text is None:
                return None  # never written: miniupnpd has not started (the drop-in's condition)
        else:
            try:
                base = settings.base.read_text()
            except OSError as e:
                raise UpnpError(f"cannot read upnp.base {settings.base}: {e.strerror or e}") from None
            text, index = render(base, settings.base, params, cfg), commands.ifindex(cfg.tunnel.name)
        key, offering = (text, index), params and str(params.ipv4)
        if self.done is None and _read(_applied(settings.file)) == _stamp(key):
            self.done, self.offering = key, offering  # our predecessor restarted miniupnpd on just this
        if key == self.done:
            return None
        # Skipped at boot for want of the file, found not running, or its start failed: start it.
        self.start_next |= not settings.file.exists()
        _write(settings.file, text)
        before, self.done, self.offering = self.done, None, None  # unknown until the restart worked
        ran = _run(settings, "start" if self.start_next else "restart")
        self.start_next, self.check_at = False, self.clock() + CHECK_AFTER
        _write(_applied(settings.file), _stamp(key))
        self.done, self.offering = key, offering
        if params is None:
            return f"miniupnpd refuses every request now (no MAP-E mapping); ran: {ran}"
        if before is None:
            return f"miniupnpd config written to {settings.file} ({params.ipv4}); ran: {ran}"
        why = "the tunnel was recreated" if before[0] == text else "its config changed"
        return f"miniupnpd restarted, {why} ({params.ipv4}): {ran}"

    def _check(self, settings: UpnpConfig) -> None:
        """After a start or restart, once CHECK_AFTER has passed: is miniupnpd running?"""
        if self.check_at is None or self.clock() < self.check_at:
            return
        self.check_at = None
        try:
            commands.run(settings.check, RESTART_TIMEOUT)
        except commands.CommandFailed as e:
            self.done, self.offering, self.start_next = None, None, True  # start it again next time
            _applied(settings.file).unlink(missing_ok=True)  # and let no restarted daemon take it as running
            raise UpnpError(f"miniupnpd is not running after its start or restart (upnp.check {e}): see "
                            "`systemctl status miniupnpd` and `journalctl -u miniupnpd`") from None  # fmt: skip

    def remove(self, settings: UpnpConfig, why: str) -> str | None:
        """Our file goes, and the restart stops miniupnpd (the drop-in's ConditionPathExists keeps it
        down): nothing of a mapping that is gone stays granted."""
        return self._remove(settings, why)

    def _remove(self, settings: UpnpConfig, why: str) -> str | None:
        if not settings.file.exists():
            return None
        settings.file.unlink(missing_ok=True)
        _applied(settings.file).unlink(missing_ok=True)
        ran = _run(settings, "restart")
        self.done = self.offering = self.check_at = None
        return f"miniupnpd config {settings.file} removed ({why}); ran: {ran}"


def _closed(path: Path) -> str | None:
    """The file as it is, with a first rule refusing everything: miniupnpd stays up (a restart
    that the mapping's return brings finds it running) and grants nothing meanwhile."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UpnpError(f"cannot read upnp.file {path}: {e.strerror or e}") from None
    return text if text.startswith(CLOSED) else CLOSED + text


def _applied(path: Path) -> Path:
    """What miniupnpd was last restarted on, kept beside its file: a daemon restart (a crash, the
    watchdog, on_stop = "keep") that finds the same file and tunnel costs no one their mappings."""
    return path.with_name(path.name + ".applied")


def _stamp(key: tuple[str, int]) -> str:
    return f"ifindex {key[1]} sha256 {hashlib.sha256(key[0].encode()).hexdigest()}\n"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write(path: Path, text: str) -> None:
    """Atomically, readable by miniupnpd (our unit's umask is 077)."""
    try:
        write_atomic(path, text, mode=0o644)
    except OSError as e:
        raise UpnpError(f"cannot write upnp.file {path}: {e.strerror or e}") from None


def _run(settings: UpnpConfig, which: str) -> str:
    """upnp.start or upnp.restart; returns the command line run."""
    command = settings.start if which == "start" else settings.restart
    try:
        commands.run(command, RESTART_TIMEOUT)
    except commands.CommandFailed as e:
        raise UpnpError(f"upnp.{which} {e}") from None
    return command
