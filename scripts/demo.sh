#!/usr/bin/env bash
# `make demo`: the calculator on sample prefixes of each bundled ISP.
set -euo pipefail
cd "$(dirname "$0")/.."
for prefix in 2400:4050:1234:5600::/56 240b:10:abcd:ef00::/56 2404:7a80:1234:5600::/56; do
  echo "\$ mape-daemon calc $prefix"
  .venv/bin/mape-daemon calc "$prefix"
  echo
done
echo "\$ mape-daemon calc 2409:10:1234:5600::/56   # an OCN line not on Virtual Connect"
.venv/bin/mape-daemon calc 2409:10:1234:5600::/56 || echo "(exit $?)"
