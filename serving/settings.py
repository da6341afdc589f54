"""The server's settings: ``MUTASK_*`` environment variables, read by pydantic-settings (their
table: ``docs/serving.md``). ``mutask serve`` turns its flags into them (the BentoML worker is
another process); a bad value is a :class:`SettingsError` (exit code 2) naming the variable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from mutask.cores import available_cores as cpu_count
from mutask.errors import MutaskError


# the `mutask serve` flag of a setting, named in its error
FLAGS = {"device": "--device", "ort_threads": "--threads", "max_batch": "--max-batch", "max_wait_ms": "--max-wait-ms",
         "max_image_bytes": "--max-image-bytes", "version": "--version", "poll_s": "--poll-s"}


class SettingsError(MutaskError):
    """A ``MUTASK_*`` setting that cannot be used; the message names it and the fix."""


def default_threads() -> int:
    """ONNX Runtime intra-op threads by default: every core but one (at least 1)."""
    return max(1, cpu_count() - 1)


class Settings(BaseSettings):
    """Every setting of the server; the environment variable is ``MUTASK_`` + the upper-cased name."""

    model_config = SettingsConfigDict(env_prefix="MUTASK_", frozen=True, extra="ignore", env_ignore_empty=True)  # empty: the default

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA where onnxruntime-gpu finds a GPU
    ort_threads: int = Field(0, ge=0)  # 0: every core but one (left to the event loop and decoding)
    max_batch: int = Field(32, gt=0)  # rows per engine batch
    max_wait_ms: float = Field(2.0, ge=0)  # how long a batch waits for requests still being decoded
    max_image_bytes: int = Field(10 * 1024 * 1024, gt=0)  # one uploaded image
    max_image_pixels: int = Field(16_000_000, gt=0)  # width x height of one image (decompression bombs)
    max_batch_images: int = Field(64, gt=0)  # images per /predict_batch request
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)  # one /predict_batch body
    max_request_pixels: int = Field(48_000_000, gt=0)  # decoded pixels of all of one request's images
    # HTTP limits below the application (mutask.serving.http)
    max_header_bytes: int = Field(32 * 1024, gt=0)  # request line + headers of one request
    max_headers: int = Field(100, gt=0)
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive within
    body_timeout_s: float = Field(60.0, gt=0)  # a request's body must arrive within, from its headers
    max_connections: int = Field(1000, gt=0)  # open connections; more are answered 503 and closed
    # idle keep-alive: longer than clients' (httpx 5 s, aiohttp 15 s), so they close first
    # (uvicorn's 5 s raced httpx's: a request sent as the server closed came back as a reset)
    keep_alive_s: float = Field(75.0, gt=0)
    # BentoML's access log line and OpenTelemetry span for the prediction routes: off, as behind
    # a proxy that logs requests (each costs ~0.1 ms of a ~1 ms request); 1 turns either on
    access_log: bool = False
    tracing: bool = False
    # the model repository (mutask.serving.repository), for a directory of numbered versions
    version: int | None = Field(None, ge=1)  # pin this version (--version N); None: the newest, following new ones
    poll_s: float = Field(2.0, gt=0)  # look for a new (or removed) version every this many seconds (--poll-s S)

    @property
    def threads(self) -> int:
        return self.ort_threads or default_threads()

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """The settings from the environment, ``overrides`` (not None) on top."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            name = f"MUTASK_{field.upper()}" if field else "MUTASK_*"
            flag = f" ({FLAGS[field]})" if field in FLAGS else ""
            raise SettingsError(f"{name}={err.get('input')!r}{flag}: {err['msg']}") from None
