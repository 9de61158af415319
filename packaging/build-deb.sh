#!/usr/bin/env bash
# Builds dist/mape-daemon_VERSION_ARCH.deb with Debian's own tools (dpkg-buildpackage, debhelper)
# from a copy of the tree (the files git knows) with packaging/debian in place.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
git ls-files -co --exclude-standard -z | tar -c --ignore-failed-read --null -T - 2>/dev/null | tar -x -C "$work/src"
cp -r packaging/debian "$work/src/debian"
# make bootstrap keeps the wheels the package's venv needs: with them, no package index is asked.
if [ -d .venv/wheelhouse ]; then export MAPE_WHEELHOUSE="$PWD/.venv/wheelhouse"; fi
echo "build-deb: dpkg-buildpackage (log: $work/build.log)${MAPE_WHEELHOUSE:+, wheels from $MAPE_WHEELHOUSE only}"
(cd "$work/src" && dpkg-buildpackage -b -us -uc >"$work/build.log" 2>&1) || { tail -40 "$work/build.log"; exit 1; }
mkdir -p dist
cp "$work"/*.deb dist/
ls dist/*.deb
