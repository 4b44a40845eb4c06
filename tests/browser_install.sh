#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_report.py (headless, driven over the DevTools protocol).
# Idempotent: returns at once when chromium is already there. Without root the browser test is skipped.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "browser_install.sh: need root to apt-get install chromium; the report's browser test will be skipped" >&2
    exit 0
fi
echo "browser_install.sh: apt-get install chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
