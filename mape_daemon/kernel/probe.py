"""What this host can do: which netfilter backend `auto` means here."""

from __future__ import annotations

import shutil
import subprocess


def auto_backend(path: str | None = None) -> str:
    """'iptables-legacy' where `iptables -V` says legacy (nf_tables rules beside legacy ones would
    be a second firewall nobody looks at); otherwise, nf_tables hosts and hosts without iptables,
    'nftables'. `path`: where to look for iptables (default: $PATH)."""
    exe = shutil.which("iptables", path=path)
    if exe and "legacy" in subprocess.run([exe, "-V"], capture_output=True, text=True).stdout:
        return "iptables-legacy"
    return "nftables"
