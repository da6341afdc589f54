"""How many rows one session run should take on this machine, measured when the engine starts.

Running rows of several tasks through a shared segment together saves what a run costs beyond
its rows (launching the graph, packing the weights, the thread pool's wake-up), but a larger
run also moves larger activations: once they no longer fit the CPU's caches, every
element-wise step of a transformer block streams them from memory, and the cost *per row*
rises with the rows (on the 2-core development machine, a ViT-S block at 224 px cost more per
row at 32 rows than at 1). Where that happens, one big batch is slower than several small ones.

:func:`rows_per_run` times the engine's most expensive shared segment at 1, 2, 4, ... rows (a
few runs each, the fastest kept; a time budget of a few seconds, so /readyz is barely delayed)
and picks the number of rows with the lowest cost per row (the largest one within 3 % of it).
The engine then runs every session in chunks of at most that many rows.

:class:`CostModel` then predicts, from every session's warm one-row run through the engine and
that cost per row, what a batch costs through its tasks' graphs and through the segments they
share (rows that several tasks pass for one image counted once); the engine takes the segments
only when they are predicted clearly cheaper (see ``SEGMENTS_MARGIN`` in engine.py). Where the
prediction is close, :class:`Ways` lets the clock check it on the first batches of that shape.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time

import numpy as np

log = logging.getLogger("mutask.serving")

TOLERANCE = 1.03  # a larger run within 3 % of the best cost per row is preferred (fewer runs)
SHAPES_KEPT = 4096  # batch shapes whose way is remembered (all forgotten at once past this)
TRIAL_RUNS = 3  # batches each way before the clock settles a shape the model sent through the segments
# where the model predicts the segments at under half the graphs' cost (one image asked for
# several tasks of a large model: the shared blocks run once instead of k times), the clock does
# not check it: the model has been off by up to 2x, and a trial would run k-fold work 3 times
MODEL_TRUSTED_BELOW = 0.5


def probe_segment(engine) -> str | None:
    """The shared segment whose one-row run costs most (where the batching decision matters),
    or None when no segment is shared."""
    shared = [sid for sid, seg in engine.segments.items() if seg.shared]
    if len(shared) <= 1:
        return shared[0] if shared else None
    cost = {}
    for sid in shared:
        x = _rows(engine, sid, 1)
        _fastest(engine, sid, x, 1)  # warm-up
        cost[sid] = _fastest(engine, sid, x, 1)
    return max(cost, key=cost.get)


def rows_per_run(engine, max_rows: int, budget_s: float = 3.0) -> dict:
    """Time the probe segment at 1, 2, 4, ... up to ``max_rows`` rows (the faster of 2 runs
    each), going on while the next size is expected to fit in ``budget_s`` seconds; returns
    the decision (``rows_per_run``) with what it was based on."""
    t_start = time.perf_counter()
    sid = probe_segment(engine)
    if sid is None:
        return {"rows_per_run": max_rows, "reason": "no shared segment: nothing to batch across tasks", "seconds_per_row": {}}
    x = _rows(engine, sid, 1)
    _fastest(engine, sid, x, 1)  # warm-up
    per_row: dict[int, float] = {}
    k = 1
    while k <= max_rows:
        per_row[k] = _fastest(engine, sid, _rows(engine, sid, k), 2) / k
        best = min(per_row.values())
        rising = len(per_row) >= 3 and all(per_row[j] > TOLERANCE * best for j in list(per_row)[-2:])
        next_cost = 2 * (2 * k) * per_row[k]  # two runs of twice the rows
        if rising or time.perf_counter() - t_start + next_cost > budget_s:
            break
        k *= 2
    best = min(per_row.values())
    chosen = max(j for j, c in per_row.items() if c <= TOLERANCE * best)
    tried = max(per_row)
    if chosen == 1:
        reason = f"a run of k rows costs at least k single runs up to {tried} rows: rows run one at a time"
    elif chosen == tried and tried < max_rows:
        reason = f"cost per row still falling at {tried} rows, where the {budget_s:g} s budget ended: runs of up to {chosen} rows"
    elif chosen == tried:
        reason = f"cost per row falls up to the max batch ({max_rows}): runs of up to {chosen} rows"
    else:
        reason = f"cost per row lowest at {chosen} rows and rising after: runs of up to {chosen} rows"
    doc = {
        "rows_per_run": chosen, "segment": sid, "reason": reason,
        "seconds_per_row": {str(j): round(c, 6) for j, c in per_row.items()},
        "calibration_seconds": round(time.perf_counter() - t_start, 3),
    }
    log.info("engine batching: %s (segment %s, s/row %s)", reason, sid, doc["seconds_per_row"])
    return doc


def _rows(engine, sid: str, k: int) -> np.ndarray:
    shape = [int(d) for d in engine.segments[sid].input_shape[1:]]
    return np.random.default_rng(k).standard_normal((k, *shape)).astype(np.float32)


def _fastest(engine, sid: str, x: np.ndarray, repeats: int) -> float:
    """The fastest of ``repeats`` runs of a segment through the engine (its I/O binding, the
    output brought to the host), or of as many as fit in 20 ms when runs are short (a run of
    microseconds varies by tens of percent; at most 50)."""
    best, n, start = float("inf"), 0, time.perf_counter()
    while n < repeats or (time.perf_counter() - start < 0.02 and n < 50):
        best = min(best, _engine_run_seconds(engine, sid, x))
        n += 1
    return best


def _engine_run_seconds(engine, key: str, x: np.ndarray) -> float:
    """Seconds of one run of session ``key`` the way the engine runs it: a segment through its
    I/O binding, its output brought to the host (as the next segment's input is); a task's
    graph as the per-task way runs it."""
    from .engine import _Host

    t0 = time.perf_counter()
    _Host()(engine._session_run(key, x, bound=not key.startswith("task:")))
    return time.perf_counter() - t0


class CostModel:
    """Predicted seconds of a session run, to choose between a batch's two ways through the
    engine (its tasks' graphs, or the segments they share): each session's warm one-row run
    through the engine (:func:`run_costs`), its part beyond the per-run overhead (the cheapest session's run)
    growing with the rows as the probe segment's cost per row does, in runs of at most
    ``rows_per_run`` rows. A model, not a measurement: it only has to rank the two ways."""

    def __init__(self, one_row: dict[str, float], per_row: dict[int, float], rows_per_run: int | None):
        self.one_row = one_row
        self.overhead = min(one_row.values()) if one_row else 0.0
        self.sizes = sorted(per_row)
        self.ratio = {k: per_row[k] / per_row[self.sizes[0]] for k in self.sizes} if per_row else {1: 1.0}
        self.sizes = self.sizes or [1]
        self.step = rows_per_run

    def _scaled_rows(self, rows: int) -> float:
        known = [k for k in self.sizes if k <= rows] or self.sizes[:1]
        return rows * self.ratio[known[-1]]

    def seconds(self, key: str, rows: int) -> float:
        if rows <= 0:
            return 0.0
        runs, scaled = self._runs(rows)
        c, o = self.one_row[key], self.overhead
        return runs * o + (c - o) * scaled

    @functools.lru_cache(maxsize=1024)
    def _runs(self, rows: int) -> tuple[int, float]:
        """(runs, rows weighted by the cost per row at their run's size) for ``rows`` rows."""
        step = self.step or rows
        full, rest = divmod(rows, step)
        chunks = [step] * full + ([rest] if rest else [])
        return len(chunks), sum(self._scaled_rows(n) for n in chunks)


class Ways:
    """The way each batch *shape* (each item's task, rows, and which earlier item passes the
    same array) goes through the engine: its plan through the segments, or None for the task
    graphs. Shapes recur (a server sees the same task mixes over and over), so the cost model
    is asked once per shape. Where it picks the segments by a narrow margin (a predicted cost
    of at least ``MODEL_TRUSTED_BELOW`` of the graphs'), the clock checks it: the shape's
    next batches take the two ways in turn (``TRIAL_RUNS`` each, segments first) and the
    faster by its median stays. A model built from one-row runs misses what a chain of small
    sessions costs together (on the demo system such chains cost 1.3-2x its prediction), and
    this keeps a batch from staying on a way that is slower on this machine."""

    def __init__(self):
        self.plans: dict = {}  # shape -> plan or None
        self.trials: dict = {}  # shape on trial -> {"segments": [seconds], "graphs": [seconds]}
        self.settled = {"segments": 0, "graphs": 0}  # shapes the clock settled, by the way that won

    def get(self, shape) -> tuple[bool, list | None]:
        return (True, self.plans[shape]) if shape in self.plans else (False, None)

    def put(self, shape, plan, on_trial: bool) -> None:
        if len(self.plans) >= SHAPES_KEPT:
            self.plans.clear()
            self.trials.clear()
        self.plans[shape] = plan
        if on_trial:
            self.trials[shape] = {"segments": [], "graphs": []}

    def trial_way(self, shape) -> str | None:
        """The way this batch of a shape on trial takes (None: the shape is settled)."""
        trial = self.trials.get(shape)
        return None if trial is None else min(trial, key=lambda w: len(trial[w]))

    def timed(self, shape, way: str, seconds: float) -> None:
        trial = self.trials[shape]
        trial[way].append(seconds)
        if all(len(v) >= TRIAL_RUNS for v in trial.values()):
            faster = statistics.median(trial["segments"]) < statistics.median(trial["graphs"])
            if not faster:
                self.plans[shape] = None
            self.settled["segments" if faster else "graphs"] += 1
            del self.trials[shape]


def run_costs(engine) -> dict[str, float]:
    """Seconds of one warm one-row run of every session through the engine
    (:func:`_engine_run_seconds`): on a small model the engine's work around a run is a large
    part of it (on the demo system a one-block segment cost 189 us run bare and 218 us so, a
    pos_embed segment 18 and 34). After a warm-up run, the fastest of three where a run is short."""
    out = {}
    for key in engine.sessions:
        if key.startswith("task:"):
            size = engine.tasks[key[len("task:"):]].image_size
            shape = [3, size, size]
        else:
            shape = [int(d) for d in engine.segments[key].input_shape[1:]]
        x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
        _engine_run_seconds(engine, key, x)  # warm-up
        first = _engine_run_seconds(engine, key, x)
        out[key] = first if first > 0.01 else min(first, _engine_run_seconds(engine, key, x), _engine_run_seconds(engine, key, x))
    return out
