"""Baseline: mutask's server against the minimal BentoML service a user would write instead.

    python -m mutask.benchmarks.baseline_bench ART [--repeats 3] [--requests 100] [--concurrency 8,32]

Starts two real servers on loopback, free ports, each in its own process group with its own
BentoML home and Prometheus directory, always stopped at the end: ``mutask serve ART --device
cpu`` and ``bentoml serve mutask.benchmarks.minimal_service:Minimal`` (one plain ONNX Runtime
session per task graph, ONNX Runtime's and BentoML's defaults). In one run, repeats
interleaved (the servers' order alternates), medians over the repeats, it records

1. per task, HTTP p50 and p99 at batch 1 (one request at a time, a noise PNG at the task's
   size) on each server, and the bare run time of the task's graph in this process (one plain
   onnxruntime session, ONNX Runtime's defaults): overhead = HTTP p50 - bare p50;
2. mixed-task throughput (requests/s) under each number of concurrent clients, tasks
   round-robin, every answer checked against a plain onnxruntime run of the task's graph;
3. each server's worker RSS after the run;

and the ratios mutask / minimal per task and per concurrency. Writes ``baseline.json`` and
``baseline.md`` to the results directory (default benchmarks/results/). Imports no torch.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mutask.benchmarks.common import RESULTS, serving_machine, write
from mutask.benchmarks.measure import closed_loop, http_latency, model_input, noise_pngs, plain_session, run_times, summary_ms
from mutask.server_process import ServerProcess, ServiceProcess, child_env, free_port
from mutask.serving.settings import default_threads

SERVERS = ("mutask", "minimal")
MINIMAL = "mutask.benchmarks.minimal_service:Minimal"
MIB = 1 / (1024 * 1024)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.baseline_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ART", help="artifact directory written by `mutask export`")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every measurement (interleaved; medians)")
    p.add_argument("--requests", type=int, default=100, help="requests per latency series and per throughput point")
    p.add_argument("--concurrency", default="8,32", help="comma-separated numbers of concurrent clients (default 8,32)")
    p.add_argument("--images-per-task", type=int, default=4, help="noise images per task for the throughput runs (default 4)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time cap per measurement")
    p.add_argument("--results", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    return p.parse_args(argv)


def start_servers(art_path: Path, tmp: Path) -> dict[str, ServiceProcess]:
    """Both servers started, then waited for; any that started is stopped if one fails."""
    def env(name: str, **extra) -> dict:
        prom = tmp / f"prometheus-{name}"
        prom.mkdir(parents=True, exist_ok=True)
        return child_env({"BENTOML_HOME": tmp / f"bentoml-home-{name}", "PROMETHEUS_MULTIPROC_DIR": prom, **extra})

    servers: dict[str, ServiceProcess] = {}
    try:
        servers["mutask"] = ServerProcess(art_path, log_path=tmp / "mutask.log", env=env("mutask"), args=["--device", "cpu"])
        port = free_port()
        command = [sys.executable, "-m", "bentoml", "serve", MINIMAL, "--host", "127.0.0.1", "--port", str(port), "--working-dir", str(tmp)]
        servers["minimal"] = ServiceProcess(command, port=port, log_path=tmp / "minimal.log", env=env("minimal", MUTASK_ARTIFACT=art_path))
        for s in servers.values():
            s.wait_ready()
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers: dict) -> None:
    """Stop every server, even if stopping one fails."""
    errors = []
    for s in servers.values():
        try:
            s.stop()
        except Exception as e:  # the others are still stopped
            errors.append(e)
    if errors:
        raise errors[0]


def references(art, per_task: int) -> tuple[list, dict]:
    """The jobs ``(task, png, expected index)``, tasks interleaved, the expectation from a plain
    onnxruntime session of the task's graph (ONNX Runtime's defaults); and those sessions."""
    pngs = noise_pngs(art, per_task)
    sessions = {t: plain_session(art.graph_path(t)) for t in art.tasks}
    jobs = []
    for i in range(per_task):
        for t in art.tasks:
            logits = sessions[t].run(None, {sessions[t].get_inputs()[0].name: model_input(art, t, pngs[t][i])})[0]
            jobs.append((t, pngs[t][i], int(logits[0].argmax())))
    return jobs, sessions


def check_answers(servers: dict, jobs: list) -> dict:
    """Every job once to every server (also the warm-up): answers that differ from the reference."""
    import httpx

    out = {}
    for name, s in servers.items():
        with httpx.Client(base_url=s.url, timeout=60) as c:
            wrong = 0
            for task, png, expected in jobs:
                r = c.post("/predict", data={"task": task}, files={"image": ("x.png", png, "image/png")})
                r.raise_for_status()
                wrong += r.json()["index"] != expected
        out[name] = {"answers": len(jobs), "wrong": wrong}
    return out


def latency(servers: dict, art, jobs: list, sessions: dict, repeats: int, n: int, max_seconds: float) -> dict:
    """Per task and repeat: the bare run, then each server (order alternating by repeat), one
    request at a time; per task the medians over the repeats of each series' p50 and p99."""
    import httpx

    first = {t: png for t, png, _ in reversed(jobs)}
    runs = {t: {k: [] for k in ("bare_onnxruntime", *SERVERS)} for t in art.tasks}
    clients = {name: httpx.Client(base_url=s.url, timeout=60) for name, s in servers.items()}
    try:
        for r in range(repeats):
            for t in art.tasks:
                runs[t]["bare_onnxruntime"].append(summary_ms(run_times(sessions[t], model_input(art, t, first[t]), n)))
                for name in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
                    runs[t][name].append(summary_ms(http_latency(clients[name], t, first[t], n, max_seconds)))
            print(f"  latency repeat {r + 1}: " + ", ".join(f"{t} {runs[t]['mutask'][-1]['p50_ms']:.2f}/{runs[t]['minimal'][-1]['p50_ms']:.2f} ms" for t in art.tasks), flush=True)
    finally:
        for c in clients.values():
            c.close()
    out = {}
    for t, by in runs.items():
        rec = {k: {"p50_ms": statistics.median(x["p50_ms"] for x in v), "p99_ms": statistics.median(x["p99_ms"] for x in v), "runs": v} for k, v in by.items()}
        bare = rec["bare_onnxruntime"]["p50_ms"]
        rec["overhead_p50_ms"] = {name: rec[name]["p50_ms"] - bare for name in SERVERS}
        rec["ratio_p50"] = rec["mutask"]["p50_ms"] / rec["minimal"]["p50_ms"]
        rec["ratio_p99"] = rec["mutask"]["p99_ms"] / rec["minimal"]["p99_ms"]
        out[t] = rec
    return out


def throughput(servers: dict, jobs: list, curve: list[int], repeats: int, n: int, max_seconds: float) -> dict:
    """Every number of clients on each server, ``repeats`` times, the servers' order alternating;
    per point the median requests/s, errors and wrong answers summed, the ratio of medians."""
    runs = {c: {name: [] for name in SERVERS} for c in curve}
    for r in range(repeats):
        for c in curve:
            for name in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
                res = closed_loop(servers[name].url, jobs, c, max(n, 4 * c), max_seconds)
                runs[c][name].append(res)
                print(f"  repeat {r + 1} {name:<7} c={c:<3} {res['rps']:8.1f} req/s  errors {res['errors']}  wrong {res['wrong']}", flush=True)
    out = {}
    for c, by in runs.items():
        point = {name: {"rps_median": statistics.median(x["rps"] for x in v), "rps_all": [x["rps"] for x in v],
                        "requests": sum(x["requests"] for x in v), "errors": sum(x["errors"] for x in v), "wrong": sum(x["wrong"] for x in v)}
                 for name, v in by.items()}
        point["ratio_rps"] = point["mutask"]["rps_median"] / point["minimal"]["rps_median"] if point["minimal"]["rps_median"] else None
        out[str(c)] = point
    return out


def measure(a, art, curve: list[int]) -> dict:
    """Both servers started, checked, measured and stopped."""
    jobs, sessions = references(art, a.images_per_task)
    tmp = Path(tempfile.mkdtemp(prefix="mutask-baseline-bench-"))
    try:
        servers = start_servers(art.path.resolve(), tmp)
        try:
            print(f"servers ready: {', '.join(f'{n} {s.url}' for n, s in servers.items())}", flush=True)
            check = check_answers(servers, jobs)
            print("latency at batch 1 ...", flush=True)
            lat = latency(servers, art, jobs, sessions, a.repeats, a.requests, a.max_seconds)
            print("throughput ...", flush=True)
            tp = throughput(servers, jobs, curve, a.repeats, a.requests, a.max_seconds)
            memory = {name: s.worker_rss() for name, s in servers.items()}
        finally:
            stop_all(servers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"answers_checked": check, "latency_batch1": lat, "throughput": tp, "memory_after_run": memory}


def to_markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [
        f"# Baseline: mutask against a minimal BentoML service ({len(doc['tasks'])} tasks)",
        "",
        "mutask: `mutask serve ART --device cpu` (task graphs over one pre-packed weight pool, cross-task batching, "
        f"{s['mutask_ort_threads']} ONNX Runtime thread(s) per session). minimal: `benchmarks/minimal_service.py` "
        "(one plain ONNX Runtime session per task graph, ONNX Runtime's and BentoML's defaults). Both on loopback, "
        f"one worker each; client and servers share this machine's cores. Medians over {s['repeats']} interleaved repeats. "
        "Ratios are mutask / minimal: below 1 is faster for latency, above 1 is more for throughput.",
        "",
        f"## Latency at batch 1 (ms; up to {s['requests']} requests one at a time per series)",
        "",
        "| task | mutask p50 | minimal p50 | ratio p50 | mutask p99 | minimal p99 | ratio p99 | bare ORT p50 | mutask overhead p50 | minimal overhead p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, r in doc["latency_batch1"].items():
        mu, mi, o = r["mutask"], r["minimal"], r["overhead_p50_ms"]
        lines.append(f"| {t} | {mu['p50_ms']:.2f} | {mi['p50_ms']:.2f} | {r['ratio_p50']:.2f} | {mu['p99_ms']:.2f} | {mi['p99_ms']:.2f} | "
                     f"{r['ratio_p99']:.2f} | {r['bare_onnxruntime']['p50_ms']:.2f} | {o['mutask']:.2f} | {o['minimal']:.2f} |")
    lines += [
        "",
        "## Mixed-task throughput (requests/s; tasks round-robin; every answer checked against plain onnxruntime)",
        "",
        "| clients | mutask | minimal | ratio | requests (mutask, minimal) | errors (mutask, minimal) | wrong answers (mutask, minimal) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, p in doc["throughput"].items():
        mu, mi = p["mutask"], p["minimal"]
        ratio = "-" if p["ratio_rps"] is None else f"{p['ratio_rps']:.2f}"
        lines.append(f"| {c} | {mu['rps_median']:.1f} | {mi['rps_median']:.1f} | {ratio} | {mu['requests']}, {mi['requests']} | "
                     f"{mu['errors']}, {mi['errors']} | {mu['wrong']}, {mi['wrong']} |")
    mem, check = doc["memory_after_run"], doc["answers_checked"]
    lines += ["", "## Worker RSS after the run (MiB)", "", "| mutask | minimal |", "|---:|---:|",
              "| " + " | ".join(f"{mem[n]['worker_rss'] * MIB:.1f}" if mem[n]["worker_rss"] else "-" for n in SERVERS) + " |",
              "", f"Before measuring, every image to each server once: wrong answers mutask {check['mutask']['wrong']} of "
              f"{check['mutask']['answers']}, minimal {check['minimal']['wrong']} of {check['minimal']['answers']}. Wall time {doc['wall_seconds']:.0f} s."]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    curve = [int(c) for c in a.concurrency.split(",") if c.strip()]
    from mutask.export.artifact import load_artifact

    art = load_artifact(a.artifact)
    t0 = time.perf_counter()
    results = measure(a, art, curve)
    doc = {
        "benchmark": "baseline",
        "artifact": str(art.path.resolve()),
        "tasks": list(art.tasks),
        "settings": {"repeats": a.repeats, "requests": a.requests, "concurrency": curve, "images_per_task": a.images_per_task,
                     "max_seconds": a.max_seconds, "device": "cpu", "mutask_ort_threads": default_threads(),
                     "minimal": "ONNX Runtime defaults (CPUExecutionProvider); BentoML defaults (1 worker, sync API)"},
        "repeats": a.repeats,
        **results,
        "wall_seconds": time.perf_counter() - t0,
        "machine": serving_machine(),
    }
    md = to_markdown(doc)
    j, m = write("baseline", doc, md, a.results)
    print(md)
    print(f"\nwrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
