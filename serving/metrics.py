"""Per-task Prometheus series on BentoML's ``/metrics``, next to its own (the list:
``docs/serving.md``). BentoML 1.4 wants ``prometheus_client`` used directly, imported only once
the worker has set ``PROMETHEUS_MULTIPROC_DIR``: hence :func:`get`, which creates the series on
first use, inside the serving process, once.
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_METRICS = None

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        import prometheus_client as pc

        self.requests = pc.Counter("mutask_requests", "Prediction requests per task", ["task"])
        self.errors = pc.Counter("mutask_errors", "Rejected or failed prediction requests per task", ["task", "kind"])
        self.latency = pc.Histogram(
            "mutask_request_latency_seconds", "Prediction request latency per task (decode to answer)", ["task"], buckets=LATENCY_BUCKETS
        )
        self.batch_size = pc.Histogram("mutask_batch_size", "Rows of a task per engine batch", ["task"], buckets=BATCH_BUCKETS)
        self.engine_batch = pc.Histogram("mutask_engine_batch_size", "Rows per engine batch, all tasks together", buckets=BATCH_BUCKETS)
        self.segment_seconds = pc.Counter("mutask_segment_seconds", "Compute time per graph (a segment id, or task:<id> for a task's own graph)", ["segment", "shared"])
        # the model repository (serving/repository.py)
        self.swaps = pc.Counter("mutask_version_swaps", "Versions swapped in while serving")
        self.refusals = pc.Counter("mutask_version_refusals", "Versions refused (broken, half-written, failing to load or warm up)")
        self.swap_seconds = pc.Histogram("mutask_version_load_seconds", "Loading a new version before its swap: verify, engine, warm-up", buckets=LATENCY_BUCKETS + (30.0, 60.0))
        self.version = pc.Gauge("mutask_version", "The version served (0: a version-less artifact)", multiprocess_mode="mostrecent")

    def init_tasks(self, tasks) -> None:
        """Create every task's series at zero, so /metrics lists them before any request."""
        for t in tasks:
            self.requests.labels(task=t)
            self.latency.labels(task=t)
            self.batch_size.labels(task=t)
            for kind in ("bad_request", "bad_image", "internal"):
                self.errors.labels(task=t, kind=kind)


def get() -> Metrics:
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            _METRICS = Metrics()
        return _METRICS
