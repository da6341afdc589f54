"""The image preprocessing contract: how an image becomes a task's input, written once.

Evolution evaluates (and trains) with it, export records it in the manifest and checks parity
with it, and the server applies it to every upload: all three call this module, so they agree
bit for bit. It needs Pillow and numpy only (no torch), so the server can import it.

1. decode, apply the EXIF orientation, convert to RGB (grayscale is tiled, alpha dropped);
2. resize to S x S with Pillow's bilinear filter (skipped when the image already is S x S);
3. float32 pixels * scale + offset (1/127.5 and -1: values in [-1, 1]), channels first (NCHW).

A :class:`Preprocessing` is the contract's parameters for one task (its image size S); the
export manifest stores it as it is (``tasks.<task>.preprocessing``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

SCALE = 1.0 / 127.5
OFFSET = -1.0


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Step 1: a decoded Pillow image to a uint8 (H, W, 3) array, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_rgb(array: np.ndarray, size: int) -> np.ndarray:
    """Step 2: square bilinear resize of one uint8 (H, W, 3) array; a no-op at size x size."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR), dtype=np.uint8)


class Preprocessing(BaseModel):
    """One task's preprocessing: the contract above at ``image_size``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["RGB"] = "RGB"
    exif_transpose: Literal[True] = True
    resize: Literal["bilinear"] = "bilinear"
    scale: float = SCALE
    offset: float = OFFSET
    layout: Literal["NCHW"] = "NCHW"
    image_size: int = Field(gt=0, le=4096)

    def normalize(self, batch_uint8: np.ndarray) -> np.ndarray:
        """Step 3: uint8 (N, S, S, 3) to float32 (N, 3, S, S), x * scale + offset."""
        x = np.asarray(batch_uint8).astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def image(self, image: Image.Image) -> np.ndarray:
        """Steps 1-3 for one decoded image: float32 (1, 3, S, S)."""
        return self.normalize(resize_rgb(to_rgb_array(image), self.image_size)[None])
