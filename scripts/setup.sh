#!/usr/bin/env bash
# Idempotent set-up: .venv/ from requirements/lock.txt, hivlp installed editable, Flickr8k in data/,
# Debian's chromium for the browser test (scripts/install_browser.sh).
# Used by `make setup`, CI and the Dockerfile (with HIVLP_SKIP_DATA=1, HIVLP_SKIP_BROWSER=1 and
# HIVLP_EDITABLE=0), so local and container installs cannot drift.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${HIVLP_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
LOCK=requirements/lock.txt

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

# Re-install only when the lock or pyproject changed since the last successful install.
stamp="$VENV/.hivlp-lock.sha256"
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing $LOCK into $VENV (first time: a few minutes; torch is large)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$LOCK"
    if [ "${HIVLP_EDITABLE:-1}" = "1" ]; then
        "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    else
        "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation .
    fi
    "$VENV/bin/python" -m pip check
    echo "$want" > "$stamp"
else
    echo "setup: $VENV is up to date with $LOCK"
fi

if [ "${HIVLP_SKIP_DATA:-0}" != "1" ]; then
    PATH="$PWD/$VENV/bin:$PATH" bash scripts/fetch_data.sh
fi

bash scripts/install_browser.sh
