"""Credentials never leave: user:password inside a URI is masked wherever text is shown or written.

Tracking and Milvus URIs may carry credentials (`http://user:secret@host:5000`). Every message, log
line, MLflow param or tag and artifact that could hold such a URI goes through `redact`; configs go
through `scrub` before they are logged (masked) or written as config.yaml (credentials removed). The
CLI installs `RedactingFilter` on the root logger's handlers and as a log-record factory (so
third-party log lines, MLflow's and pymilvus', are masked whatever handler prints them) and runs every
command inside `redacted_streams` (stdout/stderr masked: MLflow prints run URLs itself). The safe way to pass credentials is the environment (`MILVUS_TOKEN`,
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` / `MLFLOW_TRACKING_TOKEN`) or Kubernetes secrets.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
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
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_log_redaction() -> None:
    """Mask credentials in all log output: on the root logger's handlers and every handler added later
    to a logger that propagates to them."""
    f = RedactingFilter()
    root = logging.getLogger()
    for h in root.handlers:
        if not any(isinstance(x, RedactingFilter) for x in h.filters):
            h.addFilter(f)
    _install_record_factory()


def scrub(obj: Any, strip: bool = False) -> Any:
    """A copy of a config-like structure (dicts, lists, tuples, strings) with every URL's credentials
    masked (`strip=True`: removed, for files that are read back, such as config.yaml)."""
    if isinstance(obj, str):
        if not has_credentials(obj):
            return obj
        return _USERINFO.sub(lambda m: m.group("scheme"), obj) if strip else redact(obj)
    if isinstance(obj, dict):
        return {k: scrub(v, strip) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v, strip) for v in obj)
    return obj


_factory_installed = False


def _install_record_factory() -> None:
    """Mask credentials in every log record when it is created, whatever logger or handler it meets
    (MLflow's own logger has its own handler and does not propagate to the root)."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        RedactingFilter().filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


class RedactingStream:
    """A text stream that masks credentials in everything written to it (stdout/stderr of the CLI:
    MLflow prints "View run … at: <tracking URI>" itself)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text) if "@" in text else text)
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_streams() -> Iterator[None]:
    """For the duration: sys.stdout and sys.stderr mask credentials; then the previous streams again."""
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = old_out if isinstance(old_out, RedactingStream) else RedactingStream(old_out)
    sys.stderr = old_err if isinstance(old_err, RedactingStream) else RedactingStream(old_err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old_out, old_err
