"""A local Milvus standalone server (PyPI `milvus` 2.3.5) for tests, benchmarks and trying things out.

`local_server(base_dir)` starts the real server binary on free loopback ports, waits until it
answers, yields its URI (`http://127.0.0.1:<port>`) and stops it (and its child process) on exit.
Every port the server binds is chosen free here, the embedded etcd's client and peer ports included
(its defaults 2379/2380 would clash between two servers on one machine). When the server cannot
start, `MilvusServerError` carries the tail of its logs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from hivlp.errors import HivlpError
from hivlp.net import free_ports

START_TIMEOUT_S = 240.0
_LOG_TAIL = 3000


class MilvusServerError(HivlpError):
    """The Milvus server did not start (or is not installed)."""


def log_tail(base_dir: str | Path, chars: int = _LOG_TAIL) -> str:
    """The last `chars` characters of the server's stdout/stderr logs and etcd log under base_dir."""
    out = []
    for name in ("milvus-stdout.log", "milvus-stderr.log", "etcd.log"):
        p = Path(base_dir) / "logs" / name
        if p.is_file() and p.stat().st_size:
            with open(p, "rb") as f:
                f.seek(max(0, p.stat().st_size - chars))
                out.append(f"--- {p} ---\n" + f.read().decode("utf-8", "replace"))
    return "\n".join(out) or f"(no server logs under {base_dir}/logs)"


def _template(base_dir: Path, etcd_client: int, etcd_peer: int) -> Path:
    """The package's config template with the embedded etcd's own config (free client/peer ports)."""
    import milvus

    etcd_cfg = base_dir / "configs" / "embed-etcd.yaml"
    etcd_cfg.parent.mkdir(parents=True, exist_ok=True)
    etcd_cfg.write_text(
        "name: hivlp-etcd\n"
        f"listen-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"advertise-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"listen-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-cluster: hivlp-etcd=http://127.0.0.1:{etcd_peer}\n"
        "initial-cluster-state: new\n"
    )
    text = (Path(milvus.__file__).parent / "data" / "config.yaml.template").read_text()
    text, n = re.subn(r"^etcd:\n", f"etcd:\n  config:\n    path: {etcd_cfg}\n", text, count=1, flags=re.M)
    if n != 1:
        raise MilvusServerError("the milvus package's config template has no top-level etcd section")
    out = base_dir / "configs" / "hivlp-template.yaml"
    out.write_text(text)
    return out


@contextlib.contextmanager
def local_server(base_dir: str | Path, timeout: float = START_TIMEOUT_S) -> Iterator[str]:
    """Start a Milvus 2.3 standalone server with its data and logs under `base_dir`; yield its URI."""
    try:
        import milvus
        from milvus import MilvusServer, MilvusServerConfig
    except ImportError:
        raise MilvusServerError(
            "the Milvus server package is not installed: pip install milvus==2.3.5 (see requirements/lock.txt)"
        ) from None
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    keys = ["proxy_port", "proxy_internal_port", "root_coord_port", "query_coord_port", "query_node_port",
            "index_coord_port", "index_node_port", "data_coord_port", "data_node_port", "etcd_port"]
    ports = free_ports(len(keys) + 3)
    etcd_client, etcd_peer, web = ports[-3:]
    config = MilvusServerConfig(template=str(_template(base, etcd_client, etcd_peer)))
    config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")
    server = MilvusServer(config, wait_for_started=False)
    server.set_base_dir(str(base))
    for key, port in zip(keys, ports):
        server.config.set(key, port)
    server.config.set("etcd_port", etcd_client)
    server.webservice_port = web  # the package looks for a free port from here (metrics + /healthz)
    uri = f"http://127.0.0.1:{server.listen_port}"
    try:
        try:
            server.start()
        except Exception as e:
            raise MilvusServerError(f"Milvus server under {base} did not start: {e}\n{log_tail(base)}") from None
        _wait_ready(server, uri, base, timeout)
        yield uri
    finally:
        _stop(server)


def _wait_ready(server, uri: str, base: Path, timeout: float) -> None:
    from pymilvus import MilvusClient

    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        proc = server.server_proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise MilvusServerError(f"Milvus server under {base} exited (code {code}) before answering:\n"
                                    f"{log_tail(base)}")
        try:
            client = MilvusClient(uri, timeout=5)
            client.list_collections()
            client.close()
            return
        except Exception as e:  # not up yet
            last = str(e)
            time.sleep(1.0)
    raise MilvusServerError(
        f"Milvus server at {uri} (data under {base}) did not answer within {timeout:g} s ({last}):\n{log_tail(base)}"
    )


def _stop(server) -> None:
    proc = server.server_proc
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # a graceful stop can take 20 s; the data is thrown away
    except Exception:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    server.server_proc = None
    server.stop()  # closes the log files
