"""Load on the search service: the real `hivlp serve` (uvicorn) on a loopback port, N caption queries
sent by C concurrent clients, latency percentiles and errors counted (any non-200 answer, timeout or
malformed body is an error). Each scenario is one index behind the same server code (in memory, Milvus),
measured one after the other in one run. The client shares the machine with the server: on a small
machine the numbers include that contention."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from hivlp.errors import UsageError
from hivlp.io import atomic_write_json
from hivlp.serve.process import running_server

STAGES = ("encode", "coarse", "rerank", "describe", "total")


def _percentiles(ms: Sequence[float]) -> dict[str, float]:
    if not ms:
        return {}
    a = np.asarray(ms, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p90": round(float(np.percentile(a, 90)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "mean": round(float(a.mean()), 2),
            "max": round(float(a.max()), 2)}


def run_load(
    base_url: str,
    queries: Sequence[str],
    requests: int = 500,
    concurrency: int = 8,
    k: int = 10,
    level: str = "fine",
    warmup: int = 8,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Send `requests` GET /api/search queries (cycling through `queries`) from `concurrency` threads
    over one keep-alive connection pool; `warmup` requests first, not counted."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if requests < 1 or concurrency < 1 or not queries:
        raise UsageError(f"need requests >= 1, concurrency >= 1 and queries; got {requests}, {concurrency}, {len(queries)}")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    server: dict[str, list[float]] = {s: [] for s in STAGES}
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    with httpx.Client(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        def one(i: int, record: bool) -> None:
            params = {"text": queries[i % len(queries)], "k": k, "level": level}
            t = time.perf_counter()
            try:
                r = client.get("/api/search", params=params)
                ms = 1000 * (time.perf_counter() - t)
                body = r.json() if r.status_code == 200 else None
                ok = body is not None and len(body["hits"]) > 0
                problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
            except (httpx.HTTPError, ValueError, KeyError) as e:
                ms, body, problem = 1000 * (time.perf_counter() - t), None, f"{type(e).__name__}: {e}"
            if not record:
                return
            with lock:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(ms)
                    for s in STAGES:
                        server[s].append(float(body["timings_ms"][s]))

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                one(i, True)

        for i in range(warmup):
            one(requests + i, False)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(worker) for _ in range(concurrency)]:
                f.result()
        wall = time.perf_counter() - t0
    return {
        "requests": requests, "concurrency": concurrency, "k": k, "level": level,
        "ok": len(latencies), "errors": len(errors), "error_examples": errors[:5],
        "wall_s": round(wall, 2), "throughput_rps": round(requests / wall, 1),
        "latency_ms": _percentiles(latencies),
        "server_ms_p50": {s: round(float(np.median(v)), 2) for s, v in server.items() if v},
    }


def serve_load_bench(
    scenarios: dict[str, list[str]],
    queries: Sequence[str],
    requests: int = 500,
    concurrency: int = 8,
    k: int = 10,
    level: str = "fine",
) -> dict[str, Any]:
    """Run the load against one `hivlp serve` per scenario (name -> its command-line arguments)."""
    rows = []
    load_before = os.getloadavg()
    for name, args in scenarios.items():
        with running_server(args) as url:
            import httpx

            health = httpx.get(f"{url}/healthz", timeout=10).json()
            result = run_load(url, queries, requests=requests, concurrency=concurrency, k=k, level=level)
        rows.append({"scenario": name, "serve_args": list(args), "index": health["index"], **result})
    return {
        "benchmark": "serve_load",
        "what": f"GET /api/search?text=<val caption>&k={k}&level={level} on the real `hivlp serve` (uvicorn, "
                "loopback), latency per request as the client sees it; errors = non-200 or malformed answers",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    # other work on the machine competes with server and client: the 1-minute load average
                    "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)},
        "queries": len(queries),
        "results": rows,
    }


def write_results(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return out


def format_rows(result: dict[str, Any]) -> str:
    lines = [f"{'scenario':<22}{'ok':>6}{'errors':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'req/s':>8}"]
    for r in result["results"]:
        lat = r["latency_ms"]
        lines.append(f"{r['scenario']:<22}{r['ok']:>6}{r['errors']:>8}{lat.get('p50', float('nan')):>9.1f}"
                     f"{lat.get('p90', float('nan')):>9.1f}{lat.get('p99', float('nan')):>9.1f}{r['throughput_rps']:>8.1f}")
    return "\n".join(lines)
