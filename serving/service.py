"""The BentoML service: every task of an exported muNet system from one process.

Run it with ``mutask serve ART`` or ``MUTASK_ARTIFACT=ART bentoml serve mutask.serving.service:Mutask``
(or ``MUTASK_BENTOML_MODEL=TAG``). Routes: ``POST /predict`` (multipart: ``task``, ``image``),
``POST /predict_tasks`` (multipart: ``image``, ``tasks``: one image for several tasks, every
segment they share run once), ``POST /predict_batch`` (JSON, base64 images), ``GET``/``POST /tasks``, and BentoML's
``/livez``, ``/readyz`` (ready once every task's graphs are loaded and checked), ``/metrics``
(with the ``mutask_*`` series of :mod:`mutask.serving.metrics`) and the OpenAPI page at ``/``.

A request takes one path: BentoML's route, the input's own body reader
(:mod:`mutask.serving.api`), the handler below, the cross-task batcher, the engine. Bad input
never answers 500: an unknown task is a 404 naming the valid ids; a malformed body, a missing
field, a file that is not a usable image or one over a limit is a 400 with a clear message.
Settings come from the environment once (:class:`mutask.serving.settings.Settings`). A worker
that cannot start stops the whole server: no half-ready server behind a listening socket.

No torch, no timm, no evolve: onnxruntime, numpy, Pillow, BentoML.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import os
import time
from pathlib import Path

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import http, images, metrics
from .api import BatchInput, BatchPrediction, Prediction, PredictInput, PredictTasksInput, TaskRecord, TasksInput, TasksPrediction, prediction
from .batcher import MicroBatcher
from .engine import Engine, EngineError
from .loader import ENV_MODEL, ServingError, artifact_source, resolve_artifact_path
from . import live, page
from .settings import Settings, SettingsError, cpu_count

log = logging.getLogger("mutask.serving")

# A lone small image is decoded on the event loop (a thread hop costs more than decoding it):
# a PNG or JPEG of at most INLINE_BYTES and INLINE_PIXELS whose header holds nothing compressed
# (a PNG's zTXt/iTXt/iCCP chunks are inflated while its header is read: 60 KB of them held the
# loop for ~160 ms). Anything else is decoded in the decode pool.
INLINE_PIXELS = 128 * 128
INLINE_BYTES = 16 * 1024
_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _get_tasks(request):
    return JSONResponse({k: v.model_dump() for k, v in bentoml.get_current_service().records.items()})


# BentoML APIs answer POST; GET /tasks is this one route, answered by the same records.
tasks_app = Starlette(routes=[Route("/tasks", _get_tasks, methods=["GET"]), *page.ROUTES])


def _startup_failed(exc: BaseException) -> None:
    """A worker that cannot start takes the whole server down (BentoML would restart it in a
    loop behind a listening socket). The message goes to the log and to
    ``MUTASK_STARTUP_ERROR_FILE`` (``mutask serve`` reads it and exits 2)."""
    message = str(exc) if isinstance(exc, (ServingError, SettingsError, EngineError)) else f"{type(exc).__name__}: {exc}"
    logging.getLogger("bentoml.serve").error("mutask: the service cannot start: %s", message)
    path = os.environ.get("MUTASK_STARTUP_ERROR_FILE")
    if path:
        try:
            Path(path).write_text(message)
        except OSError:
            pass
    if bentoml.server_context.worker_index is not None:  # in a server worker, not in-process
        import signal

        os.kill(os.getppid(), signal.SIGTERM)  # the arbiter: it stops this worker and exits


def served_paths() -> set[str]:
    """Every path the service answers: its APIs, GET /tasks, BentoML's health, metrics and
    OpenAPI routes, and the OpenAPI page's static files."""
    paths = {api.route for api in Mutask.apis.values()} | {"/", "/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json"} | page.PATHS
    # the OpenAPI page's assets, served by BentoML from its package (the directory is BentoML's)
    assets = Path(bentoml.__file__).resolve().parent / "_internal" / "server" / "static_content"
    return paths | {f"/static_content/{f.name}" for f in assets.glob("*") if f.is_file()}


# Fail fast: the process that imports the service (the `bentoml serve` arbiter, each worker)
# refuses to go on with a bad setting or a missing or bad artifact.
if artifact_source() is not None:
    Settings.from_env()
    live.open_served(resolve_artifact_path(), live.options()[0])
if bentoml.server_context.worker_index is not None:  # a server worker: before uvicorn loads its configuration
    http.install()


@bentoml.asgi_app(tasks_app, path="/", name="mutask-tasks")
@bentoml.service(name="mutask", workers=1, traffic={"timeout": 120, "max_concurrency": 1024}, metrics={"enabled": True})
class Mutask:
    """Every task of an exported muNet system (ONNX segment graphs, one weight file), batched
    across tasks through the segments they share."""

    if os.environ.get(ENV_MODEL, "").strip() and not os.environ.get("MUTASK_ARTIFACT", "").strip():
        bento_model = bentoml.models.BentoModel(os.environ[ENV_MODEL].strip())  # shipped in a Bento

    def __init__(self) -> None:
        try:
            self._start()
        except Exception as e:
            _startup_failed(e)
            raise

    def _start(self) -> None:
        s = self.settings = Settings.from_env()
        http.configure(s, served_paths())
        self.metrics = metrics.get()
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, cpu_count())), thread_name_prefix="mutask-decode")
        self.repo = live.start(self, resolve_artifact_path())  # builds the first version with _build_version; polls
        logging.getLogger("bentoml.serve").info(
            "mutask: %d tasks (%s), engine %s on %s (%s), %d ONNX Runtime threads%s, max batch %d, max wait %.1f ms; batching: %s",
            len(self.engine.tasks), ", ".join(self.engine.tasks), self.engine.mode, self.engine.device,
            ",".join(self.engine.active_providers), self.engine.threads,
            " in one global pool" if self.engine.describe()["ort_global_thread_pool"] else " per session",
            s.max_batch, s.max_wait_ms, self.engine.batching["reason"],
        )

    def __is_ready__(self) -> bool:
        return bool(getattr(self, "repo", None) is not None and self.repo.current is not None)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.repo.stop()
        self.batcher.close()
        self._decode_pool.shutdown(wait=False)

    # ---- versions (serving/live.py): each request reads the version it holds ----

    def _build_version(self, artifact, number):
        """A version's engine, batcher and task records, warmed up (off the request path)."""
        s = self.settings
        engine = Engine(
            artifact, device=s.device, threads=s.threads, global_pools=s.ort_global_pools, mode=s.engine,
            rows_per_run=s.rows_per_run, max_rows=s.max_batch,
        )
        return live.Payload(engine, MicroBatcher(engine, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, on_batch=self._on_batch), number)

    version = property(lambda self: live.version_of(self))
    engine = property(lambda self: self.version.payload.engine)
    batcher = property(lambda self: self.version.payload.batcher)
    records = property(lambda self: self.version.payload.records)
    artifact = property(lambda self: self.version.artifact)

    # ---- the API ----

    @bentoml.api(route="/predict", input_spec=PredictInput)
    async def predict(self, task: str, image: bytes | Path, rejected: str | None = None) -> Prediction:
        """Classify one image for one task.

        Send multipart/form-data with `task` (a task id, see /tasks) and `image` (a file: PNG,
        JPEG or any format Pillow reads, any size and mode, up to MUTASK_MAX_IMAGE_BYTES, 10 MB
        by default). The image gets the task's own preprocessing from the export manifest
        (EXIF orientation, RGB, a square resize to the task's image size with the root's filter,
        the root's mean and std), exactly as in evaluation. Concurrent requests, for any tasks, are batched together
        through the segments their tasks share.

        Answers `task`, the arg-max `label` and its `index`, and the top-5 `scores` (label ->
        softmax probability). 404 for an unknown task (the answer lists the valid ones), 400
        for a missing field, a malformed body or a file that is not a usable image.
        """
        t0 = time.perf_counter()
        if (refused := self._admit(task, rejected)) is not None:
            return refused
        out = await self._infer([task], [image], t0)
        return out if isinstance(out, JSONResponse) else out[0][0]

    @bentoml.api(route="/predict_tasks", input_spec=PredictTasksInput)
    async def predict_tasks(self, image: bytes | Path, tasks: list[str] | None = None, rejected: str | None = None) -> TasksPrediction:
        """Classify one image for several tasks (or every task) in one request.

        Send multipart/form-data with `image` (a file, as for /predict) and `tasks`: task ids,
        comma-separated (`digits,shapes`) or the field repeated; leave `tasks` out for every
        task the server holds. The image is decoded once, preprocessed once per distinct
        preprocessing (image size) of those tasks, and every segment the tasks share runs once
        for it, so k tasks cost far less than k requests. Answers `predictions`: one answer per
        task, in the order asked (a task named twice answers once), each as /predict answers it.
        404 when a task is unknown (the answer lists the valid ones), 400 as for /predict.
        """
        t0 = time.perf_counter()
        if rejected is not None:
            return self._bad_request(rejected)
        tasks = tasks or list(self.engine.tasks)
        for task in tasks:
            if task not in self.engine.tasks:
                return self._unknown(task)
        for task in tasks:
            self.metrics.requests.labels(task=task).inc()
        out = await self._infer(tasks, [image], t0)
        return out if isinstance(out, JSONResponse) else TasksPrediction(predictions=[answers[0] for answers in out])

    @bentoml.api(route="/predict_batch", input_spec=BatchInput)
    async def predict_batch(self, task: str, images: list[str], rejected: str | None = None) -> BatchPrediction:
        """Classify several images for one task (JSON, images in base64).

        Send `{"task": TASK, "images": [BASE64, ...]}` (plain base64 or `data:image/...;base64,`
        URLs). Each image is preprocessed as in /predict; the answer holds one prediction per
        image, in order. 404 for an unknown task, 400 for an empty list, too many images, bad
        base64 or an image that cannot be used (the message says which one).
        """
        t0 = time.perf_counter()
        if (refused := self._admit(task, rejected)) is not None:
            return refused
        limit = self.settings.max_batch_images
        if not images:
            return self._bad_request("`images` is empty: send at least one base64 image", task)
        if len(images) > limit:
            return self._bad_request(f"{len(images)} images, over the limit of {limit} per request (MUTASK_MAX_BATCH_IMAGES)", task)
        blobs = []
        for i, s in enumerate(images):
            if s.startswith("data:") and "," in s:
                s = s.split(",", 1)[1]
            try:
                blobs.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError):
                return self._bad_request(f"images[{i}] is not valid base64", task)
        out = await self._infer([task], blobs, t0)
        return out if isinstance(out, JSONResponse) else BatchPrediction(task=task, predictions=out[0])

    @bentoml.api(route="/tasks", input_spec=TasksInput)
    def tasks(self, rejected: str | None = None) -> dict[str, TaskRecord]:
        """Every task served: labels, image size, params, accounted params, validation and test
        accuracy, and its segment chain (which segments it shares). `GET /tasks` answers the same."""
        if rejected is not None:
            return self._bad_request(rejected)
        return self.records

    # ---- the request path ----

    def _admit(self, task: str, rejected: str | None) -> JSONResponse | None:
        """The answer to a request that goes no further (a refused body, an unknown task), or
        None for a request of a served task (counted)."""
        if rejected is not None:
            return self._bad_request(rejected)
        if task not in self.engine.tasks:
            return self._unknown(task)
        self.metrics.requests.labels(task=task).inc()
        return None

    def _bad_request(self, message: str, task: str | None = None) -> JSONResponse:
        self.metrics.errors.labels(task=task or "_invalid", kind="bad_request").inc()
        return error(400, message, **({"task": task} if task else {}))

    def _unknown(self, task) -> JSONResponse:
        self.metrics.errors.labels(task="_unknown", kind="unknown_task").inc()
        valid = list(self.engine.tasks)
        shown = repr(task) if len(str(task)) <= 64 else repr(str(task)[:64]) + "..."
        return error(404, f"unknown task {shown}; valid tasks: {', '.join(valid)}", valid_tasks=valid)

    def _decode(self, pres: list, data: bytes | Path, budget: images.PixelBudget) -> list:
        """One image (bytes, or a path from a Python caller) decoded once, one input per
        preprocessing of ``pres``."""
        s = self.settings
        if isinstance(data, Path):
            try:
                size = data.stat().st_size
                if size > s.max_image_bytes:
                    raise images.ImageError(f"the image is {size} bytes, over the limit of {s.max_image_bytes} bytes (MUTASK_MAX_IMAGE_BYTES)")
                data = data.read_bytes()
            except OSError as e:
                raise images.ImageError(f"the upload could not be read: {e}") from None
        return images.preprocess_for(data, pres, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, budget=budget)

    def _decode_small(self, pres: list, data) -> list | None:
        """A lone small image decoded here, on the event loop (see INLINE_BYTES); None for
        anything else (the decode pool's work)."""
        if not isinstance(data, bytes) or len(data) > INLINE_BYTES:
            return None
        if not (data.startswith(_JPEG) or (data.startswith(_PNG) and not any(c in data for c in (b"zTXt", b"iTXt", b"iCCP")))):
            return None
        s = self.settings
        image = images.open_image(data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
        if image.size[0] * image.size[1] > INLINE_PIXELS:
            return None
        image = images.load_image(image)
        return [images.to_input(image, pre) for pre in pres]

    async def _infer(self, tasks: list[str], sources: list, t0: float) -> list[list[Prediction]] | JSONResponse:
        """Decode ``sources`` (bytes or paths) once per distinct preprocessing of ``tasks``, run
        them for every task batched with other requests, answer (one list of predictions per
        task); the request's latency (from ``t0``) is observed per task when it succeeds."""
        loop = asyncio.get_running_loop()
        pres = list(dict.fromkeys(self.engine.tasks[t].preprocessing for t in tasks))
        with self.batcher.expect():
            try:
                xs = self._decode_small(pres, sources[0]) if len(sources) == 1 else None
                if xs is None:
                    budget = images.PixelBudget(self.settings.max_request_pixels)
                    per_image = await asyncio.gather(*(loop.run_in_executor(self._decode_pool, self._decode, pres, s, budget) for s in sources))
                    xs = [xi[0] if len(xi) == 1 else np.concatenate(xi, axis=0) for xi in zip(*per_image)]
            except images.ImageError as e:
                for task in tasks:
                    self.metrics.errors.labels(task=task, kind="bad_image").inc()
                which = "" if len(sources) == 1 else " (one of the images)"
                return error(400, f"bad image{which}: {e}", **({"task": tasks[0]} if len(tasks) == 1 else {"tasks": tasks}))
        by_pre = dict(zip(pres, xs))
        try:
            logits = await self.batcher.submit_tasks([(t, by_pre[self.engine.tasks[t].preprocessing]) for t in tasks])
        except Exception:
            for task in tasks:
                self.metrics.errors.labels(task=task, kind="internal").inc()
            raise
        answers = [[prediction(t, self.engine.tasks[t].labels, row) for row in out] for t, out in zip(tasks, logits)]
        seconds = time.perf_counter() - t0
        for task in tasks:
            self.metrics.latency.labels(task=task).observe(seconds)
        return answers

    def _on_batch(self, rows, seconds) -> None:
        per_task: dict = {}
        for task, n in rows:
            per_task[task] = per_task.get(task, 0) + n
        for task, n in per_task.items():
            self.metrics.batch_size.labels(task=task).observe(n)
        self.metrics.engine_batch.observe(sum(per_task.values()))
        seen = self.version.payload.segment_seconds
        for key, st in self.engine.stats.items():
            delta = st["seconds"] - seen.get(key, 0.0)
            if delta > 0:
                self.metrics.segment_seconds.labels(segment=key, shared=str(self.engine.is_shared(key)).lower()).inc(delta)
                seen[key] = st["seconds"]


Mutask.add_asgi_middleware(live.HoldVersion, find_repository=lambda: getattr(bentoml.get_current_service(), "repo", None))
