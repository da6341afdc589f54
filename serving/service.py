"""The BentoML service: every task of an exported muNet system from one process (no torch).

``mutask serve ART`` or ``MUTASK_ARTIFACT=ART bentoml serve mutask.serving.service:Mutask``;
routes and settings: ``docs/serving.md``. A request takes one path: BentoML's route, the input's
body reader (:mod:`mutask.serving.api`), the handler, the batcher, the engine of the version it
holds (:mod:`mutask.serving.repository`). Bad input is BentoML's ``NotFound`` (404, an unknown
task) or ``BadInput`` (400), never a 500. A worker that cannot start stops the whole server.
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
from bentoml.exceptions import BentoMLException, NotFound
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route

from . import http, images, metrics
from .api import BatchInput, BatchPrediction, Prediction, PredictInput, PredictTasksInput, TaskRecord, TasksInput, TasksPrediction, prediction, refuse, task_records
from .batcher import MicroBatcher
from .engine import Engine, EngineError
from .repository import ENV_MODEL, Repository, ServingError, artifact_source, open_served, resolve_artifact_path
from .settings import Settings, SettingsError, cpu_count

log = logging.getLogger("bentoml.serve")

# A lone small PNG or JPEG (INLINE_BYTES, INLINE_PIXELS) is decoded on the event loop (a thread
# hop costs more) unless its header holds compressed chunks (a PNG's zTXt/iTXt/iCCP are inflated
# while the header is read: 60 KB of them held the loop ~160 ms); the rest in the decode pool.
INLINE_PIXELS = 128 * 128
INLINE_BYTES = 16 * 1024
_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
# BentoML's own paths, and the prefix of the OpenAPI page's assets
BENTOML_PATHS = ("/", "/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json")
ASSETS_PREFIX = "/static_content/"
# The page at /ui (serving/ui/: HTML and JavaScript that call the public API only): its files
UI_DIR = Path(__file__).resolve().parent / "ui"
_HTML, _JS = ("index.html", "text/html; charset=utf-8"), ("app.js", "text/javascript; charset=utf-8")
UI_FILES = {"/ui": _HTML, "/ui/": _HTML, "/ui/index.html": _HTML, "/ui/app.js": _JS}


def _ui_file(name: str, media: str):
    async def serve(request):
        return FileResponse(UI_DIR / name, media_type=media, headers={"cache-control": "no-cache"})

    return serve


def _startup_failed(exc: BaseException) -> None:
    """A worker that cannot start takes the server down (BentoML would restart it in a loop),
    saying why in the log and in ``MUTASK_STARTUP_ERROR_FILE`` (``mutask serve`` exits 2)."""
    message = str(exc) if isinstance(exc, (ServingError, SettingsError, EngineError)) else f"{type(exc).__name__}: {exc}"
    log.error("mutask: the service cannot start: %s", message)
    path = os.environ.get("MUTASK_STARTUP_ERROR_FILE")
    if path:
        try:
            Path(path).write_text(message)
        except OSError:
            pass
    if bentoml.server_context.worker_index is not None:  # in a server worker, not in-process
        import signal

        os.kill(os.getppid(), signal.SIGTERM)  # the arbiter: it stops this worker and exits


def one_line_client_errors(record: logging.LogRecord) -> bool:
    """A log filter: BentoML logs a client's 4xx with a traceback (a flood of bad input, a flood
    of tracebacks); keep the line with the status and message, drop the traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, BentoMLException) and exc.error_code < 500:
        record.msg, record.args = f"{record.getMessage()}: {exc.error_code.value} {exc}", ()
        record.exc_info = record.exc_text = None
    return True


class ErrorObjects:
    """ASGI middleware: BentoML 1.4 answers an error its handler raised as a one-element JSON
    list (``[{"error": ...}]``) while its OpenAPI document declares an object; this unwraps a
    4xx answer so it matches the schema."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held = None

        async def unwrap(message):
            nonlocal held
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                held = message
                return
            if held is not None:
                body = message.get("body", b"")
                if not message.get("more_body") and body.startswith(b"[{") and body.endswith(b"}]"):
                    body = body[1:-1]
                    headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
                    held = dict(held, headers=headers + [(b"content-length", str(len(body)).encode())])
                    message = dict(message, body=body)
                await send(held)
                held = None
            await send(message)

        await self.app(scope, receive, unwrap)


class Payload:
    """One version's engine (warm: :meth:`Engine.verify` ran every session at load), its own
    batcher (whose batches it counts in the metrics) and its task records."""

    def __init__(self, engine, number: int | None, *, max_batch: int = 32, max_wait_ms: float = 2.0):
        self.engine, self.number = engine, number
        self.records = task_records(engine, number)
        self.segment_seconds: dict[str, float] = {}  # what the metrics have counted of engine.stats
        self.batcher = MicroBatcher(engine, max_batch=max_batch, max_wait_ms=max_wait_ms, on_batch=self._count)

    def close(self) -> None:
        self.batcher.close()
        self.batcher = self.engine = None

    def _count(self, rows, seconds) -> None:
        m, engine, per_task = metrics.get(), self.engine, {}
        for task, n in rows:
            per_task[task] = per_task.get(task, 0) + n
        for task, n in per_task.items():
            m.batch_size.labels(task=task).observe(n)
        m.engine_batch.observe(sum(per_task.values()))
        if engine is None:  # closed meanwhile
            return
        for key, st in engine.stats.items():
            delta = st["seconds"] - self.segment_seconds.get(key, 0.0)
            if delta > 0:
                shared = key in engine.segments and engine.segments[key].shared  # a task's own graph never is
                m.segment_seconds.labels(segment=key, shared=str(shared).lower()).inc(delta)
                self.segment_seconds[key] = st["seconds"]


# Fail fast: the process that imports the service (the `bentoml serve` arbiter, an in-process
# caller) refuses to go on with a bad setting or a missing or bad artifact; a worker checks the
# settings here and the artifact as it loads it.
_SETTINGS = Settings.from_env() if artifact_source() is not None else None
if _SETTINGS is not None and bentoml.server_context.worker_index is None:  # a worker verifies it as it loads it
    open_served(resolve_artifact_path(), _SETTINGS.version)
if bentoml.server_context.worker_index is not None:  # a server worker: before uvicorn loads its configuration
    http.install()
_ACCESS = {"enabled": bool(_SETTINGS and _SETTINGS.access_log),
           "skip_paths": ["/metrics", "/healthz", "/livez", "/readyz", ASSETS_PREFIX.rstrip("/")]}
_TRACING = {} if _SETTINGS and _SETTINGS.tracing else {"excluded_urls": ["/predict", "/predict_tasks", "/predict_batch", "/tasks", *BENTOML_PATHS]}


@bentoml.asgi_app(Starlette(routes=[Route(path, _ui_file(*f), methods=["GET"]) for path, f in UI_FILES.items()]), path="/", name="mutask-ui")
@bentoml.service(
    name="mutask", workers=1, traffic={"timeout": 120, "max_concurrency": 1024}, metrics={"enabled": True},
    logging={"access": _ACCESS}, tracing=_TRACING,
)
class Mutask:
    """Every task of an exported muNet system; concurrent requests for any tasks batched together."""

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
        for handler in logging.getLogger("bentoml").handlers or logging.getLogger().handlers:
            if one_line_client_errors not in handler.filters:
                handler.addFilter(one_line_client_errors)
        # the paths served (the guard strips a trailing slash): it answers any other with a 404
        served = {api.route for api in Mutask.apis.values()} | set(BENTOML_PATHS) | {p.rstrip("/") for p in UI_FILES}
        http.configure(s, served, prefixes=(ASSETS_PREFIX,))
        m = self.metrics = metrics.get()
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, cpu_count())), thread_name_prefix="mutask-decode")
        self.repo = Repository(resolve_artifact_path(), build=self._build_version, close=Payload.close, pin=s.version, poll_s=s.poll_s,
                               on_swap=lambda old, new, seconds: self._serving(new, seconds), on_refuse=lambda n, why: m.refusals.inc())
        self._serving(self.repo.start())
        e = self.engine
        log.info("mutask: version %s of %s%s: %d tasks (%s) on %s (%s), weights %s, %d ONNX Runtime threads per session, "
                 "max batch %d, max wait %.1f ms", self.repo.current.number, self.repo.root,
                 " (pinned)" if s.version else f", polling every {s.poll_s:g} s" if self.repo.versioned else "",
                 len(e.tasks), ", ".join(e.tasks), e.device, ",".join(e.active_providers), e.weights_mode, e.threads, s.max_batch, s.max_wait_ms)

    def __is_ready__(self) -> bool:
        return bool(getattr(self, "repo", None) is not None and self.repo.current is not None)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.repo.stop()
        self.batcher.close()
        self._decode_pool.shutdown(wait=False)

    # ---- versions: each request reads the version it holds ----

    def _build_version(self, artifact, number) -> Payload:
        s = self.settings
        return Payload(Engine(artifact, device=s.device, threads=s.threads), number, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms)

    def _serving(self, version, load_seconds: float | None = None) -> None:
        if load_seconds is not None:  # swapped in
            self.metrics.swaps.inc()
            self.metrics.swap_seconds.observe(load_seconds)
        self.metrics.version.set(version.number or 0)
        self.metrics.init_tasks(version.payload.engine.tasks)

    # the served version's (a request holds its own: Repository.hold)
    engine = property(lambda self: self.repo.current.payload.engine)
    batcher = property(lambda self: self.repo.current.payload.batcher)

    # ---- the API ----

    @bentoml.api(route="/predict", input_spec=PredictInput)
    async def predict(self, task: str, image: bytes | Path) -> Prediction:
        """Classify one image for one task.

        Send multipart/form-data with `task` (a task id, see /tasks) and `image` (a file: PNG,
        JPEG or any format Pillow reads, up to MUTASK_MAX_IMAGE_BYTES, 10 MB by default). The
        image gets the task's preprocessing from the export manifest, exactly as in evaluation;
        concurrent requests, for any tasks, are batched. Answers `task`, the arg-max `label` and
        its `index`, and the top-5 `scores` (label -> softmax probability). 404 for an unknown
        task (the message lists the valid ones), 400 for a malformed request or a file that is
        not a usable image.
        """
        t0 = time.perf_counter()
        with self.repo.hold() as held:
            self._admit(held, [task])
            return (await self._infer(held, [task], [image], t0))[0][0]

    @bentoml.api(route="/predict_tasks", input_spec=PredictTasksInput)
    async def predict_tasks(self, image: bytes | Path, tasks: list[str] | None = None) -> TasksPrediction:
        """Classify one image for several tasks (or every task) in one request.

        Send multipart/form-data with `image` (a file, as for /predict) and `tasks`: task ids as
        a JSON list, comma-separated (`digits,shapes`) or the field repeated; leave `tasks` out
        for every task. The image is decoded once and every segment the tasks share runs once
        for it, so k tasks cost less than k requests. Answers `predictions`, one per task in the
        order asked (a task named twice answers once), each as /predict answers. 404 when a task
        is unknown, 400 as for /predict.
        """
        t0 = time.perf_counter()
        with self.repo.hold() as held:
            tasks = list(dict.fromkeys(tasks)) if tasks else list(held.engine.tasks)
            self._admit(held, tasks)
            out = await self._infer(held, tasks, [image], t0)
        return TasksPrediction(predictions=[answers[0] for answers in out])

    @bentoml.api(route="/predict_batch", input_spec=BatchInput)
    async def predict_batch(self, task: str, images: list[str]) -> BatchPrediction:
        """Classify several images for one task (JSON, images in base64).

        Send `{"task": TASK, "images": [BASE64, ...]}` (plain base64 or `data:image/...;base64,`
        URLs, 1 to MUTASK_MAX_BATCH_IMAGES of them). Answers one prediction per image, in order,
        each as /predict answers. 404 for an unknown task, 400 for an empty list, too many
        images, bad base64 or an image that cannot be used.
        """
        t0 = time.perf_counter()
        with self.repo.hold() as held:
            self._admit(held, [task])  # first: errors are counted under served task ids only
            blobs = []
            for i, s in enumerate(images):
                if s.startswith("data:") and "," in s:
                    s = s.split(",", 1)[1]
                try:
                    blobs.append(base64.b64decode(s, validate=True))
                except (binascii.Error, ValueError):
                    raise refuse(f"images[{i}] is not valid base64", task) from None
            return BatchPrediction(task=task, predictions=(await self._infer(held, [task], blobs, t0))[0])

    @bentoml.api(route="/tasks", input_spec=TasksInput)
    def tasks(self) -> dict[str, TaskRecord]:
        """Every task served: labels, image size, params, accounted params, validation and test
        accuracy, and its segment chain (which segments it shares with other tasks)."""
        return self.repo.current.payload.records

    # ---- the request path ----

    def _admit(self, held: Payload, tasks: list[str]) -> None:
        """Count a request for served tasks; NotFound (404) naming the valid ids otherwise."""
        valid = held.engine.tasks
        for task in tasks:
            if task not in valid:
                self.metrics.errors.labels(task="_unknown", kind="unknown_task").inc()
                shown = repr(task) if len(str(task)) <= 64 else repr(str(task)[:64]) + "..."
                raise NotFound(f"unknown task {shown}; valid tasks: {', '.join(valid)}")
        for task in tasks:
            self.metrics.requests.labels(task=task).inc()

    def _decode(self, pres: list, data: bytes | Path, budget: images.PixelBudget) -> list:
        """One image (bytes, or a Python caller's path), one input per preprocessing of ``pres``."""
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
        """A lone small image decoded on the event loop (see INLINE_BYTES), else None."""
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

    async def _infer(self, held: Payload, tasks: list[str], sources: list, t0: float) -> list[list[Prediction]]:
        """One list of predictions per task for ``sources`` (bytes or paths) from the version
        ``held``, each decoded once per distinct preprocessing, batched with other requests;
        latency from ``t0`` observed."""
        loop = asyncio.get_running_loop()
        specs, batcher = held.engine.tasks, held.batcher
        pres = list(dict.fromkeys(specs[t].preprocessing for t in tasks))
        with batcher.expect():
            try:
                xs = self._decode_small(pres, sources[0]) if len(sources) == 1 else None
                if xs is None:
                    budget = images.PixelBudget(self.settings.max_request_pixels)
                    per_image = await asyncio.gather(*(loop.run_in_executor(self._decode_pool, self._decode, pres, s, budget) for s in sources))
                    xs = [xi[0] if len(xi) == 1 else np.concatenate(xi, axis=0) for xi in zip(*per_image)]
            except images.ImageError as e:
                which = "" if len(sources) == 1 else " (one of the images)"
                raise refuse(f"bad image{which}: {e}", *tasks, kind="bad_image") from None
        by_pre = dict(zip(pres, xs))
        try:
            logits = await batcher.submit_tasks([(t, by_pre[specs[t].preprocessing]) for t in tasks])
        except Exception:
            for task in tasks:
                self.metrics.errors.labels(task=task, kind="internal").inc()
            raise
        answers = [[prediction(t, specs[t].labels, row) for row in out] for t, out in zip(tasks, logits)]
        seconds = time.perf_counter() - t0
        for task in tasks:
            self.metrics.latency.labels(task=task).observe(seconds)
        return answers


Mutask.add_asgi_middleware(ErrorObjects)
