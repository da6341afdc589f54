"""Serving overhead: where one /predict's time goes, /predict against bare ONNX Runtime, and
throughput against an earlier commit's server.

    python -m mutask.benchmarks.serving_bench ART [--part profile,latency,throughput]
        [--pairs 10] [--before /tmp/old-serve] [--clients 1,8,32]

1. ``profile``: :mod:`mutask.benchmarks.request_timeline` (the service in process,
   ``--requests`` sequential /predict of one task, the wall time of each stage on whichever
   thread runs it) for this tree and for ``--before``'s, each in its own process.
2. ``latency``: a real ``mutask serve ART`` on loopback, one keep-alive client, batch 1, against
   a bare ONNX Runtime session of the same task graph with the server's own session options
   (:func:`mutask.serving.engine.session_options`, its thread count) on the same
   preprocessed input; ``--pairs`` interleaved blocks of ``--requests``, p50/p99 of each, and
   the per-pair difference of p50s.
3. ``throughput``: this tree's server and the server of ``--before`` (a checkout of an earlier
   commit, run with ``PYTHONPATH`` there), closed loops of mixed-task clients at each of
   ``--clients``, ``--pairs`` interleaved pairs per point (the order alternating), the median
   of the paired requests/s ratios (this / before) with a 95 % bootstrap interval.

Client and servers share the machine's cores (loopback). Writes ``NAME.json`` and ``NAME.md``
(default ``serving``) in benchmarks/results. Imports no torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mutask.benchmarks.harness import RESULTS, SHARED, commit_of, fmt_ratio, interleave, median, paired_ratio, times, write_record
from mutask.benchmarks.measure import closed_loop, model_input, noise_pngs, pct, post_predict
from mutask.server_process import ServerProcess, child_env

def profile(art_path: Path, n: int, before: str | None) -> dict:
    """:mod:`mutask.benchmarks.request_timeline` of this tree, and of ``before`` (a checkout)
    where it exists, each in its own process."""
    import json
    import os
    import subprocess

    script = Path(__file__).with_name("request_timeline.py")
    out = {}
    for name, tree in (("this", None), ("before", before)):
        if name == "before" and not (before and Path(before, "serving").is_dir()):
            continue
        env = dict(os.environ, **({"PYTHONPATH": str(Path(tree).resolve())} if tree else {}))
        run = subprocess.run([sys.executable, str(script), str(art_path), "--requests", str(n)], env=env,
                             capture_output=True, text=True, check=True)
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
    if "before" in out:
        out["before_commit"] = commit_of(before)
    return out


def start(art_path: Path, tmp: Path, name: str, pythonpath: str | None = None) -> ServerProcess:
    """A ready ``mutask serve`` on CPU with its own BentoML home and Prometheus directory;
    ``pythonpath``: run another checkout's code."""
    (tmp / f"prom-{name}").mkdir(parents=True, exist_ok=True)
    env = {"BENTOML_HOME": tmp / f"home-{name}", "PROMETHEUS_MULTIPROC_DIR": tmp / f"prom-{name}", **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    srv = ServerProcess(art_path, log_path=tmp / f"server-{name}.log", env=child_env(env), args=["--device", "cpu"])
    srv.wait_ready(300)
    return srv


def refused(client, png: bytes, n: int, idle_s: float) -> list[float]:
    """Seconds of ``n`` /predict of an unknown task (404), each after ``idle_s`` untimed."""
    import time

    out = []
    for _ in range(n):
        time.sleep(idle_s)
        t0 = time.perf_counter()
        post_predict(client, "-", png)
        out.append(time.perf_counter() - t0)
    return out


def latency(art, pngs: dict, tmp: Path, pairs: int, n: int) -> dict:
    import httpx
    import onnxruntime as ort

    from mutask.serving.engine import session_options
    from mutask.serving.settings import default_threads

    task = next(iter(pngs))
    bare = ort.InferenceSession(str(art.graph_path(task)), session_options(default_threads()), providers=["CPUExecutionProvider"])
    feed = {bare.get_inputs()[0].name: model_input(art, task, pngs[task])}
    series = {"http": [], "bare": [], "refused": [], "decode": []}
    with start(art.path, tmp, "latency") as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        blocks = {"http": lambda: times(lambda: post_predict(c, task, pngs[task]).raise_for_status(), n),
                  "bare": lambda: times(lambda: bare.run(None, feed), n, warmup=5),
                  # the floor under any model: the same request refused (an unknown task: HTTP, the
                  # body read and parsed, a 404) after as long idle as the model runs (an idle
                  # machine answers slower: its cores sleep), and the image decoded and preprocessed
                  "refused": lambda: refused(c, pngs[task], n, pct(series["bare"][-1], 50) if series["bare"] else 0.0),
                  "decode": lambda: times(lambda: model_input(art, task, pngs[task]), n, warmup=5)}

        def block(name):
            series[name].append(blocks[name]())
            return pct(series[name][-1], 50)

        runs = interleave({name: (lambda i, name=name: block(name)) for name in blocks}, pairs, warmup=1)
    flat = {k: [t for block in v[1:] for t in block] for k, v in series.items()}  # the warm-up block dropped
    diffs = [1e3 * (a - b) for a, b in zip(runs["http"], runs["bare"])]
    return {
        "task": task, "pairs": pairs, "requests_per_block": n, "ort_threads": default_threads(),
        "http_p50_ms": 1e3 * pct(flat["http"], 50), "http_p99_ms": 1e3 * pct(flat["http"], 99),
        "bare_p50_ms": 1e3 * pct(flat["bare"], 50), "bare_p99_ms": 1e3 * pct(flat["bare"], 99),
        "p50_difference_ms_median_of_pairs": median(diffs), "p50_difference_ms_per_pair": diffs,
        "refused_p50_ms": 1e3 * pct(flat["refused"], 50), "decode_p50_ms": 1e3 * pct(flat["decode"], 50),
        "floor_ms_median_of_pairs": median([1e3 * (a + b) for a, b in zip(runs["refused"], runs["decode"])]),
    }


def throughput(art, pngs: dict, tmp: Path, before: str, pairs: int, clients: list[int], seconds: float) -> dict:
    jobs = list(pngs.items())
    servers = {"this": start(art.path, tmp, "this"), "before": start(art.path, tmp, "before", pythonpath=before)}
    out = {}
    try:
        for k in clients:
            details = {name: [] for name in servers}

            def point(name, k=k, details=details):
                r = closed_loop(servers[name].url, jobs, k, 10**9, seconds)
                details[name].append(r)
                if r["errors"]:
                    raise RuntimeError(f"{name} at {k} clients: {r}")
                return r["rps"]

            runs = interleave({name: (lambda i, name=name: point(name)) for name in servers}, pairs, warmup=1)
            out[str(k)] = {
                "rps_this": runs["this"], "rps_before": runs["before"],
                "median_rps_this": median(runs["this"]), "median_rps_before": median(runs["before"]),
                "ratio": paired_ratio(runs["this"], runs["before"]),
            }
            print(k, fmt_ratio(out[str(k)]["ratio"]), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return {"before": before, "before_commit": commit_of(before), "pairs": pairs, "seconds_per_measurement": seconds, "points": out}


def to_markdown(doc: dict) -> str:
    lines = [f"# Serving overhead ({doc['artifact_name']}: {len(doc['tasks'])} tasks)", ""]
    if "profile" in doc:
        pr = doc["profile"]
        whose = [k for k in ("this", "before") if k in pr]
        p = pr["this"]
        before = f" and the commit before ({pr.get('before_commit')})" if "before" in pr else ""
        lines += [
            f"## Where one /predict's time goes: this tree{before} ({p['requests']} requests of task {p['task']}, "
            f"a {p['image_bytes'] / 1024:.0f} KB noise PNG at {p['image_size']} px)", "", f"{p['note']}.", "",
            "| stage (median ms) | " + " | ".join(whose) + " |", "|---|" + "---:|" * len(whose),
            *[f"| {k} | " + " | ".join(f"{pr[w]['stages_ms_p50'][k]:.3f}" for w in whose) + " |" for k in p["stages_ms_p50"]],
            "| **total** | " + " | ".join(f"**{pr[w]['total_ms_p50']:.3f}**" for w in whose) + " |",
            "| total outside ONNX Runtime | " + " | ".join(f"{pr[w]['outside_onnxruntime_ms_p50']:.3f}" for w in whose) + " |", "",
        ]
    if "latency" in doc:
        lt = doc["latency"]
        lines += [
            f"## /predict against bare ONNX Runtime, batch 1 (task {lt['task']}, {lt['pairs']} interleaved pairs of {lt['requests_per_block']} requests)", "",
            "| | p50 (ms) | p99 (ms) |", "|---|---:|---:|",
            f"| POST /predict over loopback HTTP (one keep-alive client) | {lt['http_p50_ms']:.3f} | {lt['http_p99_ms']:.3f} |",
            f"| bare ONNX Runtime, the server's session options ({lt['ort_threads']} threads), same graph and input | {lt['bare_p50_ms']:.3f} | {lt['bare_p99_ms']:.3f} |",
            "", f"p50(/predict) - p50(bare ORT), median over pairs: **{lt['p50_difference_ms_median_of_pairs']:.3f} ms** (goal <= 1.5 ms).", "",
        ]
        if "floor_ms_median_of_pairs" in lt:
            lines += [
                f"The floor under any model, for this image: the same request refused (an unknown task: HTTP, the body "
                f"read and parsed, a 404), each after idling as long as bare ONNX Runtime's p50, p50 {lt['refused_p50_ms']:.3f} ms, plus decoding and preprocessing the image "
                f"(in the client, warm caches) p50 {lt['decode_p50_ms']:.3f} ms: **{lt['floor_ms_median_of_pairs']:.3f} ms** "
                "(median over pairs).", "",
            ]
    if "throughput" in doc:
        th = doc["throughput"]
        lines += [
            f"## Throughput against the server before the change ({th['before']}" + (f": a checkout of commit {th['before_commit']}" if th.get("before_commit") else "") + "), mixed tasks, closed loop", "",
            f"{th['pairs']} interleaved pairs per point, {th['seconds_per_measurement']:g} s each; ratio = this / before.", "",
            "| clients | requests/s this (median) | before (median) | paired ratio [95 % interval] |", "|---:|---:|---:|---|",
            *[f"| {k} | {v['median_rps_this']:.0f} | {v['median_rps_before']:.0f} | {fmt_ratio(v['ratio'])} |" for k, v in th["points"].items()], "",
        ]
    return "\n".join(lines)


def measure(art_path: Path, parts, pairs: int = 10, requests: int = 200, before: str | None = "/tmp/old-serve",
            clients=(1, 8, 32), seconds: float = 3.0) -> dict:
    """The record's document: each of ``parts`` (profile, latency, throughput) measured."""
    from mutask.export.artifact import load_artifact

    art = load_artifact(Path(art_path).resolve())
    pngs = {t: v[0] for t, v in noise_pngs(art).items()}
    doc = {"artifact": str(art.path), "artifact_name": art.path.name, "tasks": list(art.tasks)}
    with tempfile.TemporaryDirectory(prefix="mutask-serving-bench-") as tmp:
        if "latency" in parts:
            doc["latency"] = latency(art, pngs, Path(tmp), pairs, requests)
        if "throughput" in parts:
            doc["throughput"] = throughput(art, pngs, Path(tmp), before, pairs, list(clients), seconds)
    if "profile" in parts:
        doc["profile"] = profile(art.path, requests, before)
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.serving_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ART", type=Path, help="artifact directory written by `mutask export`")
    p.add_argument("--part", default="profile,latency,throughput", help="comma-separated: profile, latency, throughput")
    p.add_argument("--requests", type=int, default=200, help="requests profiled, and per latency block")
    p.add_argument("--pairs", type=int, default=10, help="interleaved pairs per comparison (>= 10 for an interval)")
    p.add_argument("--before", default="/tmp/old-serve", help="checkout of the commit to compare throughput against")
    p.add_argument("--clients", default="1,8,32", help="comma-separated client counts for throughput")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput measurement")
    p.add_argument("--name", default="serving", help="results file name")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--update", action="store_true", help="replace only the parts measured in an existing record (same artifact, same machine)")
    p.add_argument("--idle", action="store_true", help="the record says the machine was idle (default: shared with other work)")
    a = p.parse_args(argv)
    doc = measure(a.artifact, a.part.split(","), a.pairs, a.requests, a.before, [int(c) for c in a.clients.split(",")], a.seconds)
    if a.update and (a.out / f"{a.name}.json").exists():  # the parts not measured now stay as recorded
        import json

        doc = {**{k: v for k, v in json.loads((a.out / f"{a.name}.json").read_text()).items() if k != "machine"}, **doc}
    write_record(a.name, doc, to_markdown(doc), a.out, shared_machine=None if a.idle else SHARED)
    print(to_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
