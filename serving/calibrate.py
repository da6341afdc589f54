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

:class:`CostModel` then predicts, from every session's warm one-row run and that cost per row,
what a batch costs through its tasks' graphs and through the segments they share (rows that
several tasks pass for one image counted once); the engine takes the segments only when they
are predicted clearly cheaper (see ``SEGMENTS_MARGIN`` in engine.py).
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np

log = logging.getLogger("mutask.serving")

TOLERANCE = 1.03  # a larger run within 3 % of the best cost per row is preferred (fewer runs)


def probe_segment(engine) -> str | None:
    """The shared segment whose one-row run costs most (where the batching decision matters),
    or None when no segment is shared."""
    shared = [sid for sid, seg in engine.segments.items() if seg.shared]
    if len(shared) <= 1:
        return shared[0] if shared else None
    cost = {}
    for sid in shared:
        x = _rows(engine, sid, 1)
        engine.sessions[sid].run(None, {engine._input_names[sid]: x})  # warm-up
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
    engine.sessions[sid].run(None, {engine._input_names[sid]: x})  # warm-up
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
    """The fastest of ``repeats`` runs, or of as many as fit in 20 ms when runs are short
    (a run of microseconds varies by tens of percent; at most 50)."""
    session, feed = engine.sessions[sid], engine._input_names[sid]
    best, n, start = float("inf"), 0, time.perf_counter()
    while n < repeats or (time.perf_counter() - start < 0.02 and n < 50):
        t0 = time.perf_counter()
        session.run(None, {feed: x})
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


class CostModel:
    """Predicted seconds of a session run, to choose between a batch's two ways through the
    engine (its tasks' graphs, or the segments they share): each session's warm one-row run
    (:func:`run_costs`), its part beyond the per-run overhead (the cheapest session's run)
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


def run_costs(engine) -> dict[str, float]:
    """Seconds of one warm one-row run of every session (after a warm-up run; the faster of
    two where a run is short)."""
    out = {}
    for key, session in engine.sessions.items():
        if key.startswith("task:"):
            size = engine.tasks[key[len("task:"):]].image_size
            shape = [3, size, size]
        else:
            shape = [int(d) for d in engine.segments[key].input_shape[1:]]
        x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
        feed = engine._input_names[key]
        session.run(None, {feed: x})  # warm-up
        first = _timed(session, feed, x)
        out[key] = first if first > 0.01 else min(first, _timed(session, feed, x))
    return out


def _timed(session, feed: str, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    session.run(None, {feed: x})
    return time.perf_counter() - t0
