"""Credentials never leave: user:password inside a URI is masked wherever text is shown or written.

Tracking and Milvus URIs may carry credentials (`http://user:secret@host:5000`). Every message, log
line, MLflow param or tag and artifact that could hold such a URI goes through `redact`; the CLI also
installs `RedactingFilter` on the root logger, so third-party log lines (MLflow's, pymilvus') are
masked too. The safe way to pass credentials is the environment (`MILVUS_TOKEN`,
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` / `MLFLOW_TRACKING_TOKEN`) or Kubernetes secrets.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# scheme://user:password@ or scheme://token@ (the userinfo part of any URL in free text)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"<>]+)@")


def _mask_userinfo(m: re.Match) -> str:
    user, sep, _ = m.group("userinfo").partition(":")
    return f"{m.group('scheme')}{user}:{MASK}@" if sep else f"{m.group('scheme')}{MASK}@"


def redact(text: Any) -> str:
    """`text` with the userinfo of every URL in it masked (user kept, password or token replaced)."""
    return _USERINFO.sub(_mask_userinfo, str(text))


def has_credentials(uri: str) -> bool:
    return bool(_USERINFO.search(uri))


def strip_credentials(uri: str) -> str:
    """The URI without its userinfo at all (for storing a location, e.g. in config.yaml)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedactingFilter(logging.Filter):
    """Masks credentials in every record that passes (message and arguments, rendered once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        masked = redact(message)
        if masked != message or record.args:
            record.msg, record.args = masked, ()
        return True


def install_log_redaction() -> None:
    """Mask credentials in all log output: on the root logger's handlers and every handler added later
    to a logger that propagates to them."""
    f = RedactingFilter()
    root = logging.getLogger()
    for h in root.handlers:
        if not any(isinstance(x, RedactingFilter) for x in h.filters):
            h.addFilter(f)
