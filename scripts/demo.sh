#!/usr/bin/env bash
# `make demo`: boot the lab VM and run mape-daemon against the simulated ISP (tests/lab/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: booting the lab VM (Debian's kernel under qemu; about a minute under TCG)"
exec .venv/bin/python -m tests.lab.vm --timeout 900 -- .venv/bin/python -m tests.lab.demo
