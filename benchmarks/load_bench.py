"""Load: N concurrent HTTP clients over mixed tasks for a fixed time, against a real server.

    python -m mutask.benchmarks.load_bench ART [--clients 16] [--seconds 20] [--max-requests 20000]

A bounded asyncio loop (httpx) on loopback: each client picks a random task and one of its
test images, POSTs it to /predict, and checks the answer against a plain onnxruntime run of
that task's own graph. Stops by itself after --seconds or --max-requests. Records requests,
errors, wrong answers, throughput and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import numpy as np

from mutask.benchmarks.common import median, write
from mutask.benchmarks.measure import model_input, plain_session
from mutask.server_process import png_bytes, running_server


def reference_answers(art_path, samples_per_task: int = 32, seed: int = 0) -> list[tuple[str, bytes, int]]:
    """(task, png, expected index) from each task's test split, the expectation computed by a
    bare onnxruntime session of the task's graph on the preprocessing its manifest records."""
    from mutask.export.artifact import load_artifact
    from mutask.evolve.tasks import load_task

    art = load_artifact(art_path)
    out = []
    for task, rec in art.tasks.items():
        data = load_task(rec.spec, seed=rec.seed).test
        idx = np.random.default_rng(seed).choice(len(data), size=min(samples_per_task, len(data)), replace=False)
        pngs = [png_bytes(data.raw(i)) for i in idx]
        x = np.concatenate([model_input(art, task, p) for p in pngs])
        sess = plain_session(art.graph_path(task))
        expected = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
        out += [(task, p, int(e)) for p, e in zip(pngs, expected)]
    return out


async def _load(url: str, items, clients: int, seconds: float, max_requests: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    stats = {"requests": 0, "errors": 0, "wrong": 0, "latencies_ms": [], "status": {}}
    deadline = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient):
        while time.perf_counter() < deadline and stats["requests"] < max_requests:
            task, png, expected = rng.choice(items)
            stats["requests"] += 1
            t0 = time.perf_counter()
            try:
                r = await c.post("/predict", data={"task": task}, files={"image": ("x.png", png, "image/png")})
            except httpx.HTTPError:
                stats["errors"] += 1
                continue
            stats["latencies_ms"].append((time.perf_counter() - t0) * 1000)
            stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
            if r.status_code != 200:
                stats["errors"] += 1
            elif r.json()["index"] != expected:
                stats["wrong"] += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    stats["elapsed_s"] = time.perf_counter() - t0
    return stats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--results", help="results directory (default benchmarks/results)")
    a = ap.parse_args(argv)
    items = reference_answers(a.artifact)
    with running_server(a.artifact) as url:
        stats = asyncio.run(_load(url, items, a.clients, a.seconds, a.max_requests, seed=0))
    lat = np.array(stats.pop("latencies_ms"))
    doc = {
        "benchmark": "load",
        "clients": a.clients,
        "seconds_limit": a.seconds,
        "max_requests": a.max_requests,
        "requests": stats["requests"],
        "errors": stats["errors"],
        "wrong_answers": stats["wrong"],
        "status_counts": {str(k): v for k, v in stats["status"].items()},
        "elapsed_s": round(stats["elapsed_s"], 2),
        "throughput_rps": round(stats["requests"] / stats["elapsed_s"], 1),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p99": round(float(np.percentile(lat, 99)), 2), "median": round(median(list(lat)), 2)},
        "repeats": 1,
    }
    md = (
        f"{a.clients} concurrent clients, mixed tasks, {doc['elapsed_s']} s, one run.\n\n"
        "| requests | errors | wrong answers | throughput (req/s) | p50 ms | p99 ms |\n|---:|---:|---:|---:|---:|---:|\n"
        f"| {doc['requests']} | {doc['errors']} | {doc['wrong_answers']} | {doc['throughput_rps']} | {doc['latency_ms']['p50']} | {doc['latency_ms']['p99']} |"
    )
    write("load", doc, md, a.results)
    print(md)
    return doc


if __name__ == "__main__":
    main()
