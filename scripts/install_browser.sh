#!/usr/bin/env bash
# Debian's chromium for the browser test of `hivlp serve` (tests/test_serve.py drives it with playwright;
# playwright's own browser download needs the internet, so it is never used). Idempotent: nothing to do
# when chromium is installed. Skipped with HIVLP_SKIP_BROWSER=1 (the runtime image does not need a browser).
set -euo pipefail

if [ "${HIVLP_SKIP_BROWSER:-0}" = "1" ]; then
    echo "browser: skipped (HIVLP_SKIP_BROWSER=1)"
    exit 0
fi
if command -v chromium >/dev/null 2>&1; then
    echo "browser: $(command -v chromium) is installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: chromium is missing and apt-get is not available; install chromium with your package manager" \
         "(the browser test in tests/test_serve.py fails without it), or set HIVLP_SKIP_BROWSER=1" >&2
    exit 0
fi
if [ "$(id -u)" = "0" ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "browser: chromium is missing and installing it needs root: run 'sudo apt-get install -y chromium'" \
         "(the browser test in tests/test_serve.py fails without it), or set HIVLP_SKIP_BROWSER=1" >&2
    exit 0
fi
echo "browser: installing chromium with apt (for the browser test)"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
echo "browser: $(command -v chromium) is installed"
