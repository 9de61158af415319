#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a Debian 12 machine, only what is missing:
# Debian packages (build deps of systemd-python, iptables, and the lab's kernel, qemu and ISP
# tools), then a .venv in the checkout with the project installed editable. Idempotent and
# quick when everything is there (stamp files keyed on the inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  gcc pkg-config libsystemd-dev python3-dev python3-venv  # systemd-python builds from source
  iproute2 iptables libnftables1                          # what the daemon drives (iptables, its nft table)
  nftables conntrack                                      # the tests read the kernel with nft and conntrack
  qemu-system-x86 linux-image-amd64 busybox-static        # the lab VM (tests/lab)
  radvd ppp pppoe iperf3                                  # the lab's simulated ISP (iperf3: make bench)
  kea-dhcp6-server dhcpcd-base                            # DHCPv6-PD in the lab: the ISP's server, a client
  coturn                                                  # a STUN server (RFC 5780) and a NAT-behaviour client
  dnsmasq-base openssl                                    # HB46PP: the line's resolver (TXT record), a lab CA
  firewalld network-manager dbus                          # the host managers the lab lives beside
  miniupnpd miniupnpd-nftables miniupnpc                  # UPnP beside us (installed disabled) and a client
  dpkg-dev debhelper                                      # the Debian package (packaging/)
)
# Without their recommends (prometheus would bring node_exporter and its timers).
APT_BARE=(
  prometheus                                              # scrapes the daemon in the lab; promtool checks
)

missing=() bare=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
for p in "${APT_BARE[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || bare+=("$p")
done
if ((${#missing[@]} + ${#bare[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]} ${bare[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Services among them (firewalld, kea, coturn, prometheus, ...) are for the lab's namespaces, not for this host:
  # none is started by the install, and kea's are disabled after it.
  norc=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    norc=1
  fi
  if ((${#missing[@]})); then $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; fi
  if ((${#bare[@]})); then $SUDO apt-get install -y -qq --no-install-recommends "${bare[@]}" >/dev/null; fi
  [ -z "$norc" ] || $SUDO rm -f /usr/sbin/policy-rc.d
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now -q kea-dhcp6-server.service kea-ctrl-agent.service coturn.service prometheus.service 2>/dev/null || true
  fi
fi

PY=${PYTHON:-python3}
stamp=.venv/.bootstrap-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: creating .venv and installing mape-daemon (editable) with its test tools"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  # The wheelhouse: every wheel the Debian package's own venv needs (the daemon's dependencies and
  # the build backend), so building it later, in make test, needs no package index.
  echo "bootstrap: keeping the wheels the package needs in .venv/wheelhouse"
  rm -rf .venv/wheelhouse
  .venv/bin/python -m pip wheel -q --wheel-dir .venv/wheelhouse . 'setuptools>=77'
  rm -f .venv/.bootstrap-*
  touch "$stamp"
fi
