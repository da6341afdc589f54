"""The segment engine and its batcher against plain onnxruntime: one copy of the weights, the
segment graph, one image for many tasks, the batching decision and cost model, hidden states
passed on between segments, and cross-task micro-batching."""

from __future__ import annotations

import asyncio

import time

import numpy as np

from tests.test_serving_helpers import evolve_input, reference_logits, sample_images, serving_artifact

__all__ = ["serving_artifact"]  # the session fixture, imported for pytest


def test_engine_runs_the_segment_graph_over_one_copy_of_the_weights(serving_artifact):
    from mutask.export.artifact import load_artifact
    from mutask.serving.engine import Engine

    art = load_artifact(serving_artifact)
    # the unpacked weight store (CUDA's way, and CPU's where ONNX Runtime cannot pre-pack into
    # a pool; the pool has its own test below); every row of a segment in one run
    engine = Engine(art, device="cpu", threads=1, rows_per_run=64, prepack=False)
    engine.costs = None  # and no cost model: through the segments whenever tasks share one
    assert engine.ready and engine.device == "cpu" and engine.weights_mode == "store"
    # one session per segment; each task's chain covers its path; d joins a's components
    # after its own patch_embed, so a segment has two parents
    assert set(engine.segments) == set(art.segments)
    for task, rec in art.tasks.items():
        assert [c for sid in art.chain(task) for c in art.segments[sid].components] == rec.components
    assert any(len(s.parents) > 1 for s in engine.segments.values()), "the test system should have segments meeting"
    shared = [sid for sid, s in engine.segments.items() if s.shared]
    assert shared, "the test system should share a segment"

    # weights once: the store is the weights file, read once, and every session (segments and
    # task graphs) has its weights bound to it
    assert engine.weights.nbytes == art.weights_path.stat().st_size
    assert set(engine.bindings) == set(art.segments) | {f"task:{t}" for t in art.tasks}

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
    # each segment ran once for the whole mixed batch, on the rows of every task through it
    assert all(engine.stats[sid]["runs"] - runs_before[sid] == 1 for sid in engine.segments)
    assert all(engine.stats[f"task:{t}"]["runs"] == runs_before[f"task:{t}"] for t in art.tasks)
    # a batch of one task's items runs that task's graph once, and answers the same
    solo = [(t, x) for t, x in items if t == "d"]
    runs_before = {k: s["runs"] for k, s in engine.stats.items()}
    for out, ref in zip(engine.run(solo), [o for (t, _), o in zip(items, outs) if t == "d"]):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert {k for k, s in engine.stats.items() if s["runs"] != runs_before[k]} == {"task:d"}
    for sid in shared:
        assert engine.stats[sid]["rows"] >= sum(x.shape[0] for t, x in items if t in engine.segments[sid].tasks)
    assert 0.0 < engine.shared_share() <= 1.0

    # the sessions compute with the store's memory itself, not a copy (ONNX Runtime copies a
    # weight it pre-packs, a transposed weight it folds, a conv weight it re-lays out): every
    # stored tensor, changed in place, moves the logits of every task that uses it, both in a
    # mixed batch (segments) and alone (its task graph), and of no other task
    before = engine.run(items)
    alone = {t: engine.run([(t, x)])[0] for t, x in items}
    users: dict = {}
    for cid, comp in art.components.items():
        for key in comp.tensors:
            users.setdefault(key, set()).update(comp.used_by)
    assert set(users) == set(engine.weights.arrays)
    rng = np.random.default_rng(0)
    for key, arr in engine.weights.arrays.items():
        old = arr.copy()
        try:
            arr += rng.standard_normal(arr.shape).astype(arr.dtype)
            after = engine.run(items)
            after_alone = {t: engine.run([(t, x)])[0] for t, x in items if t in users[key]}
        finally:
            arr[...] = old
        for (task, _), b, a in zip(items, before, after):
            assert (np.abs(a - b).max() > 1e-5) == (task in users[key]), (key, task)
        for task, a in after_alone.items():
            assert np.abs(a - alone[task]).max() > 1e-5, (key, task, "alone")
    for b, a in zip(before, engine.run(items)):
        np.testing.assert_array_equal(a, b)

    # the benchmark's baseline (one session per task graph) answers the same
    baseline = Engine(art, device="cpu", threads=1, mode="per_task")
    assert len(baseline.sessions) == len(art.tasks) and baseline.shared_share() == 0.0
    for out, ref in zip(outs, baseline.run(items)):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


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
    engine = Engine(art, device="cpu", threads=1, rows_per_run=64)
    assert engine.weights_mode == "prepacked" and engine.weights is None
    pool = engine.pool
    assert engine.describe()["weights_in_memory_bytes"] == pool.pool_bytes > 0
    # every model reads its external initializers (and their packs) from the one pool
    locations, packed = set(), 0
    for key, path in engine.pool_models.items():
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
    baseline = Engine(art, device="cpu", threads=1, mode="per_task")  # own, packed weights
    images = sample_images()
    for task in art.tasks:
        x = np.concatenate([evolve_input(d, engine.tasks[task].preprocessing) for d in images.values()])
        want = baseline.predict(task, x)
        for got in (engine.predict(task, x), engine._run_segments([(task, x)])[0]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert (got.argmax(1) == want.argmax(1)).all()


def test_one_image_for_many_tasks_runs_each_shared_segment_once(serving_artifact):
    from mutask.export.artifact import load_artifact
    from mutask.serving.engine import Engine

    art = load_artifact(serving_artifact)
    engine = Engine(art, device="cpu", threads=1)
    # through the segments (which way pays for this tiny model is this machine's call, tested
    # in test_batching_follows_what_a_run_costs_on_this_machine; here: what the segments do)
    engine.costs = None
    data = sample_images()["rgb45x61-png"]
    x = evolve_input(data, engine.tasks["a"].preprocessing)
    tasks = ["a", "b", "c", "d"]
    assert len({engine.tasks[t].preprocessing for t in tasks}) == 1
    before = {k: dict(s) for k, s in engine.stats.items()}
    outs = engine.predict_tasks(tasks, x)
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


def test_batching_follows_what_a_run_costs_on_this_machine(serving_artifact, monkeypatch):
    """The engine measures the cost per row of its most expensive shared segment at start and
    runs sessions in chunks of the cheapest size; where no merged run pays, tasks run apart."""
    from mutask.export.artifact import load_artifact
    from mutask.serving import calibrate
    from mutask.serving.engine import Engine

    art = load_artifact(serving_artifact)
    measured = Engine(art, device="cpu", threads=1, max_rows=8)
    b = measured.batching
    assert b["segment"] in art.segments and art.segments[b["segment"]].shared
    assert 1 <= b["rows_per_run"] <= 8 and b["rows_per_run"] == measured.rows_per_run
    assert b["seconds_per_row"]["1"] > 0 and b["reason"] and measured.describe()["batching"] == b

    # a synthetic machine: microseconds(k) = k * (1 + 0.2 k) (rising per row) or 1 + 0.1 k (falling)
    for cost, expect in ((lambda k: 1e-6 * k * (1 + 0.2 * k), 1), (lambda k: 1e-6 * (1 + 0.1 * k), 8)):
        monkeypatch.setattr(calibrate, "_fastest", lambda engine, sid, x, repeats, cost=cost: cost(x.shape[0]))
        assert Engine(art, device="cpu", threads=1, verify=False, max_rows=8).rows_per_run == expect
    monkeypatch.undo()

    rng = np.random.default_rng(5)
    items = [(t, rng.uniform(-1, 1, (1 + i % 3, 3, 32, 32)).astype(np.float32)) for i, t in enumerate("abcdab")]
    free = Engine(art, device="cpu", threads=1, rows_per_run=64)
    free.costs = None  # no model: segments whenever tasks share one
    ref = free.run(items)
    assert sum(free.stats[sid]["runs"] for sid in art.segments) == len(art.segments)  # merged: each segment once

    # the cost model picks the way a batch goes: where segment runs are predicted cheap, the
    # segments (in runs of at most rows_per_run rows); where task graphs are, the graphs
    e = Engine(art, device="cpu", threads=1, rows_per_run=2)
    assert e.batching["reason"].startswith("set") and e.costs is not None
    assert set(e.costs.one_row) == set(e.sessions) and all(v > 0 for v in e.costs.one_row.values())
    for cheap, expect in (("segments", set(art.segments)), ("graphs", {f"task:{t}" for t in "abcd"})):
        e.costs = calibrate.CostModel({k: (1e-6 if k.startswith("task:") == (cheap == "graphs") else 1e-3) for k in e.sessions}, {1: 1.0}, 2)
        before = {k: s["runs"] for k, s in e.stats.items()}
        for out, r in zip(e.run(items), ref):
            np.testing.assert_allclose(out, r, rtol=1e-4, atol=1e-4)
        runs = {k: s["runs"] - before[k] for k, s in e.stats.items() if s["runs"] > before[k]}
        assert set(runs) == expect, (cheap, runs)
        if cheap == "segments":  # merged through the segments, in runs of at most 2 rows
            assert sum(runs.values()) > len(art.segments)
    # one image for several tasks shares its rows in their shared segments, which the model
    # sees: the same costs that send a mixed batch through the graphs send it through segments
    # (every run's cost is in its rows, none fixed: a task's graph costs what its chain does)
    e.costs = calibrate.CostModel({k: (1e-3 * len(art.chain(k[5:])) if k.startswith("task:") else 1e-3) for k in e.sessions}, {1: 1.0}, 64)
    e.costs.overhead = 0.0
    x = items[0][1]
    assert not e._share_a_segment([("a", x), ("b", x.copy()), ("c", x.copy())])
    assert e._share_a_segment([("a", x), ("b", x), ("c", x)])
    # the decision is remembered per batch shape (each item's task and rows, and which items
    # pass one array): another batch of that shape takes the same plan without deciding again
    y = x.copy()
    assert e._segments_plan([("a", y), ("b", y), ("c", y)]) is e._segments_plan([("a", x), ("b", x), ("c", x)])
    assert len(e.ways.plans) == 2


def test_the_clock_settles_the_way_a_batch_shape_takes(serving_artifact, monkeypatch):
    """Where the cost model sends a batch shape through the segments, the shape's next batches
    take both ways in turn and the one that was faster here stays for that shape."""
    from mutask.export.artifact import load_artifact
    from mutask.serving import calibrate
    from mutask.serving import engine as E
    from mutask.serving.engine import Engine

    art = load_artifact(serving_artifact)
    rng = np.random.default_rng(6)
    x = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    items = [("a", x), ("b", x.copy())]  # a and b share segments
    e = Engine(art, device="cpu", threads=1, rows_per_run=64)
    cheap_segments = calibrate.CostModel({k: (1e-3 if k.startswith("task:") else 1e-6) for k in e.sessions}, {1: 1.0}, 64)
    e.costs = cheap_segments  # segments predicted at a tiny part of the graphs' cost: no trial
    e.run(items)
    assert e._segments_plan(items) is not None and not e.ways.trials
    monkeypatch.setattr(E, "MODEL_TRUSTED_BELOW", 0.0)  # now every pick of the segments is checked
    for slow, stays in (("_run_segments", "graphs"), ("_run_per_task", "segments")):
        e = Engine(art, device="cpu", threads=1, rows_per_run=64)
        e.costs = cheap_segments
        real = getattr(e, slow)

        def slowed(*args, real=real):
            time.sleep(0.02)  # this way is slower on "this machine"
            return real(*args)

        monkeypatch.setattr(e, slow, slowed)
        ways = []
        for _ in range(2 * calibrate.TRIAL_RUNS + 3):
            before = {k: s["runs"] for k, s in e.stats.items()}
            e.run([(t, v.copy()) for t, v in items])  # new arrays, the same shape
            ways.append("segments" if any(e.stats[sid]["runs"] > before[sid] for sid in art.segments) else "graphs")
        trial = ways[: 2 * calibrate.TRIAL_RUNS]
        assert trial.count("segments") == trial.count("graphs") == calibrate.TRIAL_RUNS and trial[0] == "segments"
        assert ways[2 * calibrate.TRIAL_RUNS :] == [stays] * 3, (slow, ways)
        assert e.ways.settled[stays] == 1 and not e.ways.trials
        assert (e._segments_plan(items) is not None) == (stays == "segments")


def test_a_segment_chain_passes_hidden_states_on_without_host_copies(serving_artifact, monkeypatch):
    """Segments run through ONNX Runtime's I/O binding: a hidden state that goes whole to the
    next segment stays an OrtValue (on CUDA: on the device); only what must be regrouped (rows
    of several items) and the logits come to the host. The same code runs on CPU."""
    from mutask.export.artifact import load_artifact
    from mutask.serving import engine as E

    art = load_artifact(serving_artifact)
    engine = E.Engine(art, device="cpu", threads=1, rows_per_run=64)
    engine.costs = None  # mixed batches through the segments
    copies = []
    real = E._Host.__call__

    def counting(self, value):
        if not isinstance(value, np.ndarray):
            copies.append(value)
        return real(self, value)

    monkeypatch.setattr(E._Host, "__call__", counting)
    x = np.random.default_rng(2).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    for t in art.tasks:
        copies.clear()
        out = engine._run_segments([(t, x)])[0]
        assert len(art.chain(t)) > 1 and len(copies) == 1, (t, len(copies))  # the logits only
        np.testing.assert_allclose(out, engine._run_per_task([(t, x)])[0], rtol=1e-4, atol=1e-4)
    copies.clear()
    engine.run([("a", x), ("d", x[:1]), ("b", x[1:])])
    assert copies  # rows of several items regrouped on the host


def test_batcher_batches_concurrent_mixed_tasks(serving_artifact):
    from mutask.export.artifact import load_artifact
    from mutask.serving.batcher import MicroBatcher
    from mutask.serving.engine import Engine

    engine = Engine(load_artifact(serving_artifact), device="cpu", threads=1)
    seen = []
    batcher = MicroBatcher(engine, max_batch=8, max_wait_ms=5, on_batch=lambda rows, s: seen.append(rows))
    rng = np.random.default_rng(1)
    reqs = [(t, rng.uniform(-1, 1, (1 + i % 2, 3, 32, 32)).astype(np.float32)) for i, t in enumerate("abcabcabcabcabcabcab")]
    big = ("b", rng.uniform(-1, 1, (19, 3, 32, 32)).astype(np.float32))  # over max_batch: chunked

    async def main():
        return await asyncio.gather(*(batcher.submit(t, x) for t, x in reqs + [big]))

    outs = asyncio.run(main())
    for (t, x), out in zip(reqs + [big], outs):
        np.testing.assert_allclose(out, engine.predict(t, x), rtol=1e-5, atol=1e-5)
    rows = [sum(n for _, n in b) for b in seen]
    assert max(rows) <= 8 and sum(rows) == sum(x.shape[0] for _, x in reqs) + 19
    assert len(seen) < len(reqs)  # requests were batched together
    assert any(len({t for t, _ in b}) > 1 for b in seen)  # across tasks
    batcher.close()
