"""Which netfilter backend `auto` means: what `iptables -V` says, and what the record says."""

from __future__ import annotations

import pytest

from mape_daemon.kernel import make_iptables
from mape_daemon.kernel.probe import auto_backend


@pytest.mark.parametrize(
    ("version", "backend"),
    [("iptables v1.8.9 (legacy)", "iptables-legacy"), ("iptables v1.8.9 (nf_tables)", "nftables"), (None, "nftables")],
)
def test_auto_follows_iptables_v_and_a_host_without_iptables_gets_nftables(tmp_path, monkeypatch, version, backend):
    if version is not None:
        iptables = tmp_path / "iptables"
        iptables.write_text(f"#!/bin/sh\necho '{version}'\n")
        iptables.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert auto_backend() == backend


def test_auto_keeps_the_backend_our_state_lives_in(tmp_path, monkeypatch):
    """After an upgrade that changed what `auto` picks, the running state is adopted, not moved."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no iptables: `auto` alone would pick nftables
    assert make_iptables("auto").name == "nftables"
    assert make_iptables("auto", "iptables-nft").name == "iptables-nft"
    assert make_iptables("nftables", "iptables-nft").name == "nftables"  # an explicit choice wins
