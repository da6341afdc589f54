"""The image preprocessing contract: how an image becomes a task's input, written once.

Evolution, export (its manifest and parity check) and the server all apply it, bit for bit:

1. decode, apply the EXIF orientation, convert to RGB (grayscale tiled, alpha dropped);
2. resize to S x S with Pillow's bilinear or bicubic filter (skipped at S x S already);
3. per channel c, float32 ``(x / 255 - mean[c]) / std[c]``, computed as ``x * scale[c] +
   offset[c]`` (``scale = 1 / (255 std)``, ``offset = -mean / std``, in float64, then rounded
   to float32); channels first (NCHW).

A :class:`Preprocessing` is one task's parameters (the root's mean, std and filter at the task's
image size S); the manifest stores it as it is.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

Resize = Literal["bilinear", "bicubic"]
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

Mean = Annotated[float, Field(ge=0.0, le=1.0)]
Std = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Step 1: a decoded Pillow image to a uint8 (H, W, 3) array, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_rgb(array: np.ndarray, size: int, resize: str = "bilinear") -> np.ndarray:
    """Step 2: square resize of one uint8 (H, W, 3) array with Pillow's ``resize`` filter
    ("bilinear" or "bicubic"); a no-op at size x size."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), FILTERS[resize]), dtype=np.uint8)


class Preprocessing(BaseModel):
    """One task's preprocessing: the contract above at ``image_size``, with the root's
    per-channel ``mean`` and ``std`` and its ``resize`` filter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["RGB"] = Field("RGB", description="step 1: decoded images are converted to RGB (grayscale tiled, alpha dropped)")
    exif_transpose: Literal[True] = Field(True, description="step 1: the EXIF orientation is applied before anything else")
    resize: Resize = Field(description="step 2: Pillow's filter for the square resize to image_size (the root's)")
    mean: tuple[Mean, Mean, Mean] = Field(description="step 3: per-channel mean in [0, 1] pixel units (the root's)")
    std: tuple[Std, Std, Std] = Field(description="step 3: per-channel std in [0, 1] pixel units (the root's)")
    layout: Literal["NCHW"] = Field("NCHW", description="the input's layout: float32, channels first")
    image_size: int = Field(gt=0, le=4096, description="the side S of the S x S input")

    @classmethod
    def signed_unit(cls, image_size: int) -> Preprocessing:
        """mean = std = 0.5 with bilinear resizing (x / 127.5 - 1, values in [-1, 1]): the
        preprocessing of ``mutask pretrain`` roots and of roots that record none."""
        return cls(resize="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), image_size=image_size)

    def at(self, image_size: int) -> Preprocessing:
        """The same preprocessing at another image size."""
        return Preprocessing(**dict(self.model_dump(), image_size=image_size))

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Step 3's float32 ``scale`` and ``offset``, one per channel (shape (3,))."""
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)

    def normalize(self, batch_uint8: np.ndarray) -> np.ndarray:
        """Step 3: uint8 (N, S, S, 3) to float32 (N, 3, S, S)."""
        x = np.asarray(batch_uint8)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"normalize takes a uint8 batch (N, H, W, 3), got shape {x.shape}")
        scale, offset = self.affine()
        # the same float32 multiply, then add, written once into the NCHW result: a tenth of the
        # time of astype * scale + offset and a transposing copy (0.06 vs 0.75 ms at 224 px)
        out = np.empty((x.shape[0], 3, *x.shape[1:3]), np.float32)
        np.multiply(x.transpose(0, 3, 1, 2), scale[:, None, None], out=out)
        out += offset[:, None, None]
        return out

    def image(self, image: Image.Image) -> np.ndarray:
        """Steps 1-3 for one decoded image: float32 (1, 3, S, S)."""
        return self.normalize(resize_rgb(to_rgb_array(image), self.image_size, resize=self.resize)[None])
