"""Serving: the segment-graph server against plain onnxruntime and one session per task graph.

    python -m mutask.benchmarks.serving_bench ART [--repeats 3] [--requests 100] [--concurrency 1,4,16,32]

Starts two real servers on loopback (``mutask serve ART``, free ports, stopped at the end):
``segments`` (the server: one ONNX Runtime session per segment, requests for any tasks batched
together through the segments they share) and ``per_task`` (``MUTASK_ENGINE=per_task``: one
session per task graph, each batching its own task's requests: the baseline), and measures

1. per-task HTTP latency at batch 1 (sequential requests; p50, p99) on ``segments`` against a bare
   onnxruntime run of the same per-task graph in this process (the same preprocessed input);
2. mixed-task throughput (requests/s; tasks round-robin) at each concurrency of the curve,
   ``segments`` vs ``per_task``, repeats interleaved, medians; plus the share of compute time spent
   in shared segments (from the server's ``mutask_segment_seconds_total``) and the mean
   engine batch size;
3. resident memory (RSS, psutil) of each server's worker process, against the artifact's
   unique weight bytes and against each other.

Client and server share the machine's cores (loopback): on a small machine the client is a
real part of the load. Everything is bounded: ``--requests`` per measurement and a time cap
per measurement (``--max-seconds``). Writes ``benchmarks/results/serving.json`` and
``serving.md`` (``--out`` for elsewhere). Imports no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mutask.benchmarks.common import RESULTS, _cpu_model, write
from mutask.benchmarks.http import REPO, ServerProcess
from mutask.serving.engine import server_threads

def machine() -> dict:
    import bentoml
    import onnxruntime
    import PIL

    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "bentoml": bentoml.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "torch": "not used (serving is torch-free)",
    }


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def engine_throughput(art, images: dict, batch: int, repeats: int, threads: int) -> dict:
    """Images/s of the engine alone (no HTTP): mixed batches of ``batch`` single-image requests,
    tasks round-robin, through the segment graph and through one session per task graph.
    Interleaved repeats, medians: what shared-segment batching buys where compute dominates."""
    from mutask.serving.engine import Engine
    from mutask.serving.preprocess import preprocess_bytes

    tasks = list(art.tasks)
    xs = {t: preprocess_bytes(images[t], int(art.tasks[t]["image_size"])) for t in tasks}
    items = [(tasks[i % len(tasks)], xs[tasks[i % len(tasks)]]) for i in range(batch)]
    configs = {"segments": dict(mode="segments"), "per_task": dict(mode="per_task"), "segments_own_weights": dict(mode="segments", share_weights=False)}
    engines = {m: Engine(art, verify=False, threads=threads, **kw) for m, kw in configs.items()}
    for e in engines.values():
        e.run(items)  # warm-up
    runs = {m: [] for m in engines}
    for r in range(repeats):
        for m in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0:
                engines[m].run(items)
                n += batch
            runs[m].append(n / (time.perf_counter() - t0))
    return {m: {"images_per_s_median": statistics.median(v), "runs": v} for m, v in runs.items()} | {"batch": batch, "repeats": repeats}


_MEMORY_PROBE = """
import json, sys
import numpy as np, psutil
from mutask.export.artifact import load_artifact
from mutask.serving.engine import Engine
art = load_artifact(sys.argv[1])
kw = json.loads(sys.argv[2])
# ONNX Runtime's own one-time set-up (environment, kernel registry) before the first reading:
# one plain session on the artifact's smallest graph, kept alive (nothing freed to be reused)
import onnxruntime as ort
small = min((art.segment_path(s) for s in art.segments), key=lambda p: p.stat().st_size)
warm = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
rss0 = psutil.Process().memory_info().rss
engine = Engine(art, verify=True, **kw)
items = [(t, np.zeros((2, 3, r["image_size"], r["image_size"]), np.float32)) for t, r in art.tasks.items()]
engine.run(items)
for item in items:
    engine.run([item])
print(json.dumps({"rss_delta_bytes": psutil.Process().memory_info().rss - rss0, "sessions": len(engine.sessions),
                  "weight_store_bytes": engine.weights.nbytes if engine.weights is not None else 0}))
"""


def engine_memory(art_path, threads: int) -> dict:
    """RSS one engine adds to a fresh process (after ONNX Runtime's own set-up): loading,
    verifying and running a mixed batch and every task alone. One fresh process per engine,
    so no engine reuses memory another freed."""
    import json
    import subprocess

    configs = {"segments": dict(mode="segments"), "per_task": dict(mode="per_task"), "segments_own_weights": dict(mode="segments", share_weights=False)}
    out = {}
    for name, kw in configs.items():
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(art_path), json.dumps(dict(kw, threads=threads))],
                           capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"memory probe for {name} failed:\n{r.stderr[-2000:]}")
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def block_scaling(art, threads: int, rows=(1, 2, 4, 8, 16, 32), repeats: int = 5) -> dict:
    """Seconds per run of the most widely shared segment that holds a transformer block, at
    each number of rows, through the engine's own session (weights from its store). Where the
    time grows in proportion to the rows, running several tasks' rows together in one batch
    saves nothing; it saves what a run costs beyond its rows (the fixed part)."""
    from mutask.serving.engine import Engine

    engine = Engine(art, mode="segments", verify=False, threads=threads)
    cands = [sid for sid, s in art.segments.items() if any(art.components[c]["name"].startswith("blocks.") for c in s["components"])]
    sid = max(cands, key=lambda k: (len(art.segments[k]["tasks"]), -len(art.segments[k]["components"])))
    session = engine.sessions[sid]
    feed = session.get_inputs()[0].name
    shape = [int(d) for d in art.segments[sid]["input_shape"][1:]]
    rng = np.random.default_rng(0)
    per_run = {}
    for n in rows:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        for _ in range(5):
            session.run(None, {feed: x})
        times = []
        for _ in range(repeats):
            k, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.3:
                session.run(None, {feed: x})
                k += 1
            times.append((time.perf_counter() - t0) / k)
        per_run[str(n)] = statistics.median(times)
    return {
        "segment": sid, "components": [art.components[c]["name"] for c in art.segments[sid]["components"]],
        "tasks": art.segments[sid]["tasks"], "seconds_per_run": per_run, "repeats": repeats, "ort_threads": threads,
    }


def task_images(art) -> dict[str, bytes]:
    """A noise PNG per task at its image size (no resize: the model's own cost)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    for t, rec in art.tasks.items():
        s = int(rec["image_size"])
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)).save(buf, "PNG")
        out[t] = buf.getvalue()
    return out


def bare_ort_latency(art, images: dict, n: int, thread_counts) -> dict:
    """p50/p99 of one plain onnxruntime session per task graph (ONNX Runtime's defaults but the
    thread count), batch 1, in this process, for each of ``thread_counts``; ``p50_ms``/``p99_ms``
    are those of the fastest (lowest p50) setting, so the overhead against it is not flattered."""
    import onnxruntime as ort

    from mutask.serving.preprocess import preprocess_bytes

    out = {}
    for t in art.tasks:
        x = preprocess_bytes(images[t], int(art.tasks[t]["image_size"]))
        runs = {}
        for threads in dict.fromkeys(thread_counts):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(art.graph_path(t)), so, providers=["CPUExecutionProvider"])
            for _ in range(5):
                sess.run(None, {"image": x})
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                sess.run(None, {"image": x})
                lat.append(time.perf_counter() - t0)
            runs[str(threads)] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "n": n}
            del sess
        best = min(runs, key=lambda k: runs[k]["p50_ms"])
        out[t] = dict(runs[best], threads=int(best), by_threads=runs)
    return out


def http_latency(url: str, images: dict, n: int, max_seconds: float) -> dict:
    import httpx

    out = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        for t, img in images.items():
            for _ in range(5):
                c.post("/predict", data={"task": t}, files={"image": ("x.png", img, "image/png")}).raise_for_status()
            lat, t_end = [], time.monotonic() + max_seconds
            while len(lat) < n and time.monotonic() < t_end:
                t0 = time.perf_counter()
                r = c.post("/predict", data={"task": t}, files={"image": ("x.png", img, "image/png")})
                lat.append(time.perf_counter() - t0)
                r.raise_for_status()
            out[t] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "n": len(lat)}
    return out


def scrape(url: str) -> dict:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    seg = {"shared": 0.0, "all": 0.0}
    rows = batches = 0.0
    for line in text.splitlines():
        if line.startswith("mutask_segment_seconds_total{"):
            v = float(line.rsplit(" ", 1)[1])
            seg["all"] += v
            if 'shared="true"' in line:
                seg["shared"] += v
        elif line.startswith("mutask_engine_batch_size_sum"):
            rows += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mutask_engine_batch_size_count"):
            batches += float(line.rsplit(" ", 1)[1])
    return {"seg_shared": seg["shared"], "seg_all": seg["all"], "rows": rows, "batches": batches}


async def _throughput(url: str, images: dict, concurrency: int, n: int, max_seconds: float) -> dict:
    import httpx

    tasks = list(images)
    counter = {"next": 0, "done": 0, "errors": 0}
    t_end = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        for t in tasks:  # warm: every task once
            (await c.post("/predict", data={"task": t}, files={"image": ("x.png", images[t], "image/png")})).raise_for_status()

        async def worker():
            while counter["next"] < n and time.monotonic() < t_end:
                i = counter["next"]
                counter["next"] += 1
                t = tasks[i % len(tasks)]
                r = await c.post("/predict", data={"task": t}, files={"image": ("x.png", images[t], "image/png")})
                if r.status_code == 200:
                    counter["done"] += 1
                else:
                    counter["errors"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": counter["done"], "errors": counter["errors"], "seconds": wall, "rps": counter["done"] / wall if wall else 0.0}


def throughput(url, images, concurrency, n, max_seconds) -> dict:
    before = scrape(url)
    res = asyncio.run(_throughput(url, images, concurrency, n, max_seconds))
    after = scrape(url)
    d = {k: after[k] - before[k] for k in after}
    res["shared_compute_share"] = d["seg_shared"] / d["seg_all"] if d["seg_all"] > 0 else None
    res["mean_engine_batch"] = d["rows"] / d["batches"] if d["batches"] > 0 else None
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.serving_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ART", help="artifact directory written by `mutask export`")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each throughput point (interleaved; medians)")
    p.add_argument("--requests", type=int, default=100, help="requests per latency series and per throughput point")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency curve")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time cap per measurement")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    a = p.parse_args(argv)
    curve = [int(c) for c in a.concurrency.split(",") if c.strip()]

    from mutask.export.artifact import artifact_stats, load_artifact

    art = load_artifact(a.artifact)
    stats = artifact_stats(a.artifact)
    images = task_images(art)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tmp = Path(tempfile.mkdtemp(prefix="mutask-serving-bench-"))
    servers = {}
    t_start = time.perf_counter()
    try:
        for mode in ("segments", "per_task"):
            prom = tmp / f"prometheus-{mode}"
            prom.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=tmp / "bentoml-home", PROMETHEUS_MULTIPROC_DIR=prom, MUTASK_ENGINE=mode)
            env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
            servers[mode] = ServerProcess(Path(a.artifact).resolve(), log_path=tmp / f"server-{mode}.log", env=env)
        for s in servers.values():
            s.wait_ready()
        print(f"servers ready: {', '.join(f'{m} {s.url}' for m, s in servers.items())}", flush=True)
        # warm both, then memory at rest
        for s in servers.values():
            http_latency(s.url, images, 3, a.max_seconds)
        memory = {m: s.worker_rss() for m, s in servers.items()}

        print("latency at batch 1 ...", flush=True)
        lat_http = http_latency(servers["segments"].url, images, a.requests, a.max_seconds)
        lat_http_per_task = http_latency(servers["per_task"].url, images, a.requests, a.max_seconds)
        lat_ort = bare_ort_latency(art, images, a.requests, (threads, server_threads()))

        print("throughput ...", flush=True)
        tp: dict = {m: {c: [] for c in curve} for m in servers}
        for r in range(a.repeats):
            for c in curve:
                for m in (("segments", "per_task") if r % 2 == 0 else ("per_task", "segments")):
                    res = throughput(servers[m].url, images, c, max(a.requests, 4 * c), a.max_seconds)
                    tp[m][c].append(res)
                    print(f"  repeat {r + 1} {m:<8} c={c:<3} {res['rps']:8.1f} req/s  batch {res['mean_engine_batch'] or 0:.2f}", flush=True)
        memory_after = {m: s.worker_rss() for m, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print("engine only (no HTTP) ...", flush=True)
    engine_only = {str(b): engine_throughput(art, images, b, max(3, a.repeats), threads) for b in (1, 8, 32)}
    scaling = {str(n): block_scaling(art, n) for n in sorted({1, threads})}
    engine_mem = engine_memory(Path(a.artifact).resolve(), threads)

    def med(xs, key):
        vals = [x[key] for x in xs if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    curve_doc = {
        str(c): {
            m: {"rps_median": med(tp[m][c], "rps"), "rps_all": [x["rps"] for x in tp[m][c]],
                "mean_engine_batch": med(tp[m][c], "mean_engine_batch"), "errors": sum(x["errors"] for x in tp[m][c]),
                "shared_compute_share": med(tp[m][c], "shared_compute_share")}
            for m in tp
        }
        for c in curve
    }
    unique = stats["unique_param_bytes"]
    weights_file = stats["weights_file_bytes"]
    doc = {
        "artifact": str(Path(a.artifact).resolve()),
        "tasks": list(art.tasks),
        "segments": {sid: {"tasks": s["tasks"], "parents": s["parents"], "components": s["components"]} for sid, s in art.segments.items()},
        "settings": {"repeats": a.repeats, "requests": a.requests, "concurrency": curve, "max_seconds": a.max_seconds,
                     "ort_threads_bare_and_engine_only": threads, "ort_threads_server": server_threads()},
        "latency_batch1": {t: {"http": lat_http[t], "http_per_task_server": lat_http_per_task[t], "bare_onnxruntime": lat_ort[t]} for t in art.tasks},
        "throughput": curve_doc,
        "engine_only": engine_only,
        "block_scaling": scaling,
        "engine_memory": engine_mem,
        "memory": {
            "unique_weight_bytes": unique,
            "naive_weight_bytes_one_model_per_task": stats["naive_bytes"],
            "at_rest": memory,
            "after_load": memory_after,
        },
        "wall_seconds": time.perf_counter() - t_start,
    }
    doc["machine"] = machine()

    mb = 1 / (1024 * 1024)
    lines = [
        f"# Serving benchmark ({len(art.tasks)} tasks, {len(art.segments)} segments)",
        "",
        "## Latency at batch 1 (ms; sequential requests)",
        "",
        f"Bare ORT: one session of the task's graph in the benchmark process with ONNX Runtime's defaults (threads spin "
        f"between runs, weights pre-packed), at {threads} and at {server_threads()} intra-op thread(s), whichever had the lower "
        f"p50 (the column 'bare threads'); the server: {server_threads()} thread(s) per session, no spinning, weights from its "
        "shared store (not pre-packed).",
        "",
        "| task | HTTP p50 | HTTP p99 | bare ORT p50 | bare ORT p99 | bare threads | HTTP overhead p50 | per-task-graph server: HTTP p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in art.tasks:
        h, o = lat_http[t], lat_ort[t]
        lines.append(
            f"| {t} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | {o['p50_ms']:.2f} | {o['p99_ms']:.2f} | {o['threads']} | {h['p50_ms'] - o['p50_ms']:.2f} | "
            f"{lat_http_per_task[t]['p50_ms']:.2f} |"
        )
    lines += [
        "",
        f"## Mixed-task throughput (requests/s, median of {a.repeats}; tasks round-robin)",
        "",
        "| concurrency | segment graph | one session per task | speed-up | segment-graph mean batch | per-task mean batch | shared-segment share of compute |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curve:
        tr, pt = curve_doc[str(c)]["segments"], curve_doc[str(c)]["per_task"]
        sp = tr["rps_median"] / pt["rps_median"] if tr["rps_median"] and pt["rps_median"] else float("nan")
        share = tr["shared_compute_share"]
        lines.append(
            f"| {c} | {tr['rps_median']:.1f} | {pt['rps_median']:.1f} | {sp:.2f}x | {tr['mean_engine_batch'] or 0:.2f} | "
            f"{pt['mean_engine_batch'] or 0:.2f} | {'-' if share is None else f'{share:.1%}'} |"
        )
    lines += [
        "",
        "## Engine only, no HTTP (images/s, mixed tasks round-robin, one image per request)",
        "",
        "| requests per batch | segment graph | one session per task | speed-up | segment graph, each session loading its own weights |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b, e in engine_only.items():
        tr, pt, own = (e[k]["images_per_s_median"] for k in ("segments", "per_task", "segments_own_weights"))
        lines.append(f"| {b} | {tr:.0f} | {pt:.0f} | {tr / pt:.2f}x | {own:.0f} ({own / pt:.2f}x) |")
    first = next(iter(scaling.values()))
    lines += [
        "",
        f"## What batching rows together saves here: one run of segment {first['segment']} ({', '.join(first['components'])}; "
        f"shared by {len(first['tasks'])} tasks) by rows (µs per run; median of {first['repeats']})",
        "",
        "| ONNX Runtime threads | " + " | ".join(f"{n} rows" for n in first["seconds_per_run"]) + " | µs per row at 1 row | at the most rows |",
        "|---:|" + "---:|" * (len(first["seconds_per_run"]) + 2),
    ]
    for th, sc in scaling.items():
        runs = sc["seconds_per_run"]
        most = max(runs, key=int)
        lines.append(
            f"| {th} | " + " | ".join(f"{v * 1e6:.0f}" for v in runs.values())
            + f" | {runs['1'] * 1e6:.0f} | {runs[most] / int(most) * 1e6:.0f} |"
        )
    em = engine_mem
    seg_rest = em["segments"]["rss_delta_bytes"] - em["segments"]["weight_store_bytes"]
    lines += [
        "",
        "## Memory one engine adds to a fresh process (RSS after loading, verifying and running every task; one measurement each)",
        "",
        "| engine | sessions | RSS added (MiB) | of which the weight store (MiB) | the rest: sessions' own memory (MiB) |",
        "|---|---:|---:|---:|---:|",
        f"| segment graph + task graphs over one weight store (the server) | {em['segments']['sessions']} | {em['segments']['rss_delta_bytes'] * mb:.1f} | "
        f"{em['segments']['weight_store_bytes'] * mb:.2f} ({em['segments']['weight_store_bytes'] / unique:.3f}x unique weights) | {seg_rest * mb:.1f} |",
        f"| one session per task graph, own weights | {em['per_task']['sessions']} | {em['per_task']['rss_delta_bytes'] * mb:.1f} | - | - |",
        f"| segment graph + task graphs, each session its own weights | {em['segments_own_weights']['sessions']} | {em['segments_own_weights']['rss_delta_bytes'] * mb:.1f} | - | - |",
        "",
        f"Unique weights {unique * mb:.2f} MiB. The store is the weights file read once; no session copies a weight (a test "
        "proves it). The rest is what the sessions themselves hold (graph structure, kernels, activations; no per-session "
        "memory arenas): it grows with the number of graphs, not with the weights. Beyond the engine, the "
        "worker's RSS below is the fixed runtime (Python, BentoML, ONNX Runtime).",
    ]
    lines += [
        "",
        "## Memory (worker process RSS)",
        "",
        "| server | RSS at rest (MiB) | RSS after load (MiB) | RSS / unique weights |",
        "|---|---:|---:|---:|",
    ]
    for m, label in (("segments", "segment graph (each weight once)"), ("per_task", "one session per task graph")):
        r0, r1 = memory[m]["worker_rss"], memory_after[m]["worker_rss"]
        lines.append(f"| {label} | {r0 * mb:.1f} | {r1 * mb:.1f} | {r1 / unique:.1f}x |" if r0 and r1 else f"| {label} | - | - | - |")
    lines += [
        "",
        f"Unique weight bytes: {unique * mb:.2f} MiB; one full model per task would hold {stats['naive_bytes'] * mb:.2f} MiB.",
        f"Client and servers share this machine's {doc['machine']['cpu_affinity'] or doc['machine']['cpu_count']} cores (loopback); "
        f"ONNX Runtime threads per server: {server_threads()} (the server's default), per bare onnxruntime session and engine-only "
        f"measurement: {threads}. Wall time {doc['wall_seconds']:.0f} s.",
    ]
    j, m = write("serving", doc, "\n".join(lines), a.out)
    print("\n".join(lines))
    print(f"\nwrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
