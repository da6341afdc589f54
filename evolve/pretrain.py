"""``mutask pretrain``: a toy root for tests and experiments, a small timm ViT trained offline on
the ``symbols`` source task (Unicode symbols, disjoint from the suite), in the spirit of the
paper's ViT-Ti/16 three-block character root. It is not the default root: ``mutask evolve`` and
``mutask demo`` start from the ImageNet EfficientNet-Lite0 (``evolve.config.DEFAULT_ROOT``).

Architecture: 32 px input, 8 px patches (a 4 x 4 grid + class token), width 96, 4 blocks,
3 heads (0.48 M parameters): the quick budget trains it in a few minutes on 2 CPU cores.
Recipe (ours; the paper's roots come pretrained): AdamW, warm-up + cosine, light random
resized crops and colour jitter, label smoothing 0.1. Preprocessing: mean = std = 0.5 with
bilinear resizing (:meth:`mutask.preprocessing.Preprocessing.signed_unit`), recorded in the
root's ``config.json`` under ``"preprocessing"``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from mutask.cache import cache_dir
from mutask.preprocessing import Preprocessing

from .roots import build_model, load_root_dir, save_root_dir
from .roots.base import preprocessing_record
from .train import accuracy, augment, device, lr_scheduler, model_input, split_images

log = logging.getLogger("mutask")

ARCH = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)

# steps x batch per budget; quick is sized for < 8 minutes on 2 cores
BUDGETS = {
    "tiny": {"steps": 40, "batch_size": 64, "lr": 2e-3},
    "quick": {"steps": 2500, "batch_size": 128, "lr": 2e-3},
    "full": {"steps": 10000, "batch_size": 128, "lr": 1e-3},
}

AUGMENT = {"crop_area_min": 0.6, "aspect_ratio_min": 0.75, "flip": False, "color_jitter": 0.1}


def pretrain(out, budget: str = "quick", seed: int = 0, show_progress: bool = True) -> dict:
    """Train the default root on the pretraining source task and write it to ``out``
    (``config.json`` + ``model.safetensors``). Returns the config (with val accuracy)."""
    from mutask.progress import bar as progress_bar

    from .tasks import PRETRAIN_TASK, load_task

    cfg = BUDGETS[budget]
    data = load_task(PRETRAIN_TASK, seed=seed)
    torch.manual_seed(seed)
    pre = Preprocessing.signed_unit(ARCH["img_size"])
    spec = {"timm_model": "VisionTransformer", "kwargs": dict(ARCH, num_classes=data.num_classes), "preprocessing": preprocessing_record(pre)}
    vit = build_model(spec).to(device())
    opt = torch.optim.AdamW(vit.parameters(), lr=cfg["lr"], weight_decay=0.05)
    hp = dict(AUGMENT, lr=cfg["lr"], lr_schedule="cosine", warmup_ratio=0.05, image_size=ARCH["img_size"])
    images = split_images(data.train, pre)
    labels = torch.from_numpy(np.asarray(data.train.labels, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    steps, bs = cfg["steps"], cfg["batch_size"]
    sched = lr_scheduler(opt, steps, hp)
    t0 = time.perf_counter()
    vit.train()
    bar = progress_bar(steps, desc=f"pretrain toy root on {PRETRAIN_TASK} ({budget})", unit="step", disable=not show_progress, iterable=range(steps))
    for step in bar:
        idx = torch.randint(0, len(labels), (bs,), generator=gen)
        x = augment(model_input(images[idx.numpy()], pre, device()), hp, gen, pre)
        sched.step_update(step)
        loss = F.cross_entropy(vit(x), labels[idx].to(device()), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vit.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    vit.eval()
    train_s = time.perf_counter() - t0
    val_acc = accuracy(vit, data.validation, pre)
    spec.update(
        pretrained_on=PRETRAIN_TASK,
        class_names=list(data.class_names),
        budget=budget,
        seed=seed,
        steps=steps,
        batch_size=bs,
        val_accuracy=val_acc,
        chance=1.0 / data.num_classes,
        train_seconds=round(train_s, 1),
        torch_threads=torch.get_num_threads(),
    )
    save_root_dir(vit.cpu(), spec, out)
    log.info("pretrained root: validation accuracy %.3f (chance %.3f) in %.0f s -> %s", val_acc, 1 / data.num_classes, train_s, out)
    return spec


def toy_root_dir(budget: str = "quick"):
    return cache_dir() / "roots" / f"default-{budget}"


def toy_root(budget: str = "quick"):
    """The toy root, pretrained on first use and cached under the mutask cache (benchmarks that
    measure the engine on a small ViT use it; nothing a newcomer runs does)."""
    d = toy_root_dir(budget)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        log.warning("no cached toy root at %s: pretraining it now (budget %s)", d, budget)
        pretrain(d, budget=budget)
    return load_root_dir(d)
