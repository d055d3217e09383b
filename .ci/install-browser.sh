#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/services/router/test_browser.py), which drive it with
# Playwright's Python package. Idempotent: does nothing when /usr/bin/chromium is already there.
# Playwright's own browser downloads (`playwright install`) are never used.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "== chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
echo "== chromium: $(/usr/bin/chromium --version)"
