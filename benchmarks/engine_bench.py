"""The serving engine alone, without HTTP (part of ``serving_bench``; torch-free).

Images/s of mixed-task batches (each task's graph over its rows) with the pre-packed pool
against sessions that own their weights, the RSS one engine adds to a fresh process, and what one run
of a shared segment costs by its number of rows. Every :class:`mutask.serving.engine.Engine` gets each setting explicitly.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import numpy as np

from mutask.benchmarks.measure import model_input
from mutask.server_process import child_env

# name -> the Engine keywords that make it (besides device and threads)
CONFIGS = {
    "prepacked": dict(),  # the server on CPU: the pre-packed pool
    "own": dict(prepack=False),  # each session loads its own weights (CUDA's way)
}


def engine_throughput(art, images: dict, batch: int, repeats: int, threads: int, device: str) -> dict:
    """Images/s of the engine alone: mixed batches of ``batch`` single-image requests, tasks
    round-robin, through each of :data:`CONFIGS`. Interleaved repeats of about 1 s each,
    medians."""
    from mutask.serving.engine import Engine

    tasks = list(art.tasks)
    xs = {t: model_input(art, t, images[t]) for t in tasks}
    # one array per request, as the server decodes each request's own (the engine runs rows
    # that several items pass as the same array once: one image asked for several tasks)
    items = [(tasks[i % len(tasks)], xs[tasks[i % len(tasks)]].copy()) for i in range(batch)]
    engines = {m: Engine(art, device=device, threads=threads, verify=False, **kw) for m, kw in CONFIGS.items()}
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
me = psutil.Process()
m0 = me.memory_full_info()
engine = Engine(art, verify=True, **kw)
items = [(t, np.zeros((2, 3, r.image_size, r.image_size), np.float32)) for t, r in art.tasks.items()]
engine.run(items)
for item in items:
    engine.run([item])
m1 = me.memory_full_info()
print(json.dumps({"rss_delta_bytes": m1.rss - m0.rss, "pss_delta_bytes": m1.pss - m0.pss, "sessions": len(engine.sessions),
                  "weights": engine.weights_mode, "weight_store_bytes": engine.describe()["weights_in_memory_bytes"] or 0}))
"""


def engine_memory(art_path, threads: int, device: str) -> dict:
    """RSS one engine of each of :data:`CONFIGS` adds to a fresh process (after ONNX Runtime's
    own set-up): loading, verifying and running a mixed batch and every task alone. One fresh
    process per engine, so no engine reuses memory another freed."""
    out = {}
    for name, kw in CONFIGS.items():
        settings = json.dumps(dict(kw, threads=threads, device=device))
        r = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(art_path), settings],
                           capture_output=True, text=True, env=child_env(), timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"memory probe for {name} failed:\n{r.stderr[-2000:]}")
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def block_scaling(art, threads: int, device: str, rows=(1, 2, 4, 8, 16, 32), repeats: int = 5) -> dict:
    """Seconds per run of the most widely shared segment that holds a transformer block, at
    each number of rows, through the engine's own session (weights from its store). Where the
    time grows in proportion to the rows, running several tasks' rows together in one batch
    saves nothing; it saves what a run costs beyond its rows (the fixed part)."""
    from mutask.serving.engine import Engine

    engine = Engine(art, device=device, threads=threads, verify=False, **CONFIGS["prepacked"])
    cands = [sid for sid, s in art.segments.items() if any(art.components[c].name.startswith("blocks.") for c in s.components)]
    sid = max(cands, key=lambda k: (len(art.segments[k].tasks), -len(art.segments[k].components)))
    session = engine.sessions[sid]
    feed = session.get_inputs()[0].name
    shape = [int(d) for d in art.segments[sid].input_shape[1:]]
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
        "segment": sid, "components": [art.components[c].name for c in art.segments[sid].components],
        "tasks": art.segments[sid].tasks, "seconds_per_run": per_run, "repeats": repeats, "ort_threads": threads,
    }
