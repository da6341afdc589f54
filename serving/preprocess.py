"""The evaluation preprocessing contract, re-implemented with Pillow and numpy only.

The export manifest records, per task, the preprocessing its path was evaluated with
(``evolve.data.PREPROCESSING``) and its image size S. This module applies it to an uploaded
file, bit for bit as evaluation does (a test compares both on many images):

1. decode, apply the EXIF orientation, convert to RGB (grayscale is tiled, alpha dropped);
2. resize to S x S with Pillow's bilinear filter (skipped when the image already is S x S);
3. float32 pixels * scale + offset (1/127.5 and -1: values in [-1, 1]), channels first.

Decoding is guarded: a byte limit, a pixel limit (decompression bombs), and every decoder
failure (not an image, truncated, corrupt) becomes an :class:`ImageError` with a message fit
for a 400 answer. Serving never imports ``evolve`` (the direction is evolve -> export -> serving).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

# What serving knows how to apply; a manifest asking for anything else is refused at load.
SUPPORTED = {"mode": "RGB", "exif_transpose": True, "resize": "bilinear", "layout": "NCHW"}

DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class ImageError(ValueError):
    """The upload is not an image serving can use; the message says why (answered with 400)."""


def max_image_bytes() -> int:
    """The upload size limit: ``MUTASK_MAX_IMAGE_BYTES`` (bytes), default 10 MB."""
    return _env_int("MUTASK_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES)


def max_image_pixels() -> int:
    """The decoded size limit (width x height): ``MUTASK_MAX_IMAGE_PIXELS``, default 40 M."""
    return _env_int("MUTASK_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def check_spec(spec: dict, where: str = "manifest") -> tuple[float, float]:
    """Validate a manifest preprocessing record; returns (scale, offset). Raises ValueError."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: preprocessing must be a mapping, got {type(spec).__name__}")
    for key, want in SUPPORTED.items():
        if spec.get(key, want) != want:
            raise ValueError(f"{where}: preprocessing {key}={spec.get(key)!r} is not supported (serving applies {want!r})")
    try:
        return float(spec["scale"]), float(spec["offset"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: preprocessing needs numeric 'scale' and 'offset', got {spec!r}") from None


def open_image(data: bytes, *, max_bytes: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Bytes to a Pillow image whose header is read and checked (byte and pixel limits), not
    yet decoded (:func:`load_image` decodes it), or :class:`ImageError` with a clear reason."""
    max_bytes = max_image_bytes() if max_bytes is None else max_bytes
    max_pixels = max_image_pixels() if max_pixels is None else max_pixels
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes, over the limit of {max_bytes} bytes (MUTASK_MAX_IMAGE_BYTES)")
    try:
        # Image.open reads the header only (and raises DecompressionBombError past twice
        # Image.MAX_IMAGE_PIXELS); our own pixel limit is checked before anything is decoded.
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w <= 0 or h <= 0:
            raise ImageError(f"the image has no pixels ({w} x {h})")
        if w * h > max_pixels:
            raise ImageError(f"the image is {w} x {h} pixels, over the limit of {max_pixels} pixels (MUTASK_MAX_IMAGE_PIXELS)")
    except Exception as e:
        raise _image_error(e) from None
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Fully decode an image from :func:`open_image`; :class:`ImageError` if that fails."""
    try:
        image.load()
    except Exception as e:
        raise _image_error(e) from None
    return image


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


def decode(data: bytes, *, max_bytes: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Bytes to a fully decoded Pillow image, or :class:`ImageError` with a clear reason."""
    return load_image(open_image(data, max_bytes=max_bytes, max_pixels=max_pixels))


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Step 1: a decoded Pillow image to a uint8 (H, W, 3) array (EXIF orientation applied)."""
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_rgb(array: np.ndarray, size: int) -> np.ndarray:
    """Step 2: square bilinear resize of one uint8 (H, W, 3) array; a no-op at S x S."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalize(batch_uint8: np.ndarray, scale: float = 1.0 / 127.5, offset: float = -1.0) -> np.ndarray:
    """Step 3: uint8 (N, S, S, 3) to float32 (N, 3, S, S) with x * scale + offset."""
    x = batch_uint8.astype(np.float32) * np.float32(scale) + np.float32(offset)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_image(image: Image.Image, size: int, scale: float = 1.0 / 127.5, offset: float = -1.0) -> np.ndarray:
    """A decoded image to the float32 (1, 3, S, S) batch the task's graph takes."""
    try:
        rgb = to_rgb_array(image)
    except Exception as e:  # a malformed EXIF block, an exotic mode Pillow cannot convert
        raise ImageError(f"the image could not be converted to RGB: {type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"the image decoded to an unusable array of shape {rgb.shape}")
    return normalize(resize_rgb(rgb, size)[None], scale, offset)


def preprocess_bytes(data: bytes, size: int, scale: float = 1.0 / 127.5, offset: float = -1.0, **limits) -> np.ndarray:
    """Uploaded bytes to the float32 (1, 3, S, S) batch; :class:`ImageError` on bad input."""
    return preprocess_image(decode(data, **limits), size, scale, offset)
