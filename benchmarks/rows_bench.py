"""Why a shared segment's cost per row changes with its rows: ONNX Runtime settings compared.

    python -m mutask.benchmarks.rows_bench ART [--rows 1,2,4,8,16,32] [--threads 1] [--name rows]

Times one run of the artifact's most expensive shared segment (the one the engine calibrates
on) at each number of rows, under four session settings, interleaved, medians of repeats:

* ``store``: the server's sessions: weights bound from the shared store (no pre-packing), no
  memory arena;
* ``store+arena``: the same with ONNX Runtime's CPU memory arena (buffers reused between runs
  instead of allocated and freed);
* ``own``: a session that loads its own weights (pre-packed), no arena;
* ``own+arena``: ONNX Runtime's defaults (own, pre-packed weights and the arena).

Writes ``NAME.json`` and ``NAME.md``. Imports no torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mutask.benchmarks.common import RESULTS, serving_machine, write

SETTINGS = ("store", "store+arena", "own", "own+arena")


def session(art, sid: str, setting: str, threads: int):
    import onnxruntime as ort

    from mutask.serving.sessions import session_options
    from mutask.serving.weights import SHARED_WEIGHTS_DISABLED_OPTIMIZERS, WeightStore

    so = session_options(threads)
    so.enable_cpu_mem_arena = setting.endswith("+arena")
    disabled = None
    if setting.startswith("store"):
        store = session.stores.get(art.path) or session.stores.setdefault(art.path, WeightStore(art.weights_path))
        store.bind(so, art.segment_path(sid))
        disabled = SHARED_WEIGHTS_DISABLED_OPTIMIZERS
    return ort.InferenceSession(str(art.segment_path(sid)), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


session.stores = {}


def seconds_per_run(sess, x: np.ndarray, min_s: float = 0.3) -> float:
    feed = sess.get_inputs()[0].name
    k, t0 = 0, time.perf_counter()
    while k < 2 or time.perf_counter() - t0 < min_s:
        sess.run(None, {feed: x})
        k += 1
    return (time.perf_counter() - t0) / k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.rows_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ART")
    p.add_argument("--rows", default="1,2,4,8,16,32")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1: the server's on 2 cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="rows")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from mutask.export.artifact import load_artifact
    from mutask.serving.calibrate import probe_segment
    from mutask.serving.engine import Engine

    art = load_artifact(a.artifact)
    sid = probe_segment(Engine(art, device="cpu", threads=a.threads, verify=False, rows_per_run=1))
    sessions = {s: session(art, sid, s, a.threads) for s in SETTINGS}
    shape = [int(d) for d in art.segments[sid].input_shape[1:]]
    rows = [int(r) for r in a.rows.split(",")]
    runs = {s: {r: [] for r in rows} for s in SETTINGS}
    for rep in range(a.repeats):
        for r in rows:
            x = np.random.default_rng(r).standard_normal((r, *shape)).astype(np.float32)
            for s in (SETTINGS if rep % 2 == 0 else SETTINGS[::-1]):
                sessions[s].run(None, {sessions[s].get_inputs()[0].name: x})  # warm-up at this size
                runs[s][r].append(seconds_per_run(sessions[s], x))
        print(f"repeat {rep + 1} done", flush=True)
    med = {s: {str(r): statistics.median(v) for r, v in by.items()} for s, by in runs.items()}
    doc = {
        "artifact": str(Path(a.artifact).resolve()), "segment": sid,
        "components": [art.components[c].name for c in art.segments[sid].components], "tasks": art.segments[sid].tasks,
        "input_shape": shape, "threads": a.threads, "repeats": a.repeats, "seconds_per_run": med, "machine": serving_machine(),
    }
    lines = [
        f"# Cost per row of shared segment {sid} ({len(doc['components'])} components, input {shape}; {a.threads} ONNX Runtime thread(s))",
        "",
        f"ms per row (one run's seconds / its rows), median of {a.repeats} interleaved repeats of >= 0.3 s each.",
        "",
        "| setting | " + " | ".join(f"{r} rows" for r in rows) + " | most rows / 1 row |",
        "|---|" + "---:|" * (len(rows) + 1),
    ]
    for s in SETTINGS:
        per_row = [med[s][str(r)] / r * 1e3 for r in rows]
        lines.append(f"| {s} | " + " | ".join(f"{v:.2f}" for v in per_row) + f" | {per_row[-1] / per_row[0]:.2f} |")
    write(a.name, doc, "\n".join(lines), a.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
