"""The headless browser the page is checked and photographed with: Debian's `chromium` (apt), driven
by playwright (`pip install playwright`; its own browser download cannot work offline, so it is never
used). `scripts/setup.sh` installs chromium."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hivlp.errors import HivlpError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-default-apps", "--disable-extensions",
]


class BrowserUnavailableError(HivlpError):
    """Chromium is not installed or does not start."""


def chromium_path() -> str:
    path = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if not path:
        raise BrowserUnavailableError(
            "chromium not found: install Debian's package (`apt-get install -y chromium`, which "
            "`make setup` does when it can) to render the search page"
        )
    return path


def launch_chromium(playwright: Any) -> Any:
    """A headless chromium browser from a running `sync_playwright()`."""
    try:
        return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
    except BrowserUnavailableError:
        raise
    except Exception as e:
        raise BrowserUnavailableError(f"chromium at {chromium_path()} did not start: {e}") from None
