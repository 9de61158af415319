"""Which netfilter backend `auto` means: what `iptables -V` says, and what the record says.
(No test here changes $PATH: the lab VMs boot from threads of this process meanwhile.)"""

from __future__ import annotations

import pytest

from mape_daemon.kernel import make_kernel
from mape_daemon.kernel.probe import auto_backend


@pytest.mark.parametrize(
    ("version", "backend"),
    [("iptables v1.8.9 (legacy)", "iptables-legacy"), ("iptables v1.8.9 (nf_tables)", "nftables"), (None, "nftables")],
)
def test_auto_follows_iptables_v_and_a_host_without_iptables_gets_nftables(tmp_path, version, backend):
    if version is not None:
        iptables = tmp_path / "iptables"
        iptables.write_text(f"#!/bin/sh\necho '{version}'\n")
        iptables.chmod(0o755)
    assert auto_backend(str(tmp_path)) == backend


def test_auto_keeps_the_backend_our_state_lives_in():
    """After an upgrade that changed what `auto` picks, the running state is adopted, not moved."""
    assert make_kernel("auto", "iptables-nft").backend == "iptables-nft"
    assert make_kernel("auto", "nftables").backend == "nftables"
    assert make_kernel("nftables", "iptables-nft").backend == "nftables"  # an explicit choice wins
