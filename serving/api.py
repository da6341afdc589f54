"""The HTTP API's types: what each route takes (and how its body is read) and what it answers.

Each route's input is a ``bentoml.IODescriptor`` (its schema is the contract) that reads the
body itself: bounded, parsed in memory, every malformed request a ``BadInput`` (400) saying why.
BentoML's generic multipart parsing would fetch a URL given in a file field, write uploads to
files named by the client, JSON-decode text fields without a depth limit and take the first of
several files silently.
"""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BadInput
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from . import metrics
from .settings import Settings, SettingsError

FORM_USAGE = "send multipart/form-data with a text field `task` and a file field `image`"
TASKS_USAGE = "send multipart/form-data with a file field `image` and a text field `tasks` (task ids, comma-separated or repeated; leave it out for every task)"
BATCH_USAGE = 'send JSON {"task": TASK, "images": [BASE64, ...]}'
TASKS_INPUT_USAGE = "send /tasks no body or an empty JSON object {}"
SMALL_BODY = 64 * 1024  # POST /tasks
FORM_OVERHEAD = 256 * 1024  # a /predict body: the image plus the form around it
DRAIN_FACTOR = 4  # an over-size body is read (and dropped) up to this many limits, so the client sees the answer


def refuse(message: str, *tasks: str, kind: str = "bad_request") -> BadInput:
    """A request the server refuses (400, ``message`` the answer), counted in the metrics for
    each of ``tasks`` (none: ``_invalid``)."""
    errors = metrics.get().errors
    for task in tasks or ("_invalid",):
        errors.labels(task=task, kind=kind).inc()
    return BadInput(message)


# ---- answers --------------------------------------------------------------------------------


class Prediction(BaseModel):
    """One image's answer."""

    task: str = Field(description="The task id asked for")
    label: str = Field(description="The arg-max label")
    index: int = Field(description="The arg-max label's index in the task's labels")
    scores: dict[str, float] = Field(description="Top-5 labels and their softmax probabilities, best first")


class TasksPrediction(BaseModel):
    """One image's answer for each task asked for, in the order asked."""

    predictions: list[Prediction]


class BatchPrediction(BaseModel):
    """One answer per image, in order."""

    task: str
    predictions: list[Prediction]


class TaskRecord(BaseModel):
    labels: list[str]
    num_labels: int
    image_size: int = Field(description="Images are resized to image_size x image_size (the root's filter, see the manifest)")
    params: t.Optional[int] = Field(None, description="Parameters on the task's path")
    accounted_params: t.Optional[float] = Field(None, description="Parameters accounted to the task (shared ones divided among their tasks)")
    val_accuracy: t.Optional[float] = None
    test_accuracy: t.Optional[float] = None
    segments: list[str] = Field(description="The task's segment chain, first to last")
    shared_segments: list[str] = Field(description="Segments of the chain shared with other tasks")
    shared_params: t.Optional[int] = Field(None, description="Parameters of the task's path in segments shared with other tasks (the rest are its own)")
    version: t.Optional[int] = Field(None, description="The repository version serving the task (None: a version-less artifact)")


def prediction(task: str, labels: list[str], logits: np.ndarray, k: int = 5) -> Prediction:
    """One row of logits to the answer: arg-max label and index, top-k softmax scores."""
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-p, kind="stable")[: min(k, len(p))]
    index = int(np.argmax(logits))
    return Prediction(task=task, label=labels[index], index=index, scores={labels[int(j)]: float(p[j]) for j in order})


def task_records(engine, number: int | None = None) -> dict[str, TaskRecord]:
    """Each task's record as ``POST /tasks`` answers it, naming the version serving it."""
    out = {}
    for tid, task in engine.tasks.items():
        shared = [sid for sid in task.segments if engine.segments[sid].shared]
        components = dict.fromkeys(c for sid in shared for c in engine.segments[sid].components)
        out[tid] = TaskRecord(
            labels=task.labels, num_labels=len(task.labels), image_size=task.image_size, params=task.params,
            accounted_params=task.accounted_params, val_accuracy=task.metrics.val_accuracy, test_accuracy=task.metrics.test_accuracy,
            segments=task.segments, shared_segments=shared, version=number,
            shared_params=sum(engine.artifact.components[c].num_params for c in components),
        )
    return out


# ---- reading request bodies -----------------------------------------------------------------


def _settings():
    return bentoml.get_current_service().settings


def media_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request, limit: int, what: str) -> bytes:
    """The body, at most ``limit`` bytes: BadInput past it (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise refuse("bad Content-Length header") from None
        if size > limit:
            await _drain(request, limit)
            raise refuse(f"request body of {size} bytes is over the limit of {limit} bytes for {what}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                await _drain(request, limit)
                raise refuse(f"request body of more than {limit} bytes is over the limit for {what}")
            chunks.append(chunk)
    except ClientDisconnect:
        raise refuse("the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def _drain(request, limit: int) -> None:
    """Read and drop the rest of a refused body (up to a bound): the client reads the 400, not a reset."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_FACTOR * limit:
                return
    except (ClientDisconnect, RuntimeError):
        return


def task_text(raw: str) -> str:
    """A task field as text: BentoML's clients JSON-encode text fields (``"digits"``, quoted),
    others send them raw."""
    try:
        value = json.loads(raw) if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    except ValueError:
        return raw
    return value if isinstance(value, str) else raw


def task_names(raw: str) -> list[str]:
    """Task ids from one ``tasks`` field: a JSON list (as BentoML's clients send it), else
    comma-separated text (curl's ``-F tasks=a,b``)."""
    if raw.startswith("["):
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise refuse(f"`tasks` {raw[:64]!r} is not a JSON list of task ids: {TASKS_USAGE}")
    return task_text(raw).split(",")


async def read_form(request, max_image_bytes: int, many: bool = False) -> tuple:
    """(task, image bytes) of a /predict form, or with ``many`` (tasks, image bytes) of a
    /predict_tasks one (the ids in order, each once; none: every task); BadInput with the reason."""
    from starlette.formparsers import FormParser, MultiPartParser

    usage, route = (TASKS_USAGE, "/predict_tasks") if many else (FORM_USAGE, "/predict")
    body = await read_body(request, max_image_bytes + FORM_OVERHEAD, f"{route} (MUTASK_MAX_IMAGE_BYTES)")
    if not body:
        raise refuse(f"empty body: {usage}")
    media = media_type(request)

    async def once():
        yield body

    try:
        if media == "multipart/form-data":
            form = await MultiPartParser(request.headers, once(), max_files=4, max_fields=16).parse()
        elif media == "application/x-www-form-urlencoded":  # a form without a file: say which field is missing
            form = await FormParser(request.headers, once()).parse()
        else:
            raise refuse(f"Content-Type {media or 'missing'}: {usage}")
    except BadInput:
        raise
    except Exception as e:  # MultiPartException, a missing boundary, undecodable headers
        raise refuse(f"malformed multipart body ({getattr(e, 'message', None) or e}): {usage}") from None
    try:
        images = form.getlist("image")
        if many:
            fields = form.getlist("tasks")
            if any(isinstance(f, UploadFile) for f in fields):
                raise refuse(f"`tasks` must be a text field, not a file: {usage}")
            names = [n.strip() for f in fields for n in task_names(f)]
            if fields and not any(names):
                raise refuse(f"`tasks` is empty: name at least one task, or leave the field out for every task: {usage}")
            task = list(dict.fromkeys(n for n in names if n))
        else:
            task = form.get("task")
            if task is None:
                raise refuse(f"missing field `task`: {usage}")
            if isinstance(task, UploadFile):
                raise refuse(f"`task` must be a text field, not a file: {usage}")
            task = task_text(task)
        if not images:
            raise refuse(f"missing field `image`: {usage}")
        if len(images) > 1:
            raise refuse(f"{len(images)} `image` fields: one image per {route} request (use /predict_batch for more)")
        if not isinstance(images[0], UploadFile):
            raise refuse(f"`image` must be a file upload, not a text field: {usage}")
        return task, await images[0].read()
    finally:
        await form.close()


async def read_json(request, limit: int, what: str, usage: str, *, empty_ok: bool = False):
    """The JSON document of a body of at most ``limit`` bytes (``{}`` for no body with
    ``empty_ok``); BadInput naming ``usage`` for another media type, no body or invalid JSON."""
    media = media_type(request)
    if media not in ("", "application/json"):
        raise refuse(f"{usage} (Content-Type: application/json), not {media}")
    body = await read_body(request, limit, what)
    if empty_ok and not body:
        return {}
    if not body.strip():
        raise refuse(f"empty body: {usage}")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise refuse(f"the body is not valid JSON ({type(e).__name__}): {usage}") from None


async def read_batch(request, max_body_bytes: int, max_images: int) -> tuple[str, list[str]]:
    """(task, base64 images) of a /predict_batch JSON body; BadInput with the reason."""
    doc = await read_json(request, max_body_bytes, "/predict_batch (MUTASK_MAX_BODY_BYTES)", BATCH_USAGE)
    if not isinstance(doc, dict):
        raise refuse(f"the body is JSON but not an object: {BATCH_USAGE}")
    task, images = doc.get("task"), doc.get("images")
    if isinstance(task, int) and not isinstance(task, bool):
        task = str(task)
    if not isinstance(task, str):
        raise refuse(f"`task` must be a string (a task id, see POST /tasks): {BATCH_USAGE}")
    if images is None:
        raise refuse(f"missing field `images`: {BATCH_USAGE}")
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise refuse(f"`images` must be a list of base64 strings: {BATCH_USAGE}")
    if not images:
        raise refuse("`images` is empty: send at least one base64 image", task)
    if len(images) > max_images:
        raise refuse(f"{len(images)} images, over the limit of {max_images} per request (MUTASK_MAX_BATCH_IMAGES)", task)
    return task, images


# ---- the routes' inputs ---------------------------------------------------------------------

try:  # the schema states the limits the server enforces (the service refuses a bad setting itself)
    _LIMITS = Settings.from_env()
except SettingsError:
    _LIMITS = Settings.model_construct()
IMAGE = Field(description="The image: PNG, JPEG or any format Pillow reads, any size and mode, up to MUTASK_MAX_IMAGE_BYTES")
TASK = Field(description="Task id (see POST /tasks)", examples=["digits"])


class PredictInput(bentoml.IODescriptor):
    """POST /predict: multipart/form-data with ``task`` and one ``image`` file (bytes over HTTP;
    Python callers may pass a path)."""

    task: str = TASK
    image: Path = IMAGE

    @classmethod
    async def from_http_request(cls, request, serde) -> "PredictInput":
        task, image = await read_form(request, _settings().max_image_bytes)
        return cls.model_construct(task=task, image=image)


class PredictTasksInput(bentoml.IODescriptor):
    """POST /predict_tasks: multipart/form-data with one ``image`` file and ``tasks`` (a JSON
    list, comma-separated ids, or the field repeated; left out: every task)."""

    image: Path = IMAGE
    tasks: t.Optional[list[str]] = Field(
        None, min_length=1, examples=[["digits", "shapes"]],
        description="Task ids (see POST /tasks): a JSON list, comma-separated, or the field repeated; leave out for every task",
    )

    @classmethod
    async def from_http_request(cls, request, serde) -> "PredictTasksInput":
        tasks, image = await read_form(request, _settings().max_image_bytes, many=True)
        return cls.model_construct(tasks=tasks or None, image=image)


class BatchInput(bentoml.IODescriptor):
    """POST /predict_batch: JSON with ``task`` and ``images`` (base64 strings or data: URLs)."""

    task: str = TASK
    images: list[t.Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=_LIMITS.max_batch_images,
        description=f"Images as base64 strings (or data: URLs), 1 to MUTASK_MAX_BATCH_IMAGES ({_LIMITS.max_batch_images})",
    )

    @classmethod
    async def from_http_request(cls, request, serde) -> "BatchInput":
        s = _settings()
        task, images = await read_batch(request, s.max_body_bytes, s.max_batch_images)
        return cls.model_construct(task=task, images=images)


class TasksInput(bentoml.IODescriptor):
    """POST /tasks: no input (no body, or an empty JSON object)."""

    model_config = {"extra": "forbid"}

    @classmethod
    async def from_http_request(cls, request, serde) -> "TasksInput":
        if await read_json(request, SMALL_BODY, "/tasks", TASKS_INPUT_USAGE, empty_ok=True) != {}:
            raise refuse(TASKS_INPUT_USAGE)
        return cls.model_construct()
