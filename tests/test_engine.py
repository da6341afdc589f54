"""The engine and its batcher against plain onnxruntime: one copy of the weights, each task's
graph for single-task rows, the segment graph for one image asked for many tasks, and
cross-task micro-batching."""

from __future__ import annotations

import asyncio

import numpy as np

from tests.test_serving_helpers import evolve_input, reference_logits, sample_images, serving_artifact

__all__ = ["serving_artifact"]  # the session fixture, imported for pytest


def test_single_task_rows_run_each_task_graph_once(serving_artifact):
    from mutask.export.artifact import load_artifact
    from mutask.serving.engine import Engine

    art = load_artifact(serving_artifact)
    # sessions that own their weights (CUDA's way; the pre-packed pool has its own test below)
    engine = Engine(art, device="cpu", threads=1, prepack=False)
    assert engine.ready and engine.device == "cpu" and engine.weights_mode == "own"
    # one session per segment; each task's chain covers its path; d joins a's components
    # after its own patch_embed, so a segment has two parents
    assert set(engine.segments) == set(art.segments)
    for task, rec in art.tasks.items():
        assert [c for sid in art.chain(task) for c in art.segments[sid].components] == rec.components
    assert any(len(s.parents) > 1 for s in engine.segments.values()), "the test system should have segments meeting"
    shared = [sid for sid, s in engine.segments.items() if s.shared]
    assert shared, "the test system should share a segment"

    images = sample_images()
    names = sorted(images)
    items, refs = [], []
    for i, task in enumerate(["a", "b", "d", "c", "a", "d", "c", "b", "a"]):
        data = [images[names[(i + k) % len(names)]] for k in range(1 + i % 3)]
        x = np.concatenate([evolve_input(d, engine.tasks[task].preprocessing) for d in data])
        items.append((task, x))
        refs.append(np.stack([reference_logits(serving_artifact, task, d) for d in data]))
    runs_before = {sid: s["runs"] for sid, s in engine.stats.items()}
    outs = engine.run(items)
    for (task, x), out, ref in zip(items, outs, refs):
        assert out.shape == (x.shape[0], len(art.tasks[task].labels))
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        assert (out.argmax(1) == ref.argmax(1)).all()
    # a mixed batch of single-task items: each task's graph ran once over all its rows, no segment ran
    assert all(engine.stats[f"task:{t}"]["runs"] - runs_before[f"task:{t}"] == 1 for t in art.tasks)
    assert all(engine.stats[sid]["runs"] == runs_before[sid] == 0 for sid in engine.segments)
    assert all(engine.stats[f"task:{t}"]["rows"] == sum(x.shape[0] for u, x in items if u == t) for t in art.tasks)
    # the segment chains answer the same
    for out, via in zip(outs, engine._run_segments(items)):
        np.testing.assert_allclose(out, via, rtol=1e-4, atol=1e-4)


def test_prepacked_pool_holds_each_packed_weight_once_and_answers_as_own_weights(serving_artifact):
    """On CPU the engine's sessions run from ONNX Runtime's own optimized, pre-packed models
    whose weights and packs are pooled in one file, each distinct blob once: the answers are a
    plain session's (which owns and packs its weights), every session reads the one pool, and
    the pool's file is gone from disk once mapped (POSIX)."""
    import os

    import onnx

    from mutask.export.artifact import load_artifact
    from mutask.serving import prepack
    from mutask.serving.engine import Engine

    art = load_artifact(serving_artifact)
    pools = []
    finish = prepack.PrepackedPool.finish
    prepack.PrepackedPool.finish = lambda self: pools.append(finish(self)) or pools[-1]
    try:
        engine = Engine(art, device="cpu", threads=1)
    finally:
        prepack.PrepackedPool.finish = finish
    assert engine.weights_mode == "prepacked"
    pool = engine.pool
    assert pool.pool_bytes > 0
    # every model reads its external initializers (and their packs) from the one pool
    locations, packed = set(), 0
    for key, path in pools[0].items():
        if not path.exists():  # deleted once mapped: read what the sessions were built from
            break
        for t in onnx.load(str(path), load_external_data=False).graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            locations.update(v for k, v in ext.items() if k == "location")
            packed += any(k.startswith("prepacked") for k in ext)
    if os.name == "posix":
        assert not pool.dir.exists(), "the pool's directory is deleted once the sessions map it"
        with open("/proc/self/maps") as maps:
            assert any(prepack.POOL_FILE in line for line in maps), "the sessions map the pool"
    else:
        assert locations == {prepack.POOL_FILE} and packed > 0
    # pooling: the graphs' data files held the shared components once per graph, the pool once
    assert pool.placed < pool.references and pool.pool_bytes < pool.blob_bytes
    import onnxruntime as ort

    images = sample_images()
    for task in art.tasks:
        x = np.concatenate([evolve_input(d, engine.tasks[task].preprocessing) for d in images.values()])
        plain = ort.InferenceSession(str(art.graph_path(task)), providers=["CPUExecutionProvider"])  # own, packed weights
        want = plain.run(None, {plain.get_inputs()[0].name: x})[0]
        for got in (engine.run([(task, x)])[0], engine._run_segments([(task, x)])[0]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert (got.argmax(1) == want.argmax(1)).all()


def test_one_image_for_many_tasks_runs_each_shared_segment_once(serving_artifact):
    from mutask.export.artifact import load_artifact
    from mutask.serving.engine import Engine

    art = load_artifact(serving_artifact)
    engine = Engine(art, device="cpu", threads=1)
    data = sample_images()["rgb45x61-png"]
    x = evolve_input(data, engine.tasks["a"].preprocessing)
    tasks = ["a", "b", "c", "d"]
    assert len({engine.tasks[t].preprocessing for t in tasks}) == 1
    before = {k: dict(s) for k, s in engine.stats.items()}
    outs = engine.run([(t, x) for t in tasks])
    for t, out in zip(tasks, outs):
        np.testing.assert_allclose(out[0], reference_logits(serving_artifact, t, data), rtol=1e-4, atol=1e-4)
    # every segment on some task's chain ran once, on one row per distinct way there (the
    # image's one row, not one per task; d's own patch_embed makes a second row where it joins)
    ways = {sid: {tuple(art.chain(t)[: art.chain(t).index(sid)]) for t in tasks if sid in art.chain(t)} for sid in engine.segments}
    assert any(len(w) > 1 for w in ways.values()) and any(len(w) == 1 and len(art.segments[s].tasks) > 1 for s, w in ways.items())
    for sid in engine.segments:
        ran = engine.stats[sid]["runs"] - before[sid]["runs"], engine.stats[sid]["rows"] - before[sid]["rows"]
        assert ran == ((1, len(ways[sid])) if ways[sid] else (0, 0)), (sid, ran)
    assert sum(engine.stats[sid]["runs"] - before[sid]["runs"] for sid in engine.segments) < sum(len(art.chain(t)) for t in tasks)
    # mixed with another request of a task it shares segments with, the two stay apart
    y = np.concatenate([x, x + 0.25])
    outs2 = engine.run([(t, x) for t in tasks] + [("b", y)])
    for a, b in zip(outs, outs2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs2[-1], engine.run([("b", y)])[0], rtol=1e-4, atol=1e-4)


def test_batcher_batches_concurrent_mixed_tasks(serving_artifact):
    from mutask.export.artifact import load_artifact
    from mutask.serving.batcher import MicroBatcher
    from mutask.serving.engine import Engine

    engine = Engine(load_artifact(serving_artifact), device="cpu", threads=1)
    seen = []
    batcher = MicroBatcher(engine, max_batch=8, max_wait_ms=5, on_batch=lambda rows, s: seen.append(rows))
    rng = np.random.default_rng(1)
    reqs = [(t, rng.uniform(-1, 1, (1 + i % 2, 3, 32, 32)).astype(np.float32)) for i, t in enumerate("abcabcabcabcabcabcab")]
    big = ("b", rng.uniform(-1, 1, (19, 3, 32, 32)).astype(np.float32))  # over max_batch: runs alone

    async def main():
        return [y[0] for y in await asyncio.gather(*(batcher.submit_tasks([(t, x)]) for t, x in reqs + [big]))]

    outs = asyncio.run(main())
    for (t, x), out in zip(reqs + [big], outs):
        np.testing.assert_allclose(out, engine.run([(t, x)])[0], rtol=1e-5, atol=1e-5)
    rows = [sum(n for _, n in b) for b in seen]
    assert sorted(rows)[-2:] == [min(8, sorted(rows)[-2]), 19] and sum(rows) == sum(x.shape[0] for _, x in reqs) + 19
    assert [b for b in seen if sum(n for _, n in b) == 19] == [[("b", 19)]]
    assert len(seen) < len(reqs)  # requests were batched together
    assert any(len({t for t, _ in b}) > 1 for b in seen)  # across tasks
    batcher.close()


def test_request_timeline_accounts_for_a_request_stage_by_stage(serving_artifact):
    """benchmarks/request_timeline.py (the serving record's breakdown), run as the record runs
    it: every stage is measured, none negative, and together they make the request's time."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "request_timeline.py"
    r = subprocess.run([sys.executable, str(script), str(serving_artifact), "--requests", "10"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    stages = doc["stages_ms_p50"]
    assert len(stages) == 9 and all(v >= 0 for v in stages.values()), stages
    assert abs(sum(stages.values()) - doc["total_ms_p50"]) <= 0.25 * doc["total_ms_p50"], doc
    assert stages["ONNX Runtime (Engine.run)"] > 0 and stages["decode + preprocess"] > 0
    assert Path(doc["serving_code"]).resolve() == script.parents[1] / "serving"
