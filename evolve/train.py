"""Training and evaluation of one model on one task (a child, a baseline, or the root).

The recipe follows the muNet reference: SGD with momentum (optionally Nesterov), a warm-up
from lr/100 followed by a constant, cosine or cosine-with-restarts schedule (timm's
schedulers, stepped per update), gradient clipping at global norm 1, no dropout, no weight
decay, no label smoothing. The model is validated several times during training and keeps
its best evaluation (its parameters at that point).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from mutask.errors import MutaskError
from mutask.preprocessing import Preprocessing

from .config import PRECISIONS
from .data import Split


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, dev: torch.device, channels_last: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``dev``, None for plain fp32. ``auto``: bf16 on a
    CUDA GPU (fp16, with loss scaling, where the GPU has no bf16), fp32 on the CPU: bf16
    autocast measured slower there, even channels-last on a CPU with native bf16 (a generation
    of the real root: 7.57 s against 5.71 s at fp32, benchmarks/results/generation.md).
    ``channels_last`` is the model's memory format (kept for callers; no longer decides).
    Parameters, gradients and the optimizer stay fp32."""
    if precision not in PRECISIONS:
        raise MutaskError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    if dev.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise MutaskError("--precision fp16 needs a CUDA GPU; on the CPU use fp32 (or bf16, which the CPU autocasts).")
    return torch.bfloat16


def _autocast(dev: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=dev.type, dtype=dtype, enabled=dtype is not None)


def _require(pre) -> None:
    if not isinstance(pre, Preprocessing):
        raise TypeError(f"expected the path's Preprocessing (root.preprocessing.at(image_size)), got {pre!r}")


def model_input(batch_uint8: np.ndarray | torch.Tensor, pre: Preprocessing, dev: torch.device | None = None) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> the model's float32 (N, 3, S, S), by the path's preprocessing.
    Step 3 of the contract (per channel ``x * scale + offset``, float32, with
    :meth:`Preprocessing.affine`'s constants) runs where the model runs, so only uint8 pixels
    travel to a GPU (a quarter of the bytes, and no CPU pass over float pixels); the result
    equals :meth:`Preprocessing.normalize` bit for bit (a test holds it)."""
    _require(pre)
    x = torch.as_tensor(batch_uint8)
    if dev is not None:
        x = x.to(dev, non_blocking=True)
    scale, offset = (torch.from_numpy(a).to(x.device).view(1, 3, 1, 1) for a in pre.affine())
    return (x.permute(0, 3, 1, 2).float() * scale + offset).contiguous()


def split_images(split: Split, pre: Preprocessing) -> np.ndarray:
    """A split's images at the preprocessing's size and filter (contract steps 1-2)."""
    _require(pre)
    return split.resized(pre.image_size, resize=pre.resize)


def value_range(pre: Preprocessing) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per channel, the normalised values of pixel 0 and pixel 255: ``(0 - mean) / std`` and
    ``(1 - mean) / std`` ((-1, 1) each for :meth:`Preprocessing.signed_unit`)."""
    low = tuple((0.0 - m) / s for m, s in zip(pre.mean, pre.std))
    high = tuple((1.0 - m) / s for m, s in zip(pre.mean, pre.std))
    return low, high


def augment(x: torch.Tensor, hp: dict, gen: torch.Generator, pre: Preprocessing) -> torch.Tensor:
    """Training-time random resized crop, horizontal flip and colour jitter on a batch (N, 3, S, S)
    normalised by ``pre``, per the path's data keys; one batched grid_sample, output size kept."""
    n = x.shape[0]
    area_min, ar_min = float(hp["crop_area_min"]), float(hp["aspect_ratio_min"])
    flip, jitter = bool(hp["flip"]), float(hp["color_jitter"])
    if area_min >= 1.0 and ar_min >= 1.0 and not flip and jitter <= 0.0:
        return x
    u = torch.rand(n, 6, generator=gen).to(x.device)
    area = area_min + (1.0 - area_min) * u[:, 0]
    log_ar = math.log(ar_min) * (2 * u[:, 1] - 1)
    ar = torch.exp(log_ar)
    sx = torch.sqrt(area * ar).clamp(max=1.0)  # crop width / image width
    sy = torch.sqrt(area / ar).clamp(max=1.0)
    tx = (2 * u[:, 2] - 1) * (1 - sx)
    ty = (2 * u[:, 3] - 1) * (1 - sy)
    fx = torch.where((u[:, 4] < 0.5) & flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = sx * fx
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    if area_min < 1.0 or ar_min < 1.0 or flip:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if jitter > 0:
        x = color_jitter(x, jitter, gen, pre)
    return x


def color_jitter(x: torch.Tensor, jitter: float, gen: torch.Generator, pre: Preprocessing) -> torch.Tensor:
    """Per image, brightness +- ``jitter`` and contrast 1 +- ``jitter`` around the image's mean,
    in units where each channel's pixel range is [-1, 1] (so the strength does not depend on the
    root's mean and std), clamped to that range: per channel [(0 - mean) / std, (1 - mean) / std]
    in ``pre``'s normalised units."""
    n = x.shape[0]
    low, high = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for v in value_range(pre))
    centre, half = (high + low) / 2, (high - low) / 2  # 0 and 1 for mean = std = 0.5
    v = torch.rand(n, 2, generator=gen).to(x.device)
    brightness = ((2 * v[:, 0] - 1) * jitter).view(-1, 1, 1, 1)
    contrast = (1 + (2 * v[:, 1] - 1) * jitter).view(-1, 1, 1, 1)
    s = (x - centre) / half
    mean = s.mean(dim=(1, 2, 3), keepdim=True)
    s = ((s - mean) * contrast + mean + brightness).clamp(-1, 1)
    return s * half + centre


def lr_scheduler(optimizer: torch.optim.Optimizer, total: int, hp: dict) -> Scheduler:
    """timm's per-step scheduler for ``total`` steps: a linear warm-up from lr/100 over
    ``warmup_ratio`` of the steps (at least one), then ``hp["lr_schedule"]``: ``constant``,
    ``cosine`` (to zero at ``total``) or ``restarts`` (cosine with 2 restarts: 3 equal cycles).
    The peak lr is the optimizer's (``hp["lr"]``); call ``step_update(step)`` before step
    ``step`` (from 0)."""
    lr = float(hp["lr"])
    warm = max(1, int(round(total * float(hp["warmup_ratio"]))))
    common = dict(warmup_t=warm, warmup_lr_init=lr / 100, t_in_epochs=False)
    cycles = 3 if hp["lr_schedule"] == "restarts" else 1
    cycle = (total - warm) / cycles
    if hp["lr_schedule"] == "constant" or total - warm <= 1 or cycle == 1:
        # (with at most one step after the warm-up, or 1-step cycles, every step is at the peak)
        return StepLRScheduler(optimizer, decay_t=max(1, total), decay_rate=1.0, **common)
    return CosineLRScheduler(optimizer, t_initial=cycle, cycle_limit=cycles, warmup_prefix=True, **common)


def use_channels_last(models: list, dev: torch.device) -> bool:
    """Channels-last (NHWC) for convolutional roots on the CPU, where oneDNN's NHWC kernels run
    faster (benchmarks/results/generation.md): paths whose first step is a convolution over images."""
    first = models[0].steps[0] if hasattr(models[0], "steps") else next(models[0].children(), None)
    return dev.type == "cpu" and isinstance(first, nn.Conv2d)


def _input_format(model: nn.Module):
    """channels-last when ``model``'s first step is a convolution converted to it (inside :func:`memory_format`)."""
    first = model.steps[0] if hasattr(model, "steps") else None
    w = getattr(first, "weight", None)
    cl = isinstance(first, nn.Conv2d) and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@contextmanager
def memory_format(models: list, channels_last: bool):
    """Convert every module of ``models`` to channels-last for the block, and back after."""
    if not channels_last:
        yield
        return
    mods = {id(m): m for model in models for m in (model.steps if hasattr(model, "steps") else [model])}
    for m in mods.values():
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in mods.values():
            m.to(memory_format=torch.contiguous_format)


EVAL_PIXELS_ON_CPU = 1 << 21  # pixels per evaluation batch on the CPU: bounds activation memory at large sizes


@torch.no_grad()
def predict(model: nn.Module, split: Split, pre: Preprocessing, batch_size: int | None = None, precision: str = "fp32") -> np.ndarray:
    """Logits (float32) for a whole split, preprocessed by ``pre`` (the path's: the root's at
    the path's image size), no augmentation, in ``precision``. ``batch_size`` defaults to 256
    images on a GPU; on the CPU to as many as make :data:`EVAL_PIXELS_ON_CPU` pixels (8 to
    256), so that evaluating a ViT-S at 224 px holds tens, not hundreds, of images' activations."""
    dev = next(model.parameters()).device
    fmt = _input_format(model)
    dtype = autocast_dtype(precision, dev, fmt == torch.channels_last)
    if batch_size is None:
        batch_size = 256 if dev.type == "cuda" else max(8, min(256, EVAL_PIXELS_ON_CPU // (pre.image_size * pre.image_size)))
    images = split_images(split, pre)
    out = []
    with _autocast(dev, dtype):
        for i in range(0, len(images), batch_size):
            out.append(model(model_input(images[i : i + batch_size], pre, dev).contiguous(memory_format=fmt)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, split: Split, pre: Preprocessing, precision: str = "fp32") -> float:
    """Top-1 accuracy on a split preprocessed by ``pre``; 0 for an empty split."""
    if len(split) == 0:
        return 0.0
    logits = predict(model, split, pre, precision=precision)
    return float((logits.argmax(1) == split.labels).mean())


class Batches:
    """The training batches of a run, read one step ahead on a worker thread while the model
    trains on the current one (uint8 pixels; on CUDA in pinned memory, copied without blocking),
    then normalised on the model's device. ``order`` holds each step's row indices (drawn up front, so the order does not
    depend on the thread)."""

    def __init__(self, images, labels: np.ndarray, order: list[np.ndarray], pre: Preprocessing, dev: torch.device):
        import concurrent.futures

        self.images, self.labels, self.order, self.pre, self.dev = images, labels, order, pre, dev
        self.pin = dev.type == "cuda"
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mutask-batches")

    def _load(self, idx: np.ndarray):
        x, y = torch.from_numpy(self.images[idx]), torch.from_numpy(self.labels[idx])  # uint8 pixels
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def __iter__(self):
        try:
            ahead = self._pool.submit(self._load, self.order[0]) if self.order else None
            for step in range(len(self.order)):
                x, y = ahead.result()
                if step + 1 < len(self.order):
                    ahead = self._pool.submit(self._load, self.order[step + 1])
                yield model_input(x, self.pre, self.dev), y.to(self.dev, non_blocking=True)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def batch_order(n: int, batch_size: int, steps: int, gen: torch.Generator) -> list[np.ndarray]:
    """Each step's row indices: shuffled epochs, a partial epoch's rest dropped."""
    order, pos, out = torch.randperm(n, generator=gen), 0, []
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        out.append(order[pos : pos + batch_size].numpy())
        pos += batch_size
    return out


@dataclass
class TrainResult:
    val_accuracy: float
    best_step: int
    steps: int
    images_per_s: float  # training images per second of the training steps (validation not counted)
    curve: list  # [(step, val_accuracy)]


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    train_split: Split,
    val_split: Split,
    hp: dict,
    *,
    pre: Preprocessing,
    steps: int,
    batch_size: int,
    validations: int,
    seed: int,
    precision: str = "auto",
    progress=None,
) -> TrainResult:
    """Train ``params`` (only those: the rest of the model is frozen) and keep the best
    validation. ``pre`` is the path's preprocessing (the root's at ``hp["image_size"]``).
    ``seed`` fixes batch order and augmentation, so children of one generation see the same
    data. ``precision`` (:data:`PRECISIONS`) sets autocast for training and validation; fp16
    scales the loss. The model's trainable parameters end at their best evaluation, and so do
    the buffers of the modules that own them (a cloned BatchNorm's running statistics). A
    convolutional path on the CPU trains channels-last (:func:`use_channels_last`), its modules
    converted back afterwards."""
    import time

    if pre.image_size != int(hp["image_size"]):
        raise ValueError(f"train: preprocessing at image size {pre.image_size} for a path at {hp['image_size']}; pass root.preprocessing.at({hp['image_size']})")
    dev = next(model.parameters()).device
    channels_last = use_channels_last([model], dev)
    dtype = autocast_dtype(precision, dev, channels_last)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    images = split_images(train_split, pre)
    labels = np.asarray(train_split.labels, dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params, lr=float(hp["lr"]), momentum=float(hp["momentum"]), nesterov=bool(hp["nesterov"]) and float(hp["momentum"]) > 0)
    sched = lr_scheduler(opt, steps, hp)
    eval_at = sorted({max(1, round(steps * (k + 1) / validations)) for k in range(max(1, validations))})
    owned = {id(p) for p in params}
    buffers = [b for m in model.modules() if any(id(p) in owned for p in m.parameters(recurse=False)) for b in m.buffers(recurse=False)]
    model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    best = (-1.0, 0, None, None)
    curve = []
    seen, evaluating = 0, 0.0
    with memory_format([model], channels_last):
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(Batches(images, labels, batch_order(len(labels), batch_size, steps, gen), pre, dev), start=1):
            x = augment(x, hp, gen, pre).contiguous(memory_format=fmt)
            sched.step_update(step - 1)
            with _autocast(dev, dtype):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            seen += len(y)
            if step in eval_at:
                t_eval = time.perf_counter()
                model.eval()
                acc = accuracy(model, val_split, pre, precision=precision)
                model.train()
                evaluating += time.perf_counter() - t_eval
                curve.append((step, acc))
                if acc > best[0]:
                    best = (acc, step, [p.detach().clone() for p in params], [b.detach().clone() for b in buffers])
            if progress is not None:
                progress(step, steps, loss.item())
        elapsed = time.perf_counter() - t0 - evaluating  # training steps only
        model.eval()
        with torch.no_grad():
            for p, v in zip(list(params) + buffers, best[2] + best[3]):
                p.copy_(v)
    return TrainResult(best[0], best[1], steps, seen / max(elapsed, 1e-9), curve)
