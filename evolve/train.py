"""Training and evaluation of one model on one task (a child, a baseline, or the root).

The recipe follows the muNet reference: SGD with momentum (optionally Nesterov), a warm-up
from lr/100 followed by a constant, cosine or cosine-with-restarts schedule (timm's
schedulers, stepped per update), gradient clipping at global norm 1, no dropout, no weight
decay, no label smoothing. The model is validated several times during training and keeps
its best evaluation (its parameters at that point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from mutask.preprocessing import Preprocessing

from .data import Split


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_input(batch_uint8: np.ndarray, size: int, dev: torch.device | None = None) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> the model's float32 (N, 3, S, S), by the preprocessing contract."""
    x = torch.from_numpy(Preprocessing(image_size=size).normalize(batch_uint8))
    return x if dev is None else x.to(dev, non_blocking=True)


def augment(x: torch.Tensor, hp: dict, gen: torch.Generator) -> torch.Tensor:
    """Training-time random resized crop, horizontal flip and colour jitter on a normalised
    batch (N, 3, S, S), per the path's data keys; one batched grid_sample, output size kept."""
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
        v = torch.rand(n, 2, generator=gen).to(x.device)
        brightness = (2 * v[:, 0] - 1) * jitter
        contrast = 1 + (2 * v[:, 1] - 1) * jitter
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast.view(-1, 1, 1, 1) + mean + brightness.view(-1, 1, 1, 1)).clamp(-1, 1)
    return x


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


@torch.no_grad()
def predict(model: nn.Module, split: Split, image_size: int, batch_size: int = 256) -> np.ndarray:
    """Logits for a whole split (evaluation preprocessing, no augmentation)."""
    dev = next(model.parameters()).device
    images = split.resized(image_size)
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(model_input(images[i : i + batch_size], image_size, dev)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, split: Split, image_size: int) -> float:
    if len(split) == 0:
        return 0.0
    logits = predict(model, split, image_size)
    return float((logits.argmax(1) == split.labels).mean())


@dataclass
class TrainResult:
    val_accuracy: float
    best_step: int
    steps: int
    images_per_s: float
    curve: list  # [(step, val_accuracy)]


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    train_split: Split,
    val_split: Split,
    hp: dict,
    *,
    steps: int,
    batch_size: int,
    validations: int,
    seed: int,
    progress=None,
) -> TrainResult:
    """Train ``params`` (only those: the rest of the model is frozen) and keep the best
    validation. ``seed`` fixes batch order and augmentation, so children of one generation
    see the same data. The model's trainable parameters end at their best evaluation."""
    import time

    dev = next(model.parameters()).device
    size = int(hp["image_size"])
    images = train_split.resized(size)
    labels = torch.from_numpy(np.asarray(train_split.labels, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params, lr=float(hp["lr"]), momentum=float(hp["momentum"]), nesterov=bool(hp["nesterov"]) and float(hp["momentum"]) > 0)
    sched = lr_scheduler(opt, steps, hp)
    eval_at = sorted({max(1, round(steps * (k + 1) / validations)) for k in range(max(1, validations))})
    best = (-1.0, 0, None)
    curve = []
    order = torch.randperm(len(labels), generator=gen)
    pos = 0
    model.train()
    t0 = time.perf_counter()
    seen = 0
    for step in range(1, steps + 1):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(labels), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x = augment(model_input(images[idx.numpy()], size, dev), hp, gen)
        y = labels[idx].to(dev)
        sched.step_update(step - 1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen += len(idx)
        if step in eval_at:
            model.eval()
            acc = accuracy(model, val_split, size)
            model.train()
            curve.append((step, acc))
            if acc > best[0]:
                best = (acc, step, [p.detach().clone() for p in params])
        if progress is not None:
            progress(step, steps, loss.item())
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        for p, v in zip(params, best[2]):
            p.copy_(v)
    return TrainResult(best[0], best[1], steps, seen / max(elapsed, 1e-9), curve)
