"""The HTTP API's types: what each route takes (and how its body is read) and what it answers.

Each route's input is a ``bentoml.IODescriptor`` that BentoML uses for the OpenAPI page and
its clients, and whose :meth:`from_http_request` reads the body itself, on BentoML's one path
to the service's handler. BentoML's generic multipart parsing would fetch a URL given in a
file field, write every upload to a temporary file named after the client's file name (a long
name fails), JSON-decode text fields without a depth limit (a nested one fails with
RecursionError) and take the first of several files silently; here the body is bounded while
it is read, the form is parsed in memory, and every malformed request becomes a clear 400.
A request the parser refuses reaches the handler with ``rejected`` set (a field hidden from
the schema), so the handler answers it like any other bad input: no traceback in the log.
"""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

FORM_USAGE = "send multipart/form-data with a text field `task` and a file field `image`"
TASKS_USAGE = "send multipart/form-data with a file field `image` and a text field `tasks` (task ids, comma-separated or repeated; leave it out for every task)"
BATCH_USAGE = 'send JSON {"task": TASK, "images": [BASE64, ...]}'
SMALL_BODY = 64 * 1024  # POST /tasks
FORM_OVERHEAD = 256 * 1024  # a /predict body: the image plus the form around it
DRAIN_FACTOR = 4  # an over-size body is read (and dropped) up to this many limits, so the client sees the answer


class Rejected(Exception):
    """A request body the parser refuses; ``str(self)`` is the 400 message."""


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


# ---- reading request bodies -----------------------------------------------------------------


def _settings():
    return bentoml.get_current_service().settings


def media_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request, limit: int, what: str) -> bytes:
    """The body, at most ``limit`` bytes: :class:`Rejected` past it (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Rejected("bad Content-Length header") from None
        if size > limit:
            await _drain(request, limit)
            raise Rejected(f"request body of {size} bytes is over the limit of {limit} bytes for {what}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                await _drain(request, limit)
                raise Rejected(f"request body of more than {limit} bytes is over the limit for {what}")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Rejected("the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def _drain(request, limit: int) -> None:
    """Read and drop the rest of a refused body (up to a bound), so the client reads the 400
    instead of a reset connection."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_FACTOR * limit:
                return
    except (ClientDisconnect, RuntimeError):
        return


def task_text(raw: str) -> str:
    """A task field as text: BentoML's clients JSON-encode text fields (``"digits"`` with the
    quotes), other clients send them raw; only a JSON string literal is decoded."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            value = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(value, str):
            return value
    return raw


async def read_form(request, max_image_bytes: int, many: bool = False) -> tuple:
    """(task, image bytes) of a /predict multipart form, or with ``many`` (tasks, image bytes)
    of a /predict_tasks one (tasks: the ids asked for, in order, each once; empty when the
    form names none, meaning every task); :class:`Rejected` with the reason."""
    from starlette.formparsers import FormParser, MultiPartParser

    usage, route = (TASKS_USAGE, "/predict_tasks") if many else (FORM_USAGE, "/predict")
    body = await read_body(request, max_image_bytes + FORM_OVERHEAD, f"{route} (MUTASK_MAX_IMAGE_BYTES)")
    if not body:
        raise Rejected(f"empty body: {usage}")
    media = media_type(request)

    async def once():
        yield body

    try:
        if media == "multipart/form-data":
            form = await MultiPartParser(request.headers, once(), max_files=4, max_fields=16).parse()
        elif media == "application/x-www-form-urlencoded":  # a form without a file: say which field is missing
            form = await FormParser(request.headers, once()).parse()
        else:
            raise Rejected(f"Content-Type {media or 'missing'}: {usage}")
    except Rejected:
        raise
    except Exception as e:  # MultiPartException, a missing boundary, undecodable headers
        raise Rejected(f"malformed multipart body ({getattr(e, 'message', None) or e}): {usage}") from None
    try:
        images = form.getlist("image")
        if many:
            fields = form.getlist("tasks")
            if any(isinstance(f, UploadFile) for f in fields):
                raise Rejected(f"`tasks` must be a text field, not a file: {usage}")
            names = [n.strip() for f in fields for n in task_text(f).split(",")]
            if fields and not any(names):
                raise Rejected(f"`tasks` is empty: name at least one task, or leave the field out for every task: {usage}")
            task = list(dict.fromkeys(n for n in names if n))
        else:
            task = form.get("task")
            if task is None:
                raise Rejected(f"missing field `task`: {usage}")
            if isinstance(task, UploadFile):
                raise Rejected(f"`task` must be a text field, not a file: {usage}")
            task = task_text(task)
        if not images:
            raise Rejected(f"missing field `image`: {usage}")
        if len(images) > 1:
            raise Rejected(f"{len(images)} `image` fields: one image per {route} request (use /predict_batch for more)")
        if not isinstance(images[0], UploadFile):
            raise Rejected(f"`image` must be a file upload, not a text field: {usage}")
        return task, await images[0].read()
    finally:
        await form.close()


async def read_batch(request, max_body_bytes: int) -> tuple[str, list[str]]:
    """(task, base64 images) of a /predict_batch JSON body; :class:`Rejected` with the reason."""
    media = media_type(request)
    if media not in ("", "application/json"):
        raise Rejected(f"send /predict_batch a JSON body (Content-Type: application/json), not {media}")
    body = await read_body(request, max_body_bytes, "/predict_batch (MUTASK_MAX_BODY_BYTES)")
    if not body.strip():
        raise Rejected(f"empty body: {BATCH_USAGE}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise Rejected(f"the body is not valid JSON ({type(e).__name__}): {BATCH_USAGE}") from None
    if not isinstance(doc, dict):
        raise Rejected(f"the body is JSON but not an object: {BATCH_USAGE}")
    task, images = doc.get("task"), doc.get("images")
    if isinstance(task, int) and not isinstance(task, bool):
        task = str(task)
    if not isinstance(task, str):
        raise Rejected(f"`task` must be a string (a task id, see GET /tasks): {BATCH_USAGE}")
    if images is None:
        raise Rejected(f"missing field `images`: {BATCH_USAGE}")
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise Rejected(f"`images` must be a list of base64 strings: {BATCH_USAGE}")
    return task, images


# ---- the routes' inputs ---------------------------------------------------------------------

Refusal = SkipJsonSchema[t.Optional[str]]


class PredictInput(bentoml.IODescriptor):
    """POST /predict: multipart/form-data with ``task`` and one ``image`` file. Over HTTP the
    parsed upload reaches the handler as bytes; Python callers may pass a file path."""

    task: str = Field(description="Task id (see GET /tasks)", examples=["digits"])
    image: Path = Field(description="The image: PNG, JPEG or any format Pillow reads, any size and mode")
    rejected: Refusal = None

    @classmethod
    async def from_http_request(cls, request, serde) -> "PredictInput":
        try:
            task, image = await read_form(request, _settings().max_image_bytes)
        except Rejected as e:
            return cls.model_construct(task=None, image=None, rejected=str(e))
        return cls.model_construct(task=task, image=image, rejected=None)


class PredictTasksInput(bentoml.IODescriptor):
    """POST /predict_tasks: multipart/form-data with one ``image`` file and ``tasks`` (task
    ids, comma-separated or the field repeated; left out: every task)."""

    tasks: t.Optional[list[str]] = Field(None, description="Task ids (see GET /tasks), comma-separated or repeated; leave out for every task", examples=[["digits", "shapes"]])
    image: Path = Field(description="The image: PNG, JPEG or any format Pillow reads, any size and mode")
    rejected: Refusal = None

    @classmethod
    async def from_http_request(cls, request, serde) -> "PredictTasksInput":
        try:
            tasks, image = await read_form(request, _settings().max_image_bytes, many=True)
        except Rejected as e:
            return cls.model_construct(tasks=None, image=None, rejected=str(e))
        return cls.model_construct(tasks=tasks or None, image=image, rejected=None)


class BatchInput(bentoml.IODescriptor):
    """POST /predict_batch: JSON with ``task`` and ``images`` (base64 strings or data: URLs)."""

    task: str = Field(description="Task id (see GET /tasks)", examples=["digits"])
    images: list[str] = Field(description="Images as base64 strings (or data: URLs), up to MUTASK_MAX_BATCH_IMAGES (64)")
    rejected: Refusal = None

    @classmethod
    async def from_http_request(cls, request, serde) -> "BatchInput":
        try:
            task, images = await read_batch(request, _settings().max_body_bytes)
        except Rejected as e:
            return cls.model_construct(task=None, images=None, rejected=str(e))
        return cls.model_construct(task=task, images=images, rejected=None)


class TasksInput(bentoml.IODescriptor):
    """POST /tasks: no input (an empty body or a JSON object)."""

    rejected: Refusal = None

    @classmethod
    async def from_http_request(cls, request, serde) -> "TasksInput":
        media = media_type(request)
        try:
            if media not in ("", "application/json"):
                raise Rejected(f"send /tasks no body or a JSON one (Content-Type: application/json), not {media}")
            await read_body(request, SMALL_BODY, "/tasks")
        except Rejected as e:
            return cls.model_construct(rejected=str(e))
        return cls.model_construct(rejected=None)
