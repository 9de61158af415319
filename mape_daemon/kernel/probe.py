"""What this host can do: which iptables it runs."""

from __future__ import annotations

import shutil
import subprocess

from ..errors import TerminalError


def iptables_variant() -> str:
    """'iptables-legacy' or 'iptables-nft', from what `iptables -V` says."""
    exe = shutil.which("iptables")
    if not exe:
        raise TerminalError("iptables is not installed: set firewall.backend or install the iptables package")
    out = subprocess.run([exe, "-V"], capture_output=True, text=True).stdout
    return "iptables-legacy" if "legacy" in out else "iptables-nft"
