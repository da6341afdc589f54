"""The BentoML service: every task of an exported muNet system from one process.

Run it with ``mutask serve ART`` or ``MUTASK_ARTIFACT=ART bentoml serve mutask.serving.service:Mutask``
(or ``MUTASK_BENTOML_MODEL=TAG``). Endpoints:

* ``POST /predict``: multipart form, ``task`` (a task id) and ``image`` (a file Pillow reads);
  answers ``{"task", "label", "index", "scores": {label: probability}}`` (top 5, softmax).
* ``POST /predict_batch``: JSON ``{"task": ..., "images": [base64, ...]}``; one answer per image.
* ``GET /tasks`` (or ``POST /tasks``): every task with labels, image size, params, accounted
  params and accuracy.
* BentoML's ``/livez``, ``/readyz`` (ready once every task's segment chain is loaded and
  verified), ``/metrics`` (with the per-task ``mutask_*`` series, see :mod:`serving.metrics`)
  and the OpenAPI page at ``/``.

Bad input never answers 500: an unknown task is a 404 naming the valid ids; a missing field,
a malformed body, a file that is not an image, a truncated one, one over the size limit
(``MUTASK_MAX_IMAGE_BYTES``, default 10 MB) or the pixel limit is a 400 with a clear message
(:class:`InputGuard` checks the body before BentoML parses it, the API checks the rest).

Settings (environment, checked before anything starts): ``MUTASK_DEVICE`` (auto, cpu, cuda),
``MUTASK_ORT_THREADS`` (default: all cores but one), ``MUTASK_MAX_BATCH`` (rows per engine batch, 32),
``MUTASK_MAX_WAIT_MS`` (2), ``MUTASK_MAX_IMAGE_BYTES`` (10 MB), ``MUTASK_MAX_IMAGE_PIXELS``
(40 M), ``MUTASK_MAX_BATCH_IMAGES`` (images per /predict_batch request, 64),
``MUTASK_MAX_BODY_BYTES`` (a /predict_batch body, 64 MB), ``MUTASK_ENGINE`` (segments; per_task is
the benchmark's baseline), ``MUTASK_ORT_GLOBAL_POOLS`` (0/1; default off: per-session pools, no spinning).

A worker that cannot start stops the whole server (no half-ready server behind a listening
socket); ``mutask serve`` then exits 2 with the reason.

No torch, no timm, no evolve: onnxruntime, numpy, Pillow, BentoML.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import json
import logging
import os
import time
import typing as t
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel, BeforeValidator, Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import metrics as _metrics
from . import preprocess
from .engine import Engine, EngineError, MicroBatcher, cpu_count, server_threads, top_k
from .loader import ENV_MODEL, ServingError, artifact_source, open_artifact

log = logging.getLogger("mutask.serving")

ROUTES = {"/predict", "/predict_batch", "/tasks"}
# a lone small image is decoded on the event loop (a thread hop costs more than decoding it):
# a PNG or JPEG of at most INLINE_BYTES and INLINE_PIXELS whose header holds nothing compressed
# (a PNG's zTXt/iTXt/iCCP chunks are inflated while its header is read: 60 KB of them held the
# loop for ~160 ms). Anything else goes to the decode pool.
INLINE_PIXELS = 128 * 128
INLINE_BYTES = 16 * 1024
_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
_STATE: dict = {}  # "service": the live instance (for GET /tasks and the guard's metrics)


def _env_number(name: str, default, cast=int):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return cast(float(raw)) if cast is int else cast(raw)
    except ValueError:
        raise ServingError(f"{name}={raw!r} is not a number") from None


def _use_global_pools() -> bool:
    """Whether the engine uses ONNX Runtime's global thread pool: ``MUTASK_ORT_GLOBAL_POOLS=1``.
    Off by default: the global pool's threads spin between runs (nothing in ONNX Runtime's
    Python API turns that off), and the spinning takes the cores the event loop, the decoding
    and the clients need; per-session pools are created with spinning off."""
    raw = os.environ.get("MUTASK_ORT_GLOBAL_POOLS", "").strip().lower()
    return raw in ("1", "true", "yes", "on")


def max_body_bytes() -> int:
    return _env_number("MUTASK_MAX_BODY_BYTES", 64 * 1024 * 1024)


def max_batch_images() -> int:
    return _env_number("MUTASK_MAX_BATCH_IMAGES", 64)


def _as_text(v):
    # multipart fields are JSON-decoded by BentoML: a task id "7" arrives as 7
    return v if isinstance(v, str) or v is None else json.dumps(v)


TaskId = t.Annotated[str, BeforeValidator(_as_text), Field(description="Task id (see GET /tasks)", examples=["mnist"])]


class Prediction(BaseModel):
    """One image's answer."""

    task: str = Field(description="The task id asked for")
    label: str = Field(description="The arg-max label")
    index: int = Field(description="The arg-max label's index in the task's labels")
    scores: dict[str, float] = Field(description="Top-5 labels and their softmax probabilities, best first")


class BatchPrediction(BaseModel):
    """One answer per image, in order."""

    task: str
    predictions: list[Prediction]


class TaskRecord(BaseModel):
    labels: list[str]
    num_labels: int
    image_size: int = Field(description="Images are resized to image_size x image_size (bilinear)")
    params: t.Optional[int] = Field(None, description="Parameters on the task's path")
    accounted_params: t.Optional[float] = Field(None, description="Parameters accounted to the task (shared ones divided among their tasks)")
    val_accuracy: t.Optional[float] = None
    test_accuracy: t.Optional[float] = None
    segments: list[str] = Field(description="The task's segment chain, first to last")
    shared_segments: list[str] = Field(description="Segments of the chain shared with other tasks")


def error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


# ---- the guard: checks a request body before BentoML parses it ------------------------------


class InputGuard:
    """ASGI middleware for the API routes: bounds the body (no unbounded buffering), requires
    the right content type, and parses /predict's form itself, so a malformed body, a missing
    or misplaced field becomes a clear 400 (BentoML would answer some of them with 500). A good
    /predict form for a known task is answered here by the same code as the API
    (:meth:`Mutask._predict_one`), since the form is parsed already: letting BentoML parse it
    again, into a temporary file, cost ~0.5 ms of the ~3 ms a request took. BentoML's outer
    middlewares (its metrics, tracing, access log, timeout, concurrency limit) still run. Any
    other /predict form (an unknown task) goes to the API re-encoded (task and image only, a
    safe file name); other bodies are replayed unchanged."""

    DRAIN_LIMIT = 256 * 1024 * 1024

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        route = scope.get("path", "").rstrip("/") or "/"
        if route not in ROUTES:
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        limit = preprocess.max_image_bytes() + 256 * 1024 if route == "/predict" else max_body_bytes()
        if route == "/tasks":
            limit = 64 * 1024
        try:
            declared = int(headers.get("content-length", "-1"))
        except ValueError:
            return await self._reject(scope, receive, send, 400, "bad Content-Length header", drain=False)
        if declared > limit:
            return await self._reject(scope, receive, send, 400, self._too_large(route, declared, limit))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await self._reject(scope, receive, send, 400, self._too_large(route, size, limit), more=message.get("more_body", False))
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem, task = None, None
        if route == "/predict":
            problem, task, form = await self._check_form(scope, body, media)
            if form is not None:
                svc = _STATE.get("service")
                name = _task_id(form[0])
                if svc is not None and name in svc.engine.tasks:
                    # the fast path: the form is parsed already, answer here (what the API
                    # would answer, without BentoML parsing it again into a temporary file)
                    return await _answer(svc, scope, receive, send, name, form[1])
                # anything else (an unknown task, say) gets the API's own answer
                body, content_type = _encode_form(*form)
                scope = dict(scope)
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")] + [
                    (b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode("latin-1"))
                ]
        elif media not in ("", "application/json"):
            problem = f"send {route} a JSON body (Content-Type: application/json), not {media}"
        elif route == "/predict_batch" and not body.strip():
            problem = 'empty body: send JSON {"task": TASK, "images": [BASE64, ...]}'
        if problem:
            _count_error(task, "bad_request")
            return await error(400, problem)(scope, _replay(b"", receive), send)
        return await self.app(scope, _replay(body, receive), send)

    @staticmethod
    def _too_large(route, size, limit):
        if route == "/predict":
            return f"request body of {size} bytes is over the image size limit of {preprocess.max_image_bytes()} bytes (MUTASK_MAX_IMAGE_BYTES)"
        if route == "/predict_batch":
            return f"request body of {size} bytes is over the limit of {limit} bytes (MUTASK_MAX_BODY_BYTES)"
        return f"request body of {size} bytes is too large for {route}"

    async def _reject(self, scope, receive, send, status, message, drain=True, more=True):
        _count_error(None, "bad_request")
        if drain and more:  # read (and drop) the rest, so the client sees the answer, not a reset
            seen = 0
            while seen < self.DRAIN_LIMIT:
                m = await receive()
                if m["type"] == "http.disconnect":
                    return
                seen += len(m.get("body", b""))
                if not m.get("more_body", False):
                    break
        await error(status, message)(scope, _replay(b"", receive), send)

    @staticmethod
    async def _check_form(scope, body, media):
        """(problem, known task or None, (task, image bytes, file name) or None)."""
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        usage = "send multipart/form-data with a text field `task` and a file field `image`"
        if not body:
            return f"empty body: {usage}", None, None
        if media not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return f"Content-Type {media or 'missing'}: {usage}", None, None
        inner = {k: v for k, v in scope.items() if k != "app"}  # parse errors raise, not HTTPException
        request = Request(inner, _replay(body, None))
        try:
            form = await request.form(max_files=4, max_fields=16)
        except Exception as e:
            return f"malformed multipart body ({getattr(e, 'message', None) or e}): {usage}", None, None
        try:
            task = form.get("task")
            images = form.getlist("image")
            if task is None:
                return f"missing field `task`: {usage}", None, None
            if isinstance(task, UploadFile):
                return f"`task` must be a text field, not a file: {usage}", None, None
            svc = _STATE.get("service")
            name = _task_id(task)
            known = name if (svc is not None and name in svc.engine.tasks) else None
            if not images:
                return f"missing field `image`: {usage}", known, None
            if len(images) > 1:
                return f"{len(images)} `image` fields: one image per /predict request (use /predict_batch for more)", known, None
            if not isinstance(images[0], UploadFile):
                return f"`image` must be a file upload, not a text field: {usage}", known, None
            data = await images[0].read()
            return None, known, (task, data, images[0].filename)
        finally:
            await form.close()


def _encode_form(task: str, image: bytes, filename: str | None) -> tuple[bytes, str]:
    """The form BentoML parses: the task and the image under a short, safe file name (a long or
    odd client file name would otherwise fail BentoML's temporary file)."""
    import re
    import secrets

    suffix = os.path.splitext(filename or "")[1]
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix) else ""
    boundary = "mutask-" + secrets.token_hex(16)
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="task"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n'.encode(),
            task.encode("utf-8"),
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="upload{suffix}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode(),
            image,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _task_id(raw: str):
    """The task id the API would see: BentoML JSON-decodes a multipart text field (``7`` -> 7,
    ``"a"`` -> a) before :data:`TaskId` validation turns it back into text."""
    try:
        value = json.loads(raw)
    except Exception:
        value = raw
    return _as_text(value)


async def _answer(svc, scope, receive, send, task: str, data: bytes) -> None:
    """Answer a good /predict form of a known task from the guard, as the API would."""
    try:
        out = await svc._predict_one(task, data)
        response = out if isinstance(out, JSONResponse) else Response(out.model_dump_json().encode("utf-8"), media_type="application/json")
    except Exception:
        log.exception("mutask: /predict failed")
        response = error(500, "An unexpected error has occurred, please check the server log.")
    _bentoml_headers(response)
    await response(scope, _replay(b"", receive), send)


def _bentoml_headers(response) -> None:
    """The headers BentoML adds to an API's answer (server name, request and trace ids)."""
    try:
        from bentoml._internal.container import BentoMLContainer
        from bentoml._internal.context import trace_context

        response.headers["Server"] = f"BentoML Service/{Mutask.name}"
        fmt = BentoMLContainer.logging_formatting.get()
        if trace_context.request_id is not None:
            response.headers["X-BentoML-Request-ID"] = format(trace_context.request_id, fmt["span_id"])
        if BentoMLContainer.http.response.trace_id.get() and trace_context.trace_id is not None:
            response.headers["X-BentoML-Trace-ID"] = format(trace_context.trace_id, fmt["trace_id"])
    except Exception:  # headers never break a request
        log.debug("BentoML headers unavailable", exc_info=True)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay


def _count_error(task, kind):
    try:
        _metrics.get().errors.labels(task=task or "_invalid", kind=kind).inc()
    except Exception:  # metrics never break a request
        log.debug("metrics unavailable", exc_info=True)


# ---- GET /tasks (BentoML APIs are POST; this small app answers the GET) ----------------------


async def _get_tasks(request):
    svc = _STATE.get("service")
    if svc is None:
        return error(503, "the service is starting")
    return JSONResponse({k: v.model_dump() for k, v in svc.task_records().items()})


tasks_app = Starlette(routes=[Route("/tasks", _get_tasks, methods=["GET"])])


# ---- the service ----------------------------------------------------------------------------


def check_settings() -> dict:
    """The MUTASK_* settings, validated: :class:`ServingError` (exit 2) for a bad one."""
    try:
        device = (os.environ.get("MUTASK_DEVICE") or "auto").strip().lower()
        if device not in ("auto", "cpu", "cuda", "gpu"):
            raise ServingError(f"MUTASK_DEVICE={device!r}: use auto, cpu or cuda")
        out = {
            "device": device,
            "threads": _env_number("MUTASK_ORT_THREADS", None),
            "max_batch": _env_number("MUTASK_MAX_BATCH", 32),
            "max_wait_ms": _env_number("MUTASK_MAX_WAIT_MS", 2.0, float),
            "max_image_bytes": preprocess.max_image_bytes(),
            "max_image_pixels": preprocess.max_image_pixels(),
            "max_batch_images": max_batch_images(),
            "max_body_bytes": max_body_bytes(),
        }
    except ValueError as e:
        raise ServingError(str(e)) from None
    for k in ("threads", "max_batch", "max_batch_images", "max_body_bytes"):
        if out[k] is not None and out[k] <= 0:
            raise ServingError(f"{k} must be positive, got {out[k]}")
    if out["max_wait_ms"] < 0:
        raise ServingError(f"MUTASK_MAX_WAIT_MS must be >= 0, got {out['max_wait_ms']}")
    mode = (os.environ.get("MUTASK_ENGINE") or "segments").replace("-", "_")
    if mode not in ("segments", "tree", "per_task"):  # tree: the name before artifact format 2
        raise ServingError(f"MUTASK_ENGINE={mode!r}: segments (the server) or per_task (a benchmark baseline)")
    return out


def _startup_failed(exc: BaseException) -> None:
    """A worker that cannot start takes the whole server down (BentoML would restart it in a
    loop behind a listening socket: a half-ready server). The message goes to the log and to
    ``MUTASK_STARTUP_ERROR_FILE`` (``mutask serve`` reads it and exits 2)."""
    message = str(exc) if isinstance(exc, (ServingError, EngineError)) else f"{type(exc).__name__}: {exc}"
    logging.getLogger("bentoml.serve").error("mutask: the service cannot start: %s", message)
    path = os.environ.get("MUTASK_STARTUP_ERROR_FILE")
    if path:
        try:
            Path(path).write_text(message)
        except OSError:
            pass
    try:
        from bentoml._internal.context import server_context

        in_worker = server_context.worker_index is not None
    except Exception:
        in_worker = False
    if in_worker:
        import signal

        os.kill(os.getppid(), signal.SIGTERM)  # the arbiter: it stops this worker and exits


# Fail fast: the process that imports the service (the `bentoml serve` arbiter, each worker)
# refuses to go on with a missing or bad artifact or setting, so no half-ready server listens.
if artifact_source() is not None:
    check_settings()
    open_artifact()


@bentoml.asgi_app(tasks_app, path="/", name="mutask-tasks")
@bentoml.service(
    name="mutask",
    workers=1,
    traffic={"timeout": 120, "max_concurrency": 1024},
    metrics={"enabled": True},
)
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
        settings = check_settings()
        self.artifact = open_artifact()
        self.engine = Engine(
            self.artifact, global_pools=_use_global_pools(), device=settings["device"], threads=settings["threads"] or server_threads()
        )
        self.metrics = _metrics.get()
        self.metrics.init_tasks(self.engine.tasks)
        self.max_image_bytes = settings["max_image_bytes"]
        self.max_image_pixels = settings["max_image_pixels"]
        self.batcher = MicroBatcher(self.engine, max_batch=settings["max_batch"], max_wait_ms=settings["max_wait_ms"], on_batch=self._on_batch)
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, cpu_count())), thread_name_prefix="mutask-decode")
        self._records = self._build_records()
        _STATE["service"] = self
        logging.getLogger("bentoml.serve").info(
            "mutask: %d tasks (%s), engine %s on %s (%s), %d ONNX Runtime threads%s, max batch %d, max wait %.1f ms",
            len(self.engine.tasks), ", ".join(self.engine.tasks), self.engine.mode, self.engine.device,
            ",".join(self.engine.active_providers), self.engine.threads,
            " in one global pool" if self.engine.describe()["ort_global_thread_pool"] else " per session",
            self.batcher.max_batch, self.batcher.max_wait * 1000,
        )

    def __is_ready__(self) -> bool:
        return bool(getattr(self, "engine", None) is not None and self.engine.ready)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.batcher.close()
        self._decode_pool.shutdown(wait=False)
        if _STATE.get("service") is self:
            _STATE.pop("service", None)

    # ---- helpers ----

    def _build_records(self) -> dict:
        out = {}
        for tid, info in self.engine.tasks.items():
            rec = info.record
            m = rec.get("metrics") or {}
            out[tid] = TaskRecord(
                labels=info.labels,
                num_labels=len(info.labels),
                image_size=info.image_size,
                params=rec.get("params"),
                accounted_params=rec.get("accounted_params"),
                val_accuracy=m.get("val_accuracy"),
                test_accuracy=m.get("test_accuracy"),
                segments=info.chain,
                shared_segments=[s for s in info.chain if self.engine.segments[s].shared],
            )
        return out

    def task_records(self) -> dict:
        return self._records

    def _on_batch(self, rows, seconds) -> None:
        per_task: dict = {}
        for task, n in rows:
            per_task[task] = per_task.get(task, 0) + n
        for task, n in per_task.items():
            self.metrics.batch_size.labels(task=task).observe(n)
        self.metrics.engine_batch.observe(sum(per_task.values()))
        stats = self.engine.stats
        seen = getattr(self, "_seg_seen", {})
        for sid, st in stats.items():
            delta = st["seconds"] - seen.get(sid, 0.0)
            if delta > 0:
                self.metrics.segment_seconds.labels(segment=sid, shared=str(self.engine.is_shared(sid)).lower()).inc(delta)
                seen[sid] = st["seconds"]
        self._seg_seen = seen

    def _unknown(self, task) -> JSONResponse:
        _count_error(None, "unknown_task")
        valid = list(self.engine.tasks)
        shown = repr(task) if len(str(task)) <= 64 else repr(str(task)[:64]) + "..."
        return error(404, f"unknown task {shown}; valid tasks: {', '.join(valid)}", valid_tasks=valid)

    def _prepare(self, info, data: bytes | Path):
        if isinstance(data, Path):
            try:
                size = data.stat().st_size
                if size > self.max_image_bytes:
                    raise preprocess.ImageError(
                        f"the image is {size} bytes, over the limit of {self.max_image_bytes} bytes (MUTASK_MAX_IMAGE_BYTES)"
                    )
                data = data.read_bytes()
            except OSError as e:
                raise preprocess.ImageError(f"the upload could not be read: {e}") from None
        return preprocess.preprocess_bytes(
            data, info.image_size, info.scale, info.offset, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels
        )

    async def _predict_one(self, task: str, image: bytes | Path) -> Prediction | JSONResponse:
        """/predict's answer (the API, and the guard's fast path for a known task)."""
        t0 = time.perf_counter()
        info = self.engine.tasks.get(task)
        if info is None:
            return self._unknown(task)
        self.metrics.requests.labels(task=task).inc()
        out = await self._infer(info, [image])
        if isinstance(out, JSONResponse):
            return out
        self.metrics.latency.labels(task=task).observe(time.perf_counter() - t0)
        return Prediction(**out[0])

    def _prepare_small(self, info, data):
        """A lone small image decoded here, on the event loop (see INLINE_BYTES); None for
        anything else (the decode pool's work)."""
        if not isinstance(data, bytes) or len(data) > INLINE_BYTES:
            return None
        if not (data.startswith(_JPEG) or (data.startswith(_PNG) and not any(c in data for c in (b"zTXt", b"iTXt", b"iCCP")))):
            return None
        image = preprocess.open_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
        w, h = image.size
        if w * h > INLINE_PIXELS:
            return None
        return preprocess.preprocess_image(preprocess.load_image(image), info.image_size, info.scale, info.offset)

    async def _infer(self, info, sources: list) -> list | JSONResponse:
        loop = asyncio.get_running_loop()
        with self.batcher.expect():
            try:
                x = self._prepare_small(info, sources[0]) if len(sources) == 1 else None
                if x is not None:
                    xs = [x]
                else:
                    xs = await asyncio.gather(*(loop.run_in_executor(self._decode_pool, self._prepare, info, s) for s in sources))
            except preprocess.ImageError as e:
                self.metrics.errors.labels(task=info.id, kind="bad_image").inc()
                which = "" if len(sources) == 1 else " (one of the images)"
                return error(400, f"bad image{which}: {e}", task=info.id)
        x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
        try:
            logits = await self.batcher.submit(info.id, x)
        except Exception:
            self.metrics.errors.labels(task=info.id, kind="internal").inc()
            raise
        return [top_k(info, row) for row in logits]

    # ---- the API ----

    @bentoml.api(route="/predict")
    async def predict(
        self,
        task: TaskId,
        image: t.Annotated[Path, Field(description="The image: PNG, JPEG or any format Pillow reads, any size and mode")],
    ) -> Prediction:
        """Classify one image for one task.

        Send multipart/form-data with `task` (a task id, see /tasks) and `image` (a file: PNG,
        JPEG or any format Pillow reads, any size and mode, up to MUTASK_MAX_IMAGE_BYTES, 10 MB
        by default). The image gets the task's own preprocessing from the export manifest
        (EXIF orientation, RGB, bilinear resize to the task's image size, [-1, 1] scaling),
        exactly as in evaluation. Concurrent requests, for any tasks, are batched together
        through the segments their tasks share.

        Answers `task`, the arg-max `label` and its `index`, and the top-5 `scores` (label ->
        softmax probability). 404 for an unknown task (the answer lists the valid ones), 400
        for a missing field, a malformed body or a file that is not a usable image.
        """
        return await self._predict_one(task, image)

    @bentoml.api(route="/predict_batch")
    async def predict_batch(
        self,
        task: TaskId,
        images: t.Annotated[list[str], Field(description="Images as base64 strings (or data: URLs), up to MUTASK_MAX_BATCH_IMAGES (64)")],
    ) -> BatchPrediction:
        """Classify several images for one task (JSON, images in base64).

        Send `{"task": TASK, "images": [BASE64, ...]}` (plain base64 or `data:image/...;base64,`
        URLs). Each image is preprocessed as in /predict; the answer holds one prediction per
        image, in order. 404 for an unknown task, 400 for an empty list, too many images, bad
        base64 or an image that cannot be used (the message says which one).
        """
        t0 = time.perf_counter()
        info = self.engine.tasks.get(task)
        if info is None:
            return self._unknown(task)
        self.metrics.requests.labels(task=task).inc()
        limit = max_batch_images()
        if not images:
            self.metrics.errors.labels(task=task, kind="bad_request").inc()
            return error(400, "`images` is empty: send at least one base64 image", task=task)
        if len(images) > limit:
            self.metrics.errors.labels(task=task, kind="bad_request").inc()
            return error(400, f"{len(images)} images, over the limit of {limit} per request (MUTASK_MAX_BATCH_IMAGES)", task=task)
        blobs = []
        for i, s in enumerate(images):
            if s.startswith("data:") and "," in s:
                s = s.split(",", 1)[1]
            try:
                blobs.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError):
                self.metrics.errors.labels(task=task, kind="bad_request").inc()
                return error(400, f"images[{i}] is not valid base64", task=task)
        out = await self._infer(info, blobs)
        if isinstance(out, JSONResponse):
            return out
        self.metrics.latency.labels(task=task).observe(time.perf_counter() - t0)
        return BatchPrediction(task=task, predictions=[Prediction(**p) for p in out])

    @bentoml.api(route="/tasks")
    def tasks(self) -> dict[str, TaskRecord]:
        """Every task served: labels, image size, params, accounted params, validation and test
        accuracy, and its segment chain (which segments it shares). `GET /tasks` answers the same."""
        return self._records


Mutask.add_asgi_middleware(InputGuard)
