"""Serving: the segment-graph server against plain onnxruntime and one session per task graph.

    python -m mutask.benchmarks.serving_bench ART [--repeats 3] [--requests 100] [--concurrency 1,4,16,32]

Starts two real servers on loopback (``mutask serve ART``, free ports, stopped at the end):
``segments`` (the server: one ONNX Runtime session per segment, requests for any tasks batched
together through the segments they share) and ``per_task`` (``MUTASK_ENGINE=per_task``: one
session per task graph, each batching its own task's requests: the baseline), and measures

1. per-task HTTP latency at batch 1 (sequential requests; p50, p99) on ``segments`` against a bare
   onnxruntime run of the same per-task graph in this process (the same preprocessed input);
2. mixed-task throughput (requests/s; tasks round-robin) at each concurrency of the curve,
   ``segments`` vs ``per_task`` back to back in every repeat (the order alternating), medians and
   the median of the paired ratios with a bootstrap interval; plus the share of compute time
   spent in shared segments (from the server's ``mutask_segment_seconds_total``), the mean
   engine batch size and each server's CPU time per request;
3. resident memory (RSS, psutil) of each server's worker process, against the artifact's
   unique weight bytes and against each other;
4. the engine alone, without HTTP (:mod:`mutask.benchmarks.engine_bench`).

Client and server share the machine's cores (loopback): on a small machine the client is a
real part of the load. Everything is bounded: ``--requests`` per measurement and a time cap
per measurement (``--max-seconds``). Writes ``benchmarks/results/serving.json`` and
``serving.md`` (``--out`` for elsewhere). Imports no torch.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mutask.benchmarks import engine_bench
from mutask.benchmarks.common import RESULTS, serving_machine, write
from mutask.benchmarks.measure import closed_loop, http_latency as latency_series, model_input, noise_pngs, plain_session, run_times, summary_ms
from mutask.server_process import ServerProcess, child_env, metric_value
from mutask.serving.settings import cpu_count, default_threads

MODES = ("segments", "per_task")
MIB = 1 / (1024 * 1024)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.serving_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ART", help="artifact directory written by `mutask export`")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each throughput point (interleaved; medians)")
    p.add_argument("--requests", type=int, default=100, help="requests per latency series and per throughput point")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency curve")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time cap per measurement")
    p.add_argument("--device", choices=["cpu", "auto", "cuda"], default="cpu", help="the servers' and the engine's device (default cpu, like the bare onnxruntime reference)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    p.add_argument("--name", default="serving", help="results file name (default serving)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- over HTTP


def start_servers(art_path: Path, tmp: Path, device: str) -> dict[str, ServerProcess]:
    """One ready ``mutask serve`` per engine mode, each with its own Prometheus directory."""
    servers = {}
    try:
        for mode in MODES:
            prom = tmp / f"prometheus-{mode}"
            prom.mkdir(parents=True, exist_ok=True)
            env = child_env({"BENTOML_HOME": tmp / "bentoml-home", "PROMETHEUS_MULTIPROC_DIR": prom, "MUTASK_ENGINE": mode})
            servers[mode] = ServerProcess(art_path, log_path=tmp / f"server-{mode}.log", env=env, args=["--device", device])
        for s in servers.values():
            s.wait_ready()
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


def http_latency(url: str, images: dict, n: int, max_seconds: float) -> dict:
    """Per task: p50/p99 of up to ``n`` sequential requests of the task's image."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as c:
        return {t: summary_ms(latency_series(c, t, png, n, max_seconds)) for t, png in images.items()}


def bare_ort_latency(art, images: dict, n: int, thread_counts) -> dict:
    """p50/p99 of one plain onnxruntime session per task graph (ONNX Runtime's defaults but the
    thread count), batch 1, in this process, for each of ``thread_counts``; ``p50_ms``/``p99_ms``
    are those of the fastest (lowest p50) setting, so the overhead against it is not flattered."""
    out = {}
    for t in art.tasks:
        x = model_input(art, t, images[t])
        runs = {}
        for threads in dict.fromkeys(thread_counts):
            session = plain_session(art.graph_path(t), threads)
            runs[str(threads)] = summary_ms(run_times(session, x, n))
            del session
        best = min(runs, key=lambda k: runs[k]["p50_ms"])
        out[t] = dict(runs[best], threads=int(best), by_threads=runs)
    return out


def scrape(url: str) -> dict:
    """The server's counters that throughput reads: segment seconds (all, shared) and engine rows and batches."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {
        "seg_shared": metric_value(text, "mutask_segment_seconds_total", shared="true"),
        "seg_all": metric_value(text, "mutask_segment_seconds_total"),
        "rows": metric_value(text, "mutask_engine_batch_size_sum"),
        "batches": metric_value(text, "mutask_engine_batch_size_count"),
    }


def throughput(server: ServerProcess, images: dict, concurrency: int, n: int, max_seconds: float) -> dict:
    """One throughput point (tasks round-robin), with the shared-segment share of compute, the
    mean engine batch and the server's CPU milliseconds per request over exactly that point
    (counters read before and after)."""
    url = server.url
    before, cpu0 = scrape(url), server.cpu_seconds()
    res = closed_loop(url, [(t, png, None) for t, png in images.items()], concurrency, n, max_seconds)
    cpu1, after = server.cpu_seconds(), scrape(url)
    d = {k: after[k] - before[k] for k in after}
    res["shared_compute_share"] = d["seg_shared"] / d["seg_all"] if d["seg_all"] > 0 else None
    res["mean_engine_batch"] = d["rows"] / d["batches"] if d["batches"] > 0 else None
    res["server_cpu_ms_per_request"] = 1e3 * (cpu1 - cpu0) / res["requests"] if res["requests"] else None
    return res


def throughput_curve(servers: dict, images: dict, curve: list[int], repeats: int, requests: int, max_seconds: float) -> dict:
    """Every point of ``curve`` on every server, ``repeats`` times, the servers' order
    alternating between repeats; the raw runs, by mode and concurrency."""
    runs: dict = {m: {c: [] for c in curve} for m in servers}
    for r in range(repeats):
        for c in curve:
            for m in (MODES if r % 2 == 0 else MODES[::-1]):
                res = throughput(servers[m], images, c, max(requests, 4 * c), max_seconds)
                runs[m][c].append(res)
                print(f"  repeat {r + 1} {m:<8} c={c:<3} {res['rps']:8.1f} req/s  batch {res['mean_engine_batch'] or 0:.2f}  "
                      f"server CPU {res['server_cpu_ms_per_request'] or 0:.2f} ms/request", flush=True)
    return runs


def summarize_curve(runs: dict, curve: list[int]) -> dict:
    """Medians over the repeats of each point: requests/s, mean engine batch, shared share,
    server CPU per request; errors summed. ``paired``: each repeat's ratio of the two servers
    (measured back to back), their median and range: the machine's drift cancels within a pair."""
    def med(xs, key):
        vals = [x[key] for x in xs if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    out = {}
    for c in curve:
        point = {
            m: {"rps_median": med(runs[m][c], "rps"), "rps_all": [x["rps"] for x in runs[m][c]],
                "mean_engine_batch": med(runs[m][c], "mean_engine_batch"), "errors": sum(x["errors"] for x in runs[m][c]),
                "transport_errors": sum(x.get("transport_errors", 0) for x in runs[m][c]),
                "shared_compute_share": med(runs[m][c], "shared_compute_share"),
                "server_cpu_ms_per_request": med(runs[m][c], "server_cpu_ms_per_request"),
                "seconds": sum(x["seconds"] for x in runs[m][c]), "requests": sum(x["requests"] for x in runs[m][c])}
            for m in runs
        }
        if set(MODES) <= set(runs):
            ratios = [a["rps"] / b["rps"] for a, b in zip(runs["segments"][c], runs["per_task"][c]) if b["rps"]]
            cpu = [a["server_cpu_ms_per_request"] / b["server_cpu_ms_per_request"]
                   for a, b in zip(runs["segments"][c], runs["per_task"][c]) if a.get("server_cpu_ms_per_request") and b.get("server_cpu_ms_per_request")]
            point["paired"] = {"rps_ratios": ratios, "rps_ratio_median": statistics.median(ratios) if ratios else None,
                               "cpu_ratios": cpu, "cpu_ratio_median": statistics.median(cpu) if cpu else None}
        out[str(c)] = point
    return out


def measure_servers(a, art, images: dict, curve: list[int], threads: int) -> dict:
    """Both servers started, warmed and measured (memory at rest, latency, the throughput
    curve, memory after), then stopped."""
    tmp = Path(tempfile.mkdtemp(prefix="mutask-serving-bench-"))
    try:
        servers = start_servers(Path(a.artifact).resolve(), tmp, a.device)
        try:
            print(f"servers ready: {', '.join(f'{m} {s.url}' for m, s in servers.items())}", flush=True)
            for s in servers.values():
                http_latency(s.url, images, 3, a.max_seconds)
            memory = {m: s.worker_rss() for m, s in servers.items()}
            print("latency at batch 1 ...", flush=True)
            latency = {m: http_latency(servers[m].url, images, a.requests, a.max_seconds) for m in MODES}
            bare = bare_ort_latency(art, images, a.requests, (threads, default_threads()))
            print("throughput ...", flush=True)
            runs = throughput_curve(servers, images, curve, a.repeats, a.requests, a.max_seconds)
            memory_after = {m: s.worker_rss() for m, s in servers.items()}
        except BaseException:
            for m, s in servers.items():  # what the servers said before the temporary directory goes
                print(f"--- server {m}: exit code {s.proc.poll()}, log tail:\n{s.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            for s in servers.values():
                s.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"latency": latency, "bare": bare, "curve": summarize_curve(runs, curve), "memory": memory, "memory_after": memory_after}


# ---------------------------------------------------------------------------- the engine alone


def measure_engine(art, images: dict, repeats: int, threads: int, device: str) -> dict:
    """Engine throughput at 1, 8 and 32 requests per batch, segment cost by rows, engine memory."""
    print("engine only (no HTTP) ...", flush=True)
    return {
        "engine_only": {str(b): engine_bench.engine_throughput(art, images, b, max(3, repeats), threads, device) for b in (1, 8, 32)},
        "block_scaling": {str(n): engine_bench.block_scaling(art, n, device) for n in sorted({1, threads})},
        "engine_memory": engine_bench.engine_memory(art.path.resolve(), threads, device),
    }


# ---------------------------------------------------------------------------- the record


def build_doc(a, art, stats: dict, curve: list[int], threads: int, http: dict, engine: dict, wall: float) -> dict:
    return {
        "artifact": str(Path(a.artifact).resolve()),
        "tasks": list(art.tasks),
        "weights": engine["engine_memory"]["segments"].get("weights"),  # how the server's sessions hold them
        "segments": {sid: {"tasks": s.tasks, "parents": s.parents, "components": s.components} for sid, s in art.segments.items()},
        "settings": {"repeats": a.repeats, "requests": a.requests, "concurrency": curve, "max_seconds": a.max_seconds, "device": a.device,
                     "ort_threads_bare_and_engine_only": threads, "ort_threads_server": default_threads()},
        "latency_batch1": {t: {"http": http["latency"]["segments"][t], "http_per_task_server": http["latency"]["per_task"][t],
                               "bare_onnxruntime": http["bare"][t]} for t in art.tasks},
        "throughput": http["curve"],
        **engine,
        "memory": {
            "unique_weight_bytes": stats["unique_param_bytes"],
            "naive_weight_bytes_one_model_per_task": stats["naive_bytes"],
            "at_rest": http["memory"],
            "after_load": http["memory_after"],
        },
        "wall_seconds": wall,
        "machine": serving_machine(),
    }


def latency_md(doc: dict) -> list[str]:
    s = doc["settings"]
    threads, server = s["ort_threads_bare_and_engine_only"], s["ort_threads_server"]
    lines = [
        "## Latency at batch 1 (ms; sequential requests)",
        "",
        f"Bare ORT: one session of the task's graph in the benchmark process with ONNX Runtime's defaults (threads spin "
        f"between runs, weights pre-packed), at {threads} and at {server} intra-op thread(s), whichever had the lower "
        f"p50 (the column 'bare threads'); the server: {server} thread(s) per session, no spinning, weights "
        f"{'pre-packed, from its one pool' if doc.get('weights', 'store') == 'prepacked' else 'from its shared store (not pre-packed)'}.",
        "",
        "| task | HTTP p50 | HTTP p99 | bare ORT p50 | bare ORT p99 | bare threads | HTTP overhead p50 | per-task-graph server: HTTP p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, rec in doc["latency_batch1"].items():
        h, o = rec["http"], rec["bare_onnxruntime"]
        lines.append(
            f"| {t} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | {o['p50_ms']:.2f} | {o['p99_ms']:.2f} | {o['threads']} | {h['p50_ms'] - o['p50_ms']:.2f} | "
            f"{rec['http_per_task_server']['p50_ms']:.2f} |"
        )
    return lines


def median_interval(values: list[float], level: float = 0.95, resamples: int = 10_000) -> tuple[float, float]:
    """A percentile-bootstrap interval for the median of ``values`` (a fixed seed: the record
    renders the same from its JSON)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    idx = np.random.default_rng(0).integers(0, len(v), (resamples, len(v)))
    meds = np.median(v[idx], axis=1)
    return float(np.quantile(meds, (1 - level) / 2)), float(np.quantile(meds, 1 - (1 - level) / 2))


def throughput_md(doc: dict) -> list[str]:
    s = doc["settings"]
    lines = [
        f"## Mixed-task throughput (requests/s, median of {s['repeats']}; tasks round-robin; "
        f"{s['requests']} requests per server and repeat at least)",
        "",
        "| concurrency | segment graph | one session per task | speed-up (ratio of medians) | speed-up (median of paired repeats, 95 % interval) | paired range | "
        "server CPU ms/request: segment graph | per task | segment-graph mean batch | per-task mean batch | shared-segment share of compute | errors: segment graph / per task |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, point in doc["throughput"].items():
        tr, pt = point["segments"], point["per_task"]
        sp = tr["rps_median"] / pt["rps_median"] if tr["rps_median"] and pt["rps_median"] else float("nan")
        share = tr["shared_compute_share"]
        paired = point.get("paired") or {}
        ratios = paired.get("rps_ratios") or []
        pm = f"{paired['rps_ratio_median']:.3f}x" if paired.get("rps_ratio_median") else "-"
        if len(ratios) >= 3:
            lo, hi = median_interval(ratios)
            pm += f" ({lo:.2f}-{hi:.2f})"
        rng = f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"

        def cpu(rec):
            v = rec.get("server_cpu_ms_per_request")
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"| {c} | {tr['rps_median']:.1f} | {pt['rps_median']:.1f} | {sp:.3f}x | {pm} | {rng} | {cpu(tr)} | {cpu(pt)} | "
            f"{tr['mean_engine_batch'] or 0:.2f} | {pt['mean_engine_batch'] or 0:.2f} | {'-' if share is None else f'{share:.1%}'} | "
            f"{tr['errors']} / {pt['errors']} |"
        )
    return lines + [
        "",
        "Each repeat measures the two servers back to back (their order alternating), so a repeat's ratio is "
        "measured under the same machine load (the interval: a bootstrap of the paired ratios' median, 10,000 "
        "resamples); 'server CPU' is the CPU time of the server's whole process "
        "tree over the point divided by its requests (what the server does per request: steadier than requests/s, "
        "though contention for the cores still raises it).",
    ]


def engine_md(doc: dict) -> list[str]:
    lines = [
        "## Engine only, no HTTP (images/s, mixed tasks round-robin, one image per request)",
        "",
        "| requests per batch | segment graph (pre-packed pool) | one session per task | speed-up | unpacked weight store | each session loading its own weights |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b, e in doc["engine_only"].items():
        tr, pt, own = (e[k]["images_per_s_median"] for k in ("segments", "per_task", "segments_own_weights"))
        store = e.get("segments_store", {}).get("images_per_s_median")
        store_cell = f"{store:.0f} ({store / pt:.2f}x)" if store else "-"
        lines.append(f"| {b} | {tr:.0f} | {pt:.0f} | {tr / pt:.2f}x | {store_cell} | {own:.0f} ({own / pt:.2f}x) |")
    return lines


def scaling_md(doc: dict) -> list[str]:
    scaling = doc["block_scaling"]
    first = next(iter(scaling.values()))
    lines = [
        f"## What batching rows together saves here: one run of segment {first['segment']} ({', '.join(first['components'])}; "
        f"shared by {len(first['tasks'])} tasks) by rows (µs per run; median of {first['repeats']})",
        "",
        "| ONNX Runtime threads | " + " | ".join(f"{n} rows" for n in first["seconds_per_run"]) + " | µs per row at 1 row | at the most rows |",
        "|---:|" + "---:|" * (len(first["seconds_per_run"]) + 2),
    ]
    for th, sc in scaling.items():
        runs = sc["seconds_per_run"]
        most = max(runs, key=int)
        lines.append(f"| {th} | " + " | ".join(f"{v * 1e6:.0f}" for v in runs.values()) + f" | {runs['1'] * 1e6:.0f} | {runs[most] / int(most) * 1e6:.0f} |")
    return lines


def engine_memory_md(doc: dict) -> list[str]:
    em, unique = doc["engine_memory"], doc["memory"]["unique_weight_bytes"]

    def mib(rec, key):
        return f"{rec[key] * MIB:.1f}" if rec.get(key) is not None else "-"

    lines = [
        "## Memory one engine adds to a fresh process (after loading, verifying and running every task; one measurement each)",
        "",
        "| engine | sessions | PSS added (MiB) | RSS added (MiB) | weights it holds (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {
        "segments": "segment graph + task graphs, one pre-packed weight pool (the server on CPU)",
        "segments_store": "segment graph + task graphs, one unpacked weight store (the server on CUDA)",
        "per_task": "one session per task graph, own weights",
        "segments_own_weights": "segment graph + task graphs, each session its own weights",
    }
    for name, label in labels.items():
        rec = em.get(name)
        if rec:
            held = f"{rec['weight_store_bytes'] * MIB:.2f} ({rec['weight_store_bytes'] / unique:.2f}x unique)" if rec.get("weight_store_bytes") else "-"
            lines.append(f"| {label} | {rec['sessions']} | {mib(rec, 'pss_delta_bytes')} | {mib(rec, 'rss_delta_bytes')} | {held} |")
    return lines + [
        "",
        f"Unique weights {unique * MIB:.2f} MiB. PSS is the honest figure: the sessions map the pre-packed pool in many "
        "pieces, and RSS counts a page once per mapping. The pool holds each distinct weight and each distinct pre-packed "
        "form once (a test proves it); the store is the weights file read once (a test proves no session copies it). "
        "Beyond the engine, the worker's memory below is the fixed runtime (Python, BentoML, ONNX Runtime).",
    ]


def server_memory_md(doc: dict) -> list[str]:
    mem, s, m = doc["memory"], doc["settings"], doc["machine"]
    unique = mem["unique_weight_bytes"]
    lines = ["## Memory (worker process)", "", "| server | PSS at rest (MiB) | PSS after load (MiB) | RSS after load (MiB) | PSS / unique weights |", "|---|---:|---:|---:|---:|"]
    for mode, label in (("segments", "segment graph (each weight once)"), ("per_task", "one session per task graph")):
        r0, r1 = mem["at_rest"][mode], mem["after_load"][mode]
        p0, p1 = r0.get("worker_pss"), r1.get("worker_pss")
        if p0 and p1:
            lines.append(f"| {label} | {p0 * MIB:.1f} | {p1 * MIB:.1f} | {r1['worker_rss'] * MIB:.1f} | {p1 / unique:.1f}x |")
        else:
            lines.append(f"| {label} | - | - | - | - |")
    return lines + [
        "",
        f"Unique weight bytes: {unique * MIB:.2f} MiB; one full model per task would hold {mem['naive_weight_bytes_one_model_per_task'] * MIB:.2f} MiB.",
        f"Client and servers share this machine's {m['cpu_affinity'] or m['cpu_count']} cores (loopback); "
        f"ONNX Runtime threads per server: {s['ort_threads_server']} (the server's default), per bare onnxruntime session and engine-only "
        f"measurement: {s['ort_threads_bare_and_engine_only']}. Wall time {doc['wall_seconds']:.0f} s.",
    ]


def to_markdown(doc: dict) -> str:
    sections = [latency_md, throughput_md, engine_md, scaling_md, engine_memory_md, server_memory_md]
    lines = [f"# Serving benchmark ({len(doc['tasks'])} tasks, {len(doc['segments'])} segments)"]
    for section in sections:
        lines += [""] + section(doc)
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    curve = [int(c) for c in a.concurrency.split(",") if c.strip()]
    from mutask.export.artifact import artifact_stats, load_artifact

    art = load_artifact(a.artifact)
    stats = artifact_stats(a.artifact)
    images = {t: pngs[0] for t, pngs in noise_pngs(art).items()}
    threads = cpu_count()
    t_start = time.perf_counter()
    http = measure_servers(a, art, images, curve, threads)
    engine = measure_engine(art, images, a.repeats, threads, a.device)
    doc = build_doc(a, art, stats, curve, threads, http, engine, time.perf_counter() - t_start)
    md = to_markdown(doc)
    j, m = write(a.name, doc, md, a.out)
    print(md)
    print(f"\nwrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
