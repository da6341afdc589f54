"""Per-task Prometheus series, exposed on BentoML's ``/metrics`` next to its own.

BentoML 1.4 deprecates ``bentoml.metrics`` in favour of ``prometheus_client`` used directly,
imported only once the worker has set ``PROMETHEUS_MULTIPROC_DIR`` (so the series are
written to the multiprocess files that BentoML's ``/metrics`` collects). Hence the lazy
:func:`get`: the series are created on first use, inside the serving process, once.

Series (the ``task`` label only ever takes a task id of the artifact, ``_unknown`` or
``_invalid``, never raw client input):

* ``mutask_requests_total{task}``: prediction requests per task (a batch request counts once;
  a /predict_tasks request once for each task it asks);
* ``mutask_errors_total{task, kind}``: rejected or failed requests (kind: unknown_task,
  bad_request, bad_image, internal);
* ``mutask_request_latency_seconds{task}``: request latency histogram (decode to answer);
* ``mutask_batch_size{task}``: rows of that task per engine batch (histogram);
* ``mutask_engine_batch_size``: rows per engine batch, all tasks together (histogram);
* ``mutask_version_swaps_total``, ``mutask_version_refusals_total``: versions swapped in and
  refused by the model repository; ``mutask_version_load_seconds``: loading one before its swap;
  ``mutask_version``: the version served (0: a version-less artifact);
* ``mutask_segment_seconds_total{segment, shared}``: compute time per graph: a segment id, or
  ``task:<id>`` for a task's own graph (what a batch of one task, or of tasks that share no
  segment, runs; never shared).
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
