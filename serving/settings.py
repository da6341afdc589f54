"""The server's settings, parsed once from the environment into one object.

``mutask serve`` turns its flags into these ``MUTASK_*`` variables (the BentoML worker is a
separate process, so the environment is how they reach it); ``bentoml serve`` users set them
directly. The service reads them once, at start, with :meth:`Settings.from_env`, and passes
what each part needs down: the engine, the decoder and the request parser read no
environment themselves. A bad value is a :class:`SettingsError` (exit code 2) naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from mutask.cores import available_cores as cpu_count  # noqa: F401 (the server's name for it)
from mutask.errors import MutaskError

DEVICES = ("auto", "cpu", "cuda")
ENGINE_MODES = ("segments", "per_task")


class SettingsError(MutaskError):
    """A ``MUTASK_*`` setting that cannot be used; the message names it and the fix."""


def default_threads() -> int:
    """ONNX Runtime intra-op threads: every core but one, which is left to the event loop,
    the image decoding and the batcher (at least 1)."""
    return max(1, cpu_count() - 1)


@dataclass(frozen=True)
class Settings:
    """Every setting of the server; the environment variable is ``MUTASK_`` + the upper-cased name."""

    device: str = "auto"  # auto (CUDA where onnxruntime-gpu finds a GPU), cpu, cuda
    ort_threads: int = 0  # 0: default_threads()
    max_batch: int = 32  # rows per engine batch
    max_wait_ms: float = 2.0  # how long a batch waits for requests still being decoded
    max_image_bytes: int = 10 * 1024 * 1024  # one uploaded image
    max_image_pixels: int = 16_000_000  # width x height of one image (4000 x 4000; decompression bombs)
    max_batch_images: int = 64  # images per /predict_batch request
    max_body_bytes: int = 64 * 1024 * 1024  # one /predict_batch body
    max_request_pixels: int = 48_000_000  # decoded pixels of all the images of one request together
    engine: str = "segments"  # segments (the server); per_task (the benchmarks' baseline)
    rows_per_run: int = 0  # rows per session run; 0: measured at start (serving/calibrate.py)
    ort_global_pools: bool = False  # one ONNX Runtime pool for all sessions (it spins; off by default)
    # HTTP limits, enforced below the application (mutask.serving.http)
    max_header_bytes: int = 32 * 1024  # request line + headers of one request
    max_headers: int = 100
    header_timeout_s: float = 10.0  # a request's headers (or a new connection's first request) must arrive within
    body_timeout_s: float = 60.0  # a request's body must arrive within, from its headers
    max_connections: int = 1000  # open connections; more are answered 503 and closed
    # an idle connection between requests stays open this long: longer than clients keep theirs
    # (httpx 5 s, aiohttp 15 s), so the client closes first; uvicorn's 5 s raced httpx's 5 s, and a
    # request sent as the server closed its connection came back as a reset (seen under load)
    keep_alive_s: float = 75.0

    @property
    def threads(self) -> int:
        return self.ort_threads or default_threads()

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = f"MUTASK_{f.name.upper()}"
            raw = env.get(name, "").strip()
            if raw:
                values[f.name] = _parse(name, raw, f.default)
        return cls(**values).validated()

    def to_env(self) -> dict[str, str]:
        """The environment that makes :meth:`from_env` return these settings."""
        return {f"MUTASK_{f.name.upper()}": _text(getattr(self, f.name)) for f in fields(self)}

    def validated(self) -> "Settings":
        if self.device not in DEVICES:
            raise SettingsError(f"MUTASK_DEVICE={self.device!r}: use one of {', '.join(DEVICES)}")
        if self.engine not in ENGINE_MODES:
            raise SettingsError(f"MUTASK_ENGINE={self.engine!r}: segments (the server) or per_task (a benchmark baseline)")
        for name in (
            "max_batch", "max_image_bytes", "max_image_pixels", "max_batch_images", "max_body_bytes", "max_request_pixels",
            "max_header_bytes", "max_headers", "header_timeout_s", "body_timeout_s", "max_connections", "keep_alive_s",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"MUTASK_{name.upper()} must be positive, got {getattr(self, name)}")
        if self.rows_per_run < 0:
            raise SettingsError(f"MUTASK_ROWS_PER_RUN must be positive (or 0 to measure it at start), got {self.rows_per_run}")
        if self.ort_threads < 0:
            raise SettingsError(f"MUTASK_ORT_THREADS must be positive (or 0 for the default), got {self.ort_threads}")
        if self.max_wait_ms < 0:
            raise SettingsError(f"MUTASK_MAX_WAIT_MS must be >= 0, got {self.max_wait_ms}")
        return self


def _parse(name: str, raw: str, default):
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r}: use 1 or 0")
    if isinstance(default, (int, float)):
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number") from None
        if isinstance(default, int):
            if value != int(value):
                raise SettingsError(f"{name}={raw!r} is not a whole number")
            return int(value)
        return value
    return raw.lower().replace("-", "_") if name == "MUTASK_ENGINE" else raw.lower()


def _text(value) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)
