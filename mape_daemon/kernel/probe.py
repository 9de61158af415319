"""What this host can do: which iptables it runs."""

from __future__ import annotations

import shutil
import subprocess

from ..errors import CannotRunHere


def iptables_variant() -> str:
    """'iptables-legacy' or 'iptables-nft', from what `iptables -V` says."""
    exe = shutil.which("iptables")
    if not exe:
        raise CannotRunHere("iptables is not installed (Debian package iptables); firewall.backend needs it")
    out = subprocess.run([exe, "-V"], capture_output=True, text=True).stdout
    return "iptables-legacy" if "legacy" in out else "iptables-nft"
