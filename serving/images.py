"""Uploaded bytes to a task's input, safely: guarded decoding (a byte limit; a pixel limit read
from the header before anything is decoded; every decoder failure an :class:`ImageError` whose
message fits a 400 answer), then the task's :class:`mutask.preprocessing.Preprocessing`.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from mutask.preprocessing import Preprocessing


class ImageError(ValueError):
    """The upload is not an image the server can use; the message says why (answered with 400)."""


def open_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes to a Pillow image whose header is read and checked (byte and pixel limits), not
    yet decoded (:func:`load_image` decodes it); :class:`ImageError` with the reason."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes, over the limit of {max_bytes} bytes (MUTASK_MAX_IMAGE_BYTES)")
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w <= 0 or h <= 0:
            raise ImageError(f"the image has no pixels ({w} x {h})")
        if w * h > max_pixels:
            raise ImageError(f"the image is {w} x {h} pixels, over the limit of {max_pixels} pixels (MUTASK_MAX_IMAGE_PIXELS)")
    except Exception as e:
        raise _image_error(e) from None
    return image


class PixelBudget:
    """The pixels one request may decode, all its images together (decoding costs tens of
    nanoseconds a pixel: a request that would take seconds is refused from its headers)."""

    def __init__(self, pixels: int):
        self.limit = self.left = int(pixels)
        self._lock = threading.Lock()

    def take(self, image: Image.Image) -> None:
        """Reserve the image's pixels; :class:`ImageError` when they do not fit."""
        w, h = image.size
        with self._lock:
            if w * h > self.left:
                raise ImageError(
                    f"the request's images hold more than {self.limit} pixels together (this one is {w} x {h}; "
                    "MUTASK_MAX_REQUEST_PIXELS): send smaller images, or fewer per request"
                )
            self.left -= w * h


def load_image(image: Image.Image) -> Image.Image:
    """Fully decode an image from :func:`open_image`; :class:`ImageError` if that fails."""
    try:
        image.load()
    except Exception as e:
        raise _image_error(e) from None
    return image


def to_input(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """A decoded image to the float32 (1, 3, S, S) batch the task's graph takes."""
    try:
        return pre.image(image)
    except Exception as e:  # a malformed EXIF block, an exotic mode Pillow cannot convert
        raise ImageError(f"the image could not be converted to RGB: {type(e).__name__}: {e}") from None


def preprocess_for(data: bytes, pres: list, *, max_bytes: int, max_pixels: int, budget: PixelBudget | None = None) -> list:
    """Uploaded bytes decoded once, then one float32 (1, 3, S, S) input per preprocessing of
    ``pres``; :class:`ImageError` on bad input or past the request's pixel ``budget``."""
    image = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    if budget is not None:
        budget.take(image)
    image = load_image(image)
    return [to_input(image, pre) for pre in pres]


def _image_error(e: Exception) -> ImageError:
    if isinstance(e, ImageError):
        return e
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError(f"the image is too large to decode safely: {e}")
    if isinstance(e, Image.UnidentifiedImageError):
        return ImageError("the file is not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)")
    if isinstance(e, MemoryError):
        return ImageError("the image is too large to decode")
    # truncated or corrupt data: OSError, SyntaxError, ValueError, struct.error, ...
    return ImageError(f"the image could not be decoded (truncated or corrupt?): {type(e).__name__}: {e}")
