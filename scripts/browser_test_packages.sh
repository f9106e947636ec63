#!/usr/bin/env bash
# Install what tests/test_report.py needs to render the demo's results page: Debian's chromium
# (run headless). Called by scripts/test.sh. Does nothing when chromium is there already;
# otherwise installs it with apt-get (as root), updating the package lists only if needed.
#
# Machines without root (or without apt-get) and without chromium: set
# LAYERDIFF_SKIP_BROWSER_TESTS=1 to skip the browser test (reported as skipped, with this reason).
set -euo pipefail

if [ "${LAYERDIFF_SKIP_BROWSER_TESTS:-0}" = 1 ]; then
  echo "[browser] LAYERDIFF_SKIP_BROWSER_TESTS=1: the headless-browser tests will be skipped"
  exit 0
fi
command -v chromium >/dev/null 2>&1 && exit 0

cannot() {
  echo "[browser] error: the report tests need chromium (Debian package chromium), and $1." >&2
  echo "[browser] Install it (as root: apt-get install chromium), or set LAYERDIFF_SKIP_BROWSER_TESTS=1" >&2
  echo "[browser] to skip the headless-browser tests on this machine." >&2
  exit 1
}
[ "$(id -u)" -eq 0 ] || cannot "this user is not root, so it cannot be installed here"
command -v apt-get >/dev/null 2>&1 || cannot "there is no apt-get here to install it with"

echo "[browser] installing chromium for the report tests"
install=(apt-get install -y -qq --no-install-recommends chromium)
export DEBIAN_FRONTEND=noninteractive
if ! "${install[@]}" >/tmp/layerdiff-browser-apt.log 2>&1; then
  apt-get update -qq >>/tmp/layerdiff-browser-apt.log 2>&1 || true
  "${install[@]}" >>/tmp/layerdiff-browser-apt.log 2>&1 \
    || { tail -20 /tmp/layerdiff-browser-apt.log >&2; cannot "apt-get could not install it (log above, all of it in /tmp/layerdiff-browser-apt.log)"; }
fi
command -v chromium >/dev/null 2>&1 || cannot "chromium is still missing after installing it"
echo "[browser] installed"
