"""The simulated ISP around the router, each role in its own network namespace.

    lan (client .10, server .20, console .55) --lan0-- ce (the router) --wan0-- isp --inet0-- inet
                                                      ce2 --wan0----------/  (BR, radvd, PPPoE AC)

With vlan=True the router looks like a real one: its WAN is VLAN 10 on `wan-0` (`wan-0.10`, the
ISP side `ce0.10`) and its LAN is VLAN 20 on a bridge (`br_lan.20`, bridge `br_lan` with the
veth `lan0` as its port; the LAN side `eth0.20`).

- isp: access network. radvd announces the WAN /64 (the router configures itself by SLAAC, as
  behind an ONU) and can renumber. The BR lives here: one ip6tnl per expected CE (so it only
  decapsulates from that CE address), replies demultiplexed to the CE by destination IPv4 and
  PSID bits of the port, and a per-CE chain that counts and drops out-of-set source ports
  (RFC 7597 section 8.1). pppoe-server on the same wire gives the router a real ppp0.
- inet: 203.0.113.10, servers that record what they see (tests.lab.traffic).
The BR's numbers come from tests.lab.mapping, never from the daemon's mapcalc.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv6Network
from pathlib import Path

from pyroute2 import IPRoute

from . import hb46pp_server, netns, pki, traffic
from .mapping import OCN, LabCE, LabRule, map_prefix

SERVER = "203.0.113.10"
HB46PP_HOST = "prov.lab.example"
STUN_ALT = "203.0.113.11"  # the STUN server's second address (RFC 5780 needs two)
STUN_PORT = 3478
ISP_INET, INET_ISP = "198.51.100.1", "198.51.100.2"
LAN_GW, LAN_CLIENT, LAN_SERVER, LAN_CONSOLE = "192.168.1.1", "192.168.1.10", "192.168.1.20", "192.168.1.55"
PPP_LOCAL, PPP_REMOTE = "100.64.0.1", "100.64.0.10"
# DS-Lite and IPIP (issue 23): the AFTR and its NAT44 pool, the IPIP provider's end and its fixed IPv4.
AFTR, AFTR_NAME, AFTR_POOL = "2001:db8:af::1", "aftr.lab.example", "198.18.1.1"
IPIP_END, FIXED_IPV4 = "2001:db8:bf::1", "198.18.0.77"
UPDATE_PORT = 8443


def wait_for(cond: Callable[[], object], timeout: float = 30, what: str = "condition", every: float = 0.2):
    """Poll `cond` until it returns something truthy; never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        Path("/proc/sys", key.replace(".", "/")).write_text(value)


class Lab:
    def __init__(
        self,
        workdir: Path,
        rule: LabRule = OCN,
        wan_prefix: str = "2400:4050:1234:5600::/64",
        vlan: bool = False,
        root: bool = False,
        delegate: str | None = None,
        slaac: bool = True,
    ):
        self.dir = workdir
        # A DHCPv6-PD line: Kea delegates this prefix; with slaac=False the WAN's own /64
        # (wan_prefix) is the access link's, announced without autonomous addresses.
        self.delegation = delegate
        self.slaac = slaac  # a home gateway's LAN: SLAAC on the WAN as well as the delegation
        self.rule = rule
        self.vlan = vlan
        self.wan, self.lan_if = ("wan-0.10", "br_lan.20") if vlan else ("wan0", "lan0")
        self.isp_if, self.lan_host_if = ("ce0.10", "eth0.20") if vlan else ("ce0", "eth0")
        self.ppp = "pppoe-wan.1" if vlan else "ppp0"  # dots in a name must not become sysctl path levels
        tag = f"mt{os.getpid() % 100000}"
        self.ce, self.ce2, self.isp, self.lan, self.inet = (f"{tag}{r}" for r in ("ce", "ce2", "isp", "lan", "inet"))
        if root:  # the router is this system itself (NetworkManager and networkd manage only it)
            self.ce = None  # type: ignore[assignment]
        self.prefixes = [wan_prefix]
        self.rdnss: list[str] = []  # DNS servers the RAs announce
        self.lifetimes: dict[str, int] = {}  # prefix -> preferred lifetime, where not the default
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: list[int] = []
        self.br_ces: dict[str, int] = {}  # CE address -> BR tunnel index
        self.server_log = workdir / "server.jsonl"

    # --- building -------------------------------------------------------------------------
    def up(self, pppoe: bool = False) -> Lab:
        for ns in (self.ce, self.isp, self.lan, self.inet):
            if ns is not None:
                netns.sh(None, "ip", "netns", "add", ns)
                netns.sh(ns, "ip", "link", "set", "lo", "up")
        self.sysctl(self.isp, {
            "net.ipv6.conf.all.forwarding": "1", "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0",
        })  # fmt: skip
        # A router has forwarding on, so it takes router advertisements only with accept_ra=2; set
        # before wan0 exists so its router solicitation at link-up gets an answer at once.
        self.sysctl(self.ce, {
            "net.ipv6.conf.all.forwarding": "1", "net.ipv4.ip_forward": "1",
            "net.ipv6.conf.default.accept_ra": "2", "net.ipv6.conf.default.autoconf": "1",
            # Twenty renumberings within an address lifetime exceed the default of 16 SLAAC addresses.
            "net.ipv6.conf.default.max_addresses": "64",
        })  # fmt: skip
        if self.vlan:
            self.veth(self.ce, "wan-0", self.isp, "ce0")
            self.veth(self.ce, "lan0", self.lan, "eth0")
            for ns, base, name, vid in ((self.ce, "wan-0", self.wan, 10), (self.isp, "ce0", self.isp_if, 10),
                                        (self.lan, "eth0", self.lan_host_if, 20)):  # fmt: skip
                netns.sh(ns, "ip", "link", "add", "link", base, "name", name, "type", "vlan", "id", str(vid))
                netns.sh(ns, "ip", "link", "set", name, "up")
            netns.sh(self.ce, "ip", "link", "add", "br_lan", "type", "bridge")
            netns.sh(self.ce, "ip", "link", "set", "lan0", "master", "br_lan")
            netns.sh(self.ce, "ip", "link", "set", "br_lan", "up")
            netns.sh(self.ce, "ip", "link", "add", "link", "br_lan", "name", self.lan_if, "type", "vlan", "id", "20")
            netns.sh(self.ce, "ip", "link", "set", self.lan_if, "up")
        else:
            self.veth(self.ce, "wan0", self.isp, "ce0")
            self.veth(self.ce, "lan0", self.lan, "eth0")
        self.veth(self.isp, "inet0", self.inet, "eth0")
        with IPRoute(netns=self.isp) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=self.rule.br, prefixlen=128)
            ce0 = ipr.link_lookup(ifname=self.isp_if)[0]
            ipr.addr("add", index=ce0, address=self._isp_addr(self.prefixes[0]), prefixlen=64, flags=0x02)
            ipr.addr("add", index=ipr.link_lookup(ifname="inet0")[0], address=ISP_INET, prefixlen=24)
            ipr.route("add", dst="203.0.113.0/24", gateway=INET_ISP)
        with IPRoute(netns=self.inet) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=INET_ISP, prefixlen=24)
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=SERVER, prefixlen=32)
            ipr.route("add", dst="0.0.0.0/0", gateway=ISP_INET)
        with IPRoute(netns=self.lan) as ipr:
            eth0 = ipr.link_lookup(ifname=self.lan_host_if)[0]
            for a in (LAN_CLIENT, LAN_SERVER, LAN_CONSOLE):
                ipr.addr("add", index=eth0, address=a, prefixlen=24)
            ipr.route("add", dst="0.0.0.0/0", gateway=LAN_GW)
        with IPRoute(netns=self.ce) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=self.lan_if)[0], address=LAN_GW, prefixlen=24)
        self.pids.append(netns.spawn(self.inet, traffic.serve, str(self.server_log), SERVER))
        self.start_radvd()
        if pppoe:
            self.start_pppoe()
        if self.delegation:
            self.start_kea()
        if self.slaac:
            wait_for(lambda: self.wan_addresses(), 60, "the router's SLAAC address")
        return self

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        with IPRoute(netns=ns_a) as ipr:
            ipr.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b})
            ipr.link("set", index=ipr.link_lookup(ifname=if_a)[0], state="up")
        with IPRoute(netns=ns_b) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=if_b)[0], state="up")

    def sysctl(self, ns: str, values: dict[str, str]) -> None:
        netns.call(ns, _write_sysctls, values)

    @staticmethod
    def _isp_addr(prefix64: str) -> str:
        return prefix64.split("/")[0].rstrip(":") + "::1"

    # --- router advertisements and renumbering --------------------------------------------
    def _radvd_conf(self) -> str:
        blocks = []
        for i, p in enumerate(self.prefixes):
            if p in self.lifetimes:
                life = f"AdvPreferredLifetime {self.lifetimes[p]}; AdvValidLifetime {self.lifetimes[p] + 600};"
            elif i < len(self.prefixes) - 1:
                life = "AdvPreferredLifetime 0; AdvValidLifetime 600;"  # deprecated
            else:
                life = ""
            autonomous = "on" if self.slaac else "off"
            blocks.append(f"  prefix {p} {{ AdvOnLink on; AdvAutonomous {autonomous}; {life} }};")
        blocks += [f"  RDNSS {a} {{ }};" for a in self.rdnss]
        body = "\n".join(blocks)
        # RAs every 3-4 s (renumberings are seen at once), a router lifetime of a real line's
        # 1800 s: radvd's default (3 x the interval, 12 s) let the WAN's default route expire when
        # a loaded TCG delayed an RA, and the tunnel then answered "No route to host".
        timing = "  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n  MaxRtrAdvInterval 4;\n  AdvDefaultLifetime 1800;\n"
        if self.delegation:
            timing += "  AdvManagedFlag on;\n"  # addresses and prefixes by DHCPv6
        return f"interface {self.isp_if} {{\n{timing}{body}\n}};\n"

    def start_radvd(self) -> None:
        conf = self.dir / "radvd.conf"
        conf.write_text(self._radvd_conf())
        conf.chmod(0o644)
        log = open(self.dir / "radvd.log", "ab")  # noqa: SIM115 - the process keeps it
        self.procs["radvd"] = netns.popen(
            self.isp, "radvd", "-n", "-C", str(conf), "-p", str(self.dir / "radvd.pid"), "-m", "stderr",
            stdout=log, stderr=log,
        )  # fmt: skip

    def start_stun(self) -> None:
        """coturn as an RFC 5780 STUN server beyond the BR: SERVER and STUN_ALT, ports 3478 and
        3479. `-n` reads no config file: Debian's turnserver.conf switches RFC 5780 off."""
        netns.sh(self.inet, "ip", "addr", "add", f"{STUN_ALT}/32", "dev", "lo")
        log = open(self.dir / "turnserver.log", "ab")  # noqa: SIM115 - the process keeps it
        self.procs["turnserver"] = netns.popen(
            self.inet, "turnserver", "-n", "--stun-only", "--no-cli", "--log-file", "stdout", "-L", SERVER,
            "-L", STUN_ALT, "-p", str(STUN_PORT), "--alt-listening-port", str(STUN_PORT + 1), stdout=log, stderr=log,
        )  # fmt: skip
        wait_for(lambda: f"{STUN_ALT}:{STUN_PORT + 1}" in netns.sh(self.inet, "ss", "-uln"), 30, "turnserver")

    # --- HB46PP: the line's resolver with the record, and the provisioning server ------------
    def start_hb46pp(self, answer: dict, *records: str) -> tuple[str, Path]:
        """dnsmasq answering 4over6.info (TXT) and the server's name on the ISP's access-link
        address, announced in the RAs (RDNSS), and the provisioning server there over HTTPS with
        a lab CA, answering `answer` at /config (rewrite `self.dir / "hb46pp-answers.json"` to
        change it). Returns the resolver's address and the CA file."""
        addr = self._isp_addr(self.prefixes[0])
        ca = pki.ca(self.dir)
        cert, key = pki.server_cert(ca, HB46PP_HOST)
        answers = self.dir / "hb46pp-answers.json"
        answers.write_text(json.dumps({"/config": {"status": 200, "body": json.dumps(answer)}}))
        log = open(self.dir / "dnsmasq.log", "ab")  # noqa: SIM115 - the process keeps it
        resolver = hb46pp_server.dnsmasq(
            addr, "--local=/lab.example/", "--local=/4over6.info/", f"--host-record={HB46PP_HOST},{addr}",
            f"--txt-record=4over6.info,v=v6mig-1 url=https://{HB46PP_HOST}/config t=b", *records)  # fmt: skip
        self.procs["dnsmasq"] = netns.popen(self.isp, *resolver, stdout=log, stderr=log)
        self.pids.append(netns.spawn(self.isp, hb46pp_server.serve, addr, 443, str(answers),
                                     str(self.dir / "hb46pp-requests.jsonl"), str(cert), str(key)))  # fmt: skip
        wait_for(lambda: f"[{addr}]:443" in netns.sh(self.isp, "ss", "-Htln"), 30, "the provisioning server")
        wait_for(lambda: f"[{addr}]:53" in netns.sh(self.isp, "ss", "-Huln"), 30, "dnsmasq")
        self.rdnss = [addr]  # the line's resolver, announced in the RAs (RDNSS)
        (self.dir / "radvd.conf").write_text(self._radvd_conf())
        self.procs["radvd"].send_signal(signal.SIGHUP)
        return addr, ca

    # --- DS-Lite's AFTR and an IPIP provider's end -------------------------------------------
    def _far_end(self, tun: str, local: str, remote: str, routed: str) -> None:
        """An ip6tnl from `local` (on the ISP's loopback) that decapsulates only from `remote`,
        with `routed` (IPv4) sent into it."""
        netns.sh(self.isp, "ip", "addr", "add", f"{local}/128", "dev", "lo")
        netns.sh(self.isp, "ip", "link", "add", tun, "type", "ip6tnl", "mode", "ipip6", "local", local,
                 "remote", remote, "encaplimit", "none")  # fmt: skip
        netns.sh(self.isp, "ip", "link", "set", tun, "up")
        self.sysctl(self.isp, {f"net.ipv4.conf.{tun}.rp_filter": "0"})
        netns.sh(self.isp, "ip", "route", "add", routed, "dev", tun)

    def follow(self, tun: str, remote: str) -> None:
        """The far end serves `remote` from now on (the AFTR's next B4; the provider told the new address)."""
        netns.sh(self.isp, "ip", "link", "set", tun, "type", "ip6tnl", "remote", remote)

    def start_aftr(self, b4: str) -> None:
        """An AFTR for one B4 (RFC 6333): the softwire from `b4` only, NAT44 of the LAN (and the
        B4's own 192.0.0.2) onto AFTR_POOL towards the Internet; replies back by the softwire."""
        self._far_end("aftr1", AFTR, b4, "192.168.1.0/24")
        netns.sh(self.isp, "ip", "route", "add", "192.0.0.2/32", "dev", "aftr1")
        for src in ("192.168.1.0/24", "192.0.0.2/32"):
            netns.sh(self.isp, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", src, "-o", "inet0", "-j",
                     "SNAT", "--to-source", AFTR_POOL)  # fmt: skip

    def start_ipip_end(self, local: str, ca: Path) -> str:
        """The provider's end of a fixed-IPv4 tunnel towards `local`, FIXED_IPV4 routed into it, and
        its update endpoint (HTTPS on the ISP's access address, a certificate for that address by
        the lab CA `ca`, logging to update-requests.jsonl). Returns the endpoint's base URL."""
        self._far_end("ipip1", IPIP_END, local, f"{FIXED_IPV4}/32")
        addr = self._isp_addr(self.prefixes[0])
        cert, key = pki.server_cert(ca, addr)
        answers = self.dir / "update-answers.json"
        answers.write_text(json.dumps({"/update": {"status": 200, "body": "ok"}}))
        self.pids.append(netns.spawn(self.isp, hb46pp_server.serve, addr, UPDATE_PORT, str(answers),
                                     str(self.dir / "update-requests.jsonl"), str(cert), str(key)))  # fmt: skip
        wait_for(lambda: f"[{addr}]:{UPDATE_PORT}" in netns.sh(self.isp, "ss", "-Htln"), 30, "the update endpoint")
        return f"https://[{addr}]:{UPDATE_PORT}"

    # --- DHCPv6-PD: Kea delegating to the router ---------------------------------------------
    def _kea_conf(self) -> str:
        net = IPv6Network(self.delegation)
        return json.dumps({"Dhcp6": {
            # Kea opens its sockets once at start and, by default, never again when that fails
            # (DHCPSRV_OPEN_SOCKET_FAIL, no retry): CI saw it never listen. Retry each second.
            "interfaces-config": {"interfaces": [self.isp_if], "service-sockets-max-retries": 60,
                                  "service-sockets-retry-wait-time": 1000},
            "lease-database": {"type": "memfile", "persist": False},
            "data-directory": str(self.dir),  # its server DUID file
            "preferred-lifetime": 60, "valid-lifetime": 120, "renew-timer": 5, "rebind-timer": 10,
            "subnet6": [{"id": 1, "subnet": self.prefixes[0], "interface": self.isp_if, "pd-pools": [
                {"prefix": str(net.network_address), "prefix-len": net.prefixlen, "delegated-len": net.prefixlen}]}],
            "loggers": [{"name": "kea-dhcp6", "severity": "INFO",
                         "output_options": [{"output": str(self.dir / "kea.log")}]}],
        }})  # fmt: skip

    def start_kea(self) -> None:
        """Kea on the access link, delegating `self.delegation`; the ISP routes the prefix to the
        link (on-link: the router's CE address in it answers neighbour solicitations)."""
        wait_for(lambda: "tentative" not in netns.sh(self.isp, "ip", "-6", "addr", "show", "dev", self.isp_if), 30,
                 "the access link's addresses past DAD (Kea cannot bind to a tentative one)")  # fmt: skip
        conf = self.dir / "kea.json"
        conf.write_text(self._kea_conf())
        env = {**os.environ, "KEA_PIDFILE_DIR": str(self.dir), "KEA_LOCKFILE_DIR": str(self.dir)}
        log = open(self.dir / "kea.out.log", "ab")  # noqa: SIM115 - the process keeps it
        self.procs["kea"] = netns.popen(self.isp, "kea-dhcp6", "-c", str(conf), stdout=log, stderr=log, env=env)
        netns.sh(self.isp, "ip", "-6", "route", "replace", self.delegation, "dev", self.isp_if)
        # Listening before a client asks: a Solicit lost to a server still starting is retried
        # only after 1+2+4+...+32 s (RFC 8415 backoff), past what a test waits.
        kea = self.procs["kea"]

        def listening() -> bool:
            if kea.poll() is not None:
                log = (self.dir / "kea.out.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"kea-dhcp6 exited with {kea.returncode}: {log}")
            return ":547 " in netns.sh(self.isp, "ss", "-Huln")

        wait_for(listening, 60, "Kea listening")

    def redelegate(self, prefix: str) -> None:
        """The ISP moves the line to another prefix: Kea restarted with only that one in its pool
        (it forgets the old lease), so the router's next renewal gets the new prefix."""
        proc = self.procs.pop("kea")
        proc.terminate()
        proc.wait(30)
        netns.sh(self.isp, "ip", "-6", "route", "del", self.delegation, "dev", self.isp_if)
        self.delegation = prefix
        self.start_kea()

    def start_dhcpcd(self) -> None:
        """dhcpcd on the router asking for a prefix (DHCPv6 only; the kernel takes the RAs), its
        first /64 for the LAN: what a dhcpcd.conf for a PD line says (README)."""
        conf = self.dir / "dhcpcd.conf"
        conf.write_text(f"ipv6only\nnoipv6rs\nnohook resolv.conf, timesyncd, ntp.conf, hostname\nduid\n"
                        f"interface {self.wan}\n  ia_pd 1 {self.lan_if}/1\n")  # fmt: skip
        log = open(self.dir / "dhcpcd.log", "ab")  # noqa: SIM115 - the process keeps it
        self.procs["dhcpcd"] = netns.popen(self.ce, "dhcpcd", "-f", str(conf), "--nobackground", "--debug",
                                           self.wan, stdout=log, stderr=log)  # fmt: skip

    def renumber(self, new_prefix64: str) -> None:
        """Announce `new_prefix64` and deprecate the ones before it (preferred lifetime 0)."""
        with IPRoute(netns=self.isp) as ipr:
            ce0 = ipr.link_lookup(ifname=self.isp_if)[0]
            ipr.addr("add", index=ce0, address=self._isp_addr(new_prefix64), prefixlen=64, flags=0x02)
        self.prefixes.append(new_prefix64)
        (self.dir / "radvd.conf").write_text(self._radvd_conf())
        self.procs["radvd"].send_signal(signal.SIGHUP)

    def announce(self, lifetimes: dict[str, int]) -> None:
        """Announce these /64s, all preferred, each with its own preferred lifetime."""
        with IPRoute(netns=self.isp) as ipr:
            ce0 = ipr.link_lookup(ifname=self.isp_if)[0]
            for p in lifetimes:
                if p not in self.prefixes:
                    ipr.addr("add", index=ce0, address=self._isp_addr(p), prefixlen=64, flags=0x02)
        self.prefixes = [p for p in self.prefixes if p not in lifetimes] + list(lifetimes)
        self.lifetimes |= lifetimes
        (self.dir / "radvd.conf").write_text(self._radvd_conf())
        self.procs["radvd"].send_signal(signal.SIGHUP)

    def wan_addresses(self, ns: str | None = None) -> list[dict]:
        """Global addresses on the router's WAN: address, prefixlen, deprecated, tentative."""
        with IPRoute(netns=ns or self.ce) as ipr:
            idx = ipr.link_lookup(ifname=self.wan if ns in (None, self.ce) else "wan0")[0]
            out = []
            for a in ipr.get_addr(family=10, index=idx):
                if a["scope"] != 0:
                    continue
                info = a.get_attr("IFA_CACHEINFO")
                flags = a.get_attr("IFA_FLAGS") or a["flags"]
                out.append({
                    "address": a.get_attr("IFA_ADDRESS"), "prefixlen": a["prefixlen"],
                    "deprecated": bool(info and info["ifa_preferred"] == 0), "tentative": bool(flags & 0x40),
                })  # fmt: skip
            return out

    # --- the border relay -------------------------------------------------------------------
    def br_add_ce(self, ce: LabCE) -> str:
        """Serve `ce` at the BR; returns the name of its per-CE counting chain."""
        n = self.br_ces.setdefault(ce.ce_draft03, len(self.br_ces) + 1)
        tun, mark, chain = f"b{n}", str(100 + n), f"BRCE{n}"
        netns.sh(self.isp, "ip", "link", "add", tun, "type", "ip6tnl", "mode", "ipip6", "local", self.rule.br,
                 "remote", ce.ce_draft03, "encaplimit", "none")  # fmt: skip
        netns.sh(self.isp, "ip", "link", "set", tun, "up")
        self.sysctl(self.isp, {f"net.ipv4.conf.{tun}.rp_filter": "0"})
        netns.sh(self.isp, "ip", "route", "add", f"{ce.ipv4}/32", "dev", tun, "table", mark)
        netns.sh(self.isp, "ip", "rule", "add", "fwmark", mark, "table", mark, "priority", mark)
        m = 16 - ce.offset - ce.psid_len
        mask, val = ((1 << ce.psid_len) - 1) << m, ce.psid << m
        low = 1 << (16 - ce.offset)  # ports below this (A = 0) are in nobody's set
        dport, sport, icmp_id = (
            f"0>>22&0x3C@0&{mask:#x}={val:#x}",
            f"0>>22&0x3C@0>>16&{mask:#x}={val:#x}",
            (f"0>>22&0x3C@4>>16&{mask:#x}={val:#x}"),
        )
        # An ICMP error is the CE's by the source port of the packet it quotes (RFC 7597 section 8).
        quoted = f"0>>22&0x3C@8>>22&0x3C@8>>16&{mask:#x}={val:#x}"
        lines = [
            "*mangle",
            *(f"-A PREROUTING -i inet0 -d {ce.ipv4} -p {p} -m u32 --u32 {u} -j MARK --set-mark {mark}"
              for p, u in (("tcp", dport), ("udp", dport), ("icmp", icmp_id))),
            *(f"-A PREROUTING -i inet0 -d {ce.ipv4} -p icmp --icmp-type {t} -m u32 --u32 {quoted} "
              f"-j MARK --set-mark {mark}" for t in ("destination-unreachable", "time-exceeded")),
            "COMMIT",
            "*filter",
            f":{chain} - [0:0]",
            f"-A FORWARD -i {tun} -j {chain}",
            f"-A {chain} ! -s {ce.ipv4} -j DROP",  # a wrong source (not NATed, or NATed to another IPv4)
            *(f"-A {chain} -s {ce.ipv4} -p {p} --sport {low}:65535 -m u32 --u32 {sport} -j RETURN"
              for p in ("tcp", "udp")),
            f"-A {chain} -s {ce.ipv4} -p icmp -m u32 --u32 0>>22&0x3C@4>>16={low}:65535&&{icmp_id} -j RETURN",
            # ICMP errors the CE sends (port unreachable, ...) carry no port of their own.
            *(f"-A {chain} -s {ce.ipv4} -p icmp --icmp-type {t} -j RETURN"
              for t in ("destination-unreachable", "time-exceeded", "parameter-problem")),
            f"-A {chain} -j DROP",  # a port or ICMP id outside the CE's set
            "COMMIT",
        ]  # fmt: skip
        netns.sh(self.isp, "iptables-legacy-restore", "--noflush", input="\n".join(lines) + "\n")
        return chain

    def br_counters(self, chain: str) -> dict[str, int]:
        """Packets the BR dropped from a CE: with a wrong source, and with a port outside its set."""
        out = netns.sh(self.isp, "iptables-legacy", "-t", "filter", "-L", chain, "-v", "-x", "-n")
        lines = [line.split() for line in out.splitlines()[2:] if line.strip()]
        assert lines[0][2] == "DROP" and lines[-1][2] == "DROP", out
        return {"wrong-source": int(lines[0][0]), "out-of-set": int(lines[-1][0])}

    def br_dropped(self, chain: str) -> int:
        return sum(self.br_counters(chain).values())

    def ce_params(self, prefix: str | None = None) -> LabCE:
        return map_prefix(self.rule, prefix or self.prefixes[-1])

    # --- PPPoE --------------------------------------------------------------------------------
    def start_pppoe(self) -> None:
        """The access concentrator on the same wire as IPv6 (as on NTT NGN), then the router's pppd."""
        self.start_pppoe_server()
        self.start_pppd()

    def start_pppoe_server(self) -> None:
        for mod in ("ppp_generic", "pppoe"):
            netns.sh(None, "modprobe", mod)
        opts = self.dir / "pppoe-server-options"
        opts.write_text("noauth\nlcp-echo-interval 5\nlcp-echo-failure 3\nnodefaultroute\n")
        log = open(self.dir / "pppoe.log", "ab")  # noqa: SIM115
        self.procs["pppoe-server"] = netns.popen(
            self.isp, "pppoe-server", "-F", "-I", self.isp_if, "-L", PPP_LOCAL, "-R", PPP_REMOTE, "-N", "4",
            "-O", str(opts), stdout=log, stderr=log,
        )  # fmt: skip
        with IPRoute(netns=self.inet) as ipr:
            ipr.route("add", dst="100.64.0.0/24", gateway=ISP_INET)

    def start_pppd(self) -> None:
        log = open(self.dir / "pppd.log", "ab")  # noqa: SIM115
        self.procs["pppd"] = netns.popen(
            self.ce, "pppd", "plugin", "pppoe.so", f"nic-{self.wan}", "noauth", "nodetach", "unit", "0",
            "ifname", self.ppp, "user", "lab", "nodefaultroute", "noipdefault", "usepeerdns", "persist",
            "maxfail", "0", "holdoff", "1",
            stdout=log, stderr=log,
        )  # fmt: skip

    def ppp_up(self) -> bool:
        out = netns.sh(self.ce, "ip", "-4", "-o", "addr", "show", "dev", self.ppp, check=False)
        return PPP_REMOTE in out

    # --- teardown ---------------------------------------------------------------------------
    def down(self) -> None:
        if (dhcpcd := self.procs.get("dhcpcd")) is not None and dhcpcd.poll() is None:
            dhcpcd.send_signal(signal.SIGHUP)  # release: its lease file goes, the next lab starts afresh
            with contextlib.suppress(subprocess.TimeoutExpired):
                dhcpcd.wait(20)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for ns in (self.ce, self.ce2, self.isp, self.lan, self.inet):
            if ns is not None:
                netns.sh(None, "ip", "netns", "del", ns, check=False)
        if self.ce is None:  # the router was this system: take back what the lab gave it
            for link in ("wan-0" if self.vlan else "wan0", "lan0", "br_lan", "ppp0", self.ppp):
                netns.sh(None, "ip", "link", "del", link, check=False)

    def add_ce2(self, prefix64: str) -> None:
        """A second router on its own wire, for the BR's shared-IPv4 tests."""
        netns.sh(None, "ip", "netns", "add", self.ce2)
        netns.sh(self.ce2, "ip", "link", "set", "lo", "up")
        self.veth(self.ce2, "wan0", self.isp, "ce1")
        with IPRoute(netns=self.isp) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="ce1")[0], address=self._isp_addr(prefix64), prefixlen=64,
                     flags=0x02)  # fmt: skip
        own = prefix64.split("/")[0].rstrip(":") + "::2"
        netns.sh(self.ce2, "ip", "-6", "addr", "add", f"{own}/64", "dev", "wan0", "nodad")
        netns.sh(self.ce2, "ip", "-6", "route", "add", "default", "via", self._isp_addr(prefix64), "dev", "wan0")
