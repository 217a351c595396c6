"""`hivlp serve` as a child process on a loopback port: what the load benchmark and the browser test
run (the real server, uvicorn and all), started and stopped cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from hivlp.errors import HivlpError
from hivlp.net import free_port

STARTUP_TIMEOUT_S = 180.0  # loading the model and opening the index on 2 busy cores


class ServerStartError(HivlpError):
    """`hivlp serve` exited or did not answer /healthz in time."""


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


@contextlib.contextmanager
def running_server(
    serve_args: Sequence[str],
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start `python -m hivlp serve <serve_args> --host H --port P`, wait for /healthz, yield its base
    URL; on exit stop it (SIGTERM, then SIGKILL) and wait for it. A server that exits or stays silent
    raises ServerStartError with the tail of its log."""
    import httpx

    port = port or free_port(host)
    url = f"http://{host}:{port}"
    with tempfile.TemporaryDirectory(prefix="hivlp-serve-") as tmp:
        log_path = Path(tmp) / "server.log"
        cmd = [sys.executable, "-m", "hivlp", "serve", *serve_args, "--host", host, "--port", str(port)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise ServerStartError(
                        f"`hivlp serve` exited with code {proc.returncode} before answering; its log:\n{_tail(log_path)}"
                    )
                try:
                    if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"`hivlp serve` did not answer {url}/healthz within {timeout:g} s; its log:\n{_tail(log_path)}"
                    )
                time.sleep(0.25)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            with contextlib.suppress(ProcessLookupError):  # anything it started and left behind (its session)
                os.killpg(proc.pid, signal.SIGKILL)
