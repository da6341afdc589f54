"""The service's side of the model repository (:mod:`mutask.serving.repository`): what one
version holds, how the service starts its repository, and which version a request reads.

A version's payload is its engine, its batcher (one inference thread per version) and its
task records as ``POST /tasks`` answers them (each naming the version). The service reads
``engine``, ``batcher`` and ``records`` through :func:`version_of`: the version the request
holds (:class:`~mutask.serving.repository.HoldVersion`), or outside a request the served one.
Swaps and refusals are counted in :mod:`mutask.serving.metrics`.
"""

from __future__ import annotations

import logging

import numpy as np

from .api import TaskRecord
from .batcher import MicroBatcher
from .repository import HoldVersion, Repository, Version, held, open_served  # noqa: F401 (the service's names)

log = logging.getLogger("mutask.serving")


class Payload:
    """One version's engine (warmed up), its own batcher and its task records.
    ``on_batch(payload, rows, seconds)`` is called after each of its batches (metrics)."""

    def __init__(self, engine, number: int | None, *, max_batch: int = 32, max_wait_ms: float = 2.0, on_batch=None):
        self.engine, self.number = engine, number
        self.segment_seconds: dict[str, float] = {}  # what the metrics have counted of engine.stats
        self.records = task_records(engine, number)
        warm_up(engine)
        report = None if on_batch is None else (lambda rows, seconds: on_batch(self, rows, seconds))
        self.batcher = MicroBatcher(engine, max_batch=max_batch, max_wait_ms=max_wait_ms, on_batch=report)

    def close(self) -> None:
        self.batcher.close()
        self.batcher = self.engine = None


def task_records(engine, number: int | None = None) -> dict[str, TaskRecord]:
    """Each task's record as ``POST /tasks`` answers it, naming the version serving it."""
    art = engine.artifact
    out = {}
    for tid, t in engine.tasks.items():
        shared = [sid for sid in t.segments if engine.segments[sid].shared]
        shared_components = dict.fromkeys(c for sid in shared for c in engine.segments[sid].components)
        out[tid] = TaskRecord(
            labels=t.labels, num_labels=len(t.labels), image_size=t.image_size, params=t.params,
            accounted_params=t.accounted_params, val_accuracy=t.metrics.val_accuracy, test_accuracy=t.metrics.test_accuracy,
            segments=t.segments, shared_segments=shared, version=number,
            shared_params=sum(art.components[c].num_params for c in shared_components),
        )
    return out


def warm_up(engine) -> None:
    """Every task once, all together in one mixed batch (the way requests will come)."""
    items = [(tid, np.full((1, 3, t.image_size, t.image_size), 0.25, np.float32)) for tid, t in engine.tasks.items()]
    for (tid, _), y in zip(items, engine.run(items)):
        if not np.isfinite(y).all():
            raise ValueError(f"task {tid}: non-finite logits in the warm-up run")


def start(service, root) -> Repository:
    """The service's repository over ``root`` (an artifact, or a directory of versions), its
    first version built by ``service._build_version`` and, for a directory of versions, polled
    (``service.settings``: ``version`` pins one, ``poll_s``)."""
    pin, poll_s = service.settings.version, service.settings.poll_s
    m = service.metrics

    def swapped(old: Version | None, new: Version, seconds: float) -> None:
        m.swaps.inc()
        m.swap_seconds.observe(seconds)
        m.version.set(new.number or 0)
        m.init_tasks(new.payload.engine.tasks)

    def refused(number, reason: str) -> None:
        m.refusals.inc()

    repo = Repository(root, build=service._build_version, close=Payload.close, pin=pin, poll_s=poll_s, on_swap=swapped, on_refuse=refused)
    first = repo.start()
    m.version.set(first.number or 0)
    m.init_tasks(first.payload.engine.tasks)
    log.info("mutask: serving version %s of %s%s", first.number, root,
             " (pinned)" if pin else f", polling every {poll_s:g} s" if repo.versioned else "")
    return repo


def version_of(service) -> Version:
    """The version the current request holds, else the one served now."""
    return held() or service.repo.current
