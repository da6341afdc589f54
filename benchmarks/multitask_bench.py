"""One image for many tasks: the segment graph against one request per task.

    python -m mutask.benchmarks.multitask_bench ART [--requests 30] [--name multitask]

1. In process, no HTTP: one image for every task (:meth:`Engine.predict_tasks`) against one
   task's request (each task in turn), interleaved, medians; with the number of segment runs
   each takes (a task's request runs its task graph once; every task at once runs each segment
   of their chains once).
2. Over HTTP (a real ``mutask serve ART``): ``POST /predict_tasks`` for every task against
   ``POST /predict`` of one task (each in turn), sequential, interleaved, medians; each multi-task
   answer is checked against the single-task answers.

Writes ``NAME.json`` and ``NAME.md`` (default ``multitask``). Imports no torch.
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
from mutask.benchmarks.measure import model_input, noise_pngs
from mutask.server_process import ServerProcess, child_env
from mutask.serving.settings import default_threads


def engine_part(art, png: bytes, repeats: int, threads: int) -> dict:
    from mutask.serving.engine import Engine

    engine = Engine(art, device="cpu", threads=threads)
    tasks = list(art.tasks)
    pres = {t: art.tasks[t].preprocessing for t in tasks}
    xs = {p: model_input(art, t, png) for t, p in pres.items()}
    by_pre: dict = {}
    for t in tasks:
        by_pre.setdefault(pres[t], []).append(t)

    def all_tasks():
        for p, ts in by_pre.items():
            engine.predict_tasks(ts, xs[p])

    runs_before = sum(s["runs"] for s in engine.stats.values())
    all_tasks()
    multi_runs = sum(s["runs"] for s in engine.stats.values()) - runs_before
    single, multi = {t: [] for t in tasks}, []
    for r in range(repeats):
        t0 = time.perf_counter()
        all_tasks()
        multi.append(time.perf_counter() - t0)
        for t in tasks:
            t0 = time.perf_counter()
            engine.predict(t, xs[pres[t]])
            single[t].append(time.perf_counter() - t0)
    s, m = statistics.median([x for v in single.values() for x in v]), statistics.median(multi)
    k_requests = sum(statistics.median(v) for v in single.values())
    return {
        "ort_threads": threads, "repeats": repeats,
        "single_task_ms": s * 1e3, "all_tasks_ms": m * 1e3, "ratio": m / s, "tasks": len(tasks),
        "k_requests_ms": k_requests * 1e3,
        "segment_runs_all_tasks": multi_runs, "segment_runs_one_request_per_task": sum(len(art.chain(t)) for t in tasks),
        "distinct_preprocessings": len(by_pre),
    }


def http_part(art, art_path: Path, png: bytes, n: int) -> dict:
    import httpx
    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="mutask-multitask-bench-"))
    env = child_env({"BENTOML_HOME": tmp / "home", "PROMETHEUS_MULTIPROC_DIR": tmp / "prom"})
    tasks = list(art.tasks)
    with ServerProcess(art_path, log_path=tmp / "server.log", env=env) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            def single(t):
                t0 = time.perf_counter()
                r = c.post("/predict", data={"task": t}, files={"image": ("x.png", png, "image/png")})
                return time.perf_counter() - t0, r.json()

            def multi():
                t0 = time.perf_counter()
                r = c.post("/predict_tasks", files={"image": ("x.png", png, "image/png")})
                return time.perf_counter() - t0, r.json()

            for _ in range(3):  # warm-up
                multi()
                single(tasks[0])
            singles, multis, answers = {t: [] for t in tasks}, [], {}
            for r in range(n):
                dt, body = multi()
                multis.append(dt)
                for t in tasks:
                    dt, answers[t] = single(t)
                    singles[t].append(dt)
            got = body["predictions"]
            same = [g["task"] for g in got] == tasks and all(
                g["index"] == answers[g["task"]]["index"]
                and np.allclose(list(g["scores"].values()), list(answers[g["task"]]["scores"].values()), rtol=1e-4, atol=1e-5)
                for g in got
            )
    shutil.rmtree(tmp, ignore_errors=True)
    one = statistics.median([x for v in singles.values() for x in v])
    per_task = {t: statistics.median(v) * 1e3 for t, v in singles.items()}
    m = statistics.median(multis)
    return {
        "requests": n, "single_task_ms_median": one * 1e3, "single_task_ms_by_task": per_task,
        "k_requests_ms": sum(per_task.values()),
        "all_tasks_ms_median": m * 1e3, "ratio_to_one_request": m / one, "ratio_to_k_requests": m / (sum(per_task.values()) / 1e3),
        "answers_equal_single_task_answers": bool(same),
    }


def to_markdown(doc: dict) -> str:
    e, h = doc["engine"], doc["http"]
    lines = [f"# One image for every task ({e['tasks']} tasks, {doc['segments']} segments, {e['ort_threads']} ONNX Runtime thread(s))"]
    lines += [
        "",
        f"## Cost of one image for all {e['tasks']} tasks against one task's request (medians)",
        "",
        "| where | one task, one request (ms) | every task, one request (ms) | ratio | every task, one request per task (ms) | ratio | segment runs: one request | one request per task |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| engine, in process ({e['repeats']} interleaved repeats) | {e['single_task_ms']:.2f} | {e['all_tasks_ms']:.2f} | {e['ratio']:.2f}x | "
        f"{e['k_requests_ms']:.2f} | {e['k_requests_ms'] / e['single_task_ms']:.2f}x | {e['segment_runs_all_tasks']} | "
        f"{e['segment_runs_one_request_per_task']} segments (or {e['tasks']} task graphs) |",
        f"| over HTTP, sequential ({h['requests']} interleaved rounds) | {h['single_task_ms_median']:.2f} | {h['all_tasks_ms_median']:.2f} | "
        f"{h['ratio_to_one_request']:.2f}x | {h['k_requests_ms']:.2f} | {h['k_requests_ms'] / h['single_task_ms_median']:.2f}x | - | - |",
        "",
        f"Multi-task answers equal the single-task answers (label, index, scores to 1e-4): {h['answers_equal_single_task_answers']}. "
        f"Distinct preprocessings among the tasks: {e['distinct_preprocessings']} (the image is decoded once, resized once per each).",
        f"Machine: {doc['machine'].get('cpu_model', '')} ({doc['machine'].get('cpu_affinity') or doc['machine'].get('cpu_count')} cores).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.multitask_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ART", help="artifact directory written by `mutask export`")
    p.add_argument("--requests", type=int, default=30, help="interleaved rounds over HTTP (default 30)")
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds in process (default 20)")
    p.add_argument("--name", default="multitask", help="results file name (default multitask)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    a = p.parse_args(argv)
    from mutask.export.artifact import load_artifact

    art = load_artifact(a.artifact)
    png = next(iter(noise_pngs(art).values()))[0]
    doc = {"artifact": str(Path(a.artifact).resolve()), "tasks": list(art.tasks), "segments": len(art.segments)}
    doc["engine"] = engine_part(art, png, a.repeats, default_threads())
    print(doc["engine"], flush=True)
    doc["http"] = http_part(art, Path(a.artifact).resolve(), png, a.requests)
    doc["machine"] = serving_machine()
    md = to_markdown(doc)
    write(a.name, doc, md, a.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
