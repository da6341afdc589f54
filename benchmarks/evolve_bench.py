"""Evolution throughput: mutask's candidate training against a plain timm training loop.

    python -m mutask.benchmarks.evolve_bench [--state STATE] [--repeats 5] [--steps 40]
    python -m mutask.benchmarks.evolve_bench --root timm:efficientnet_lite0 --image-size 64

Three trainings of the default root's architecture (or ``--root timm:NAME``'s, random init,
any root kind) on the same uint8 batches (batch 64, 32 px or ``--image-size``, no
augmentation), interleaved and repeated, medians reported:
- ``timm``: a plain loop over the timm model (SGD momentum, clip at norm 1; a CNN in train
  mode throughout, its BatchNorm statistics updating, no dropout);
- ``mutask_full``: :func:`evolve.train.train` on a path whose components are all clones
  (fine-tune all: the same parameters as timm's loop);
- ``mutask_frozen_half``: the same with the stem (embeddings, or a CNN's stem) and the bottom
  half of the blocks shared frozen (they run without autograd; a frozen BatchNorm in eval mode).
With ``--state``, also the time per task visit recorded in an evolved STATE. Results go to
``evolve.md`` (the default root) or ``evolve-<NAME>.md`` (``--root timm:NAME``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from mutask.benchmarks.common import median, write
from mutask.evolve.data import Split
from mutask.evolve.model import Component, ComponentStore, TaskPath, PathModel
from mutask.evolve.pretrain import ARCH
from mutask.evolve.roots import build_model, load_root, root_for
from mutask.evolve.train import model_input, train
from mutask.preprocessing import Preprocessing

NUM_CLASSES = 10
BATCH = 64
PRE = Preprocessing.signed_unit(ARCH["img_size"])  # the default root's preprocessing
NO_AUG = {"image_size": ARCH["img_size"], "crop_area_min": 1.0, "aspect_ratio_min": 1.0, "flip": False, "color_jitter": 0.0,
          "lr": 0.01, "lr_schedule": "cosine", "warmup_ratio": 0.1, "momentum": 0.9, "nesterov": False}


DEFAULT_SPEC = {"timm_model": "VisionTransformer", "kwargs": dict(ARCH, num_classes=NUM_CLASSES)}


def timm_model(root_arg: str | None) -> torch.nn.Module:
    """The plain loop's network: the default root's ViT, or ``timm:NAME`` with a
    NUM_CLASSES head and no dropout before it (a mutask head has none)."""
    if root_arg is None:
        return build_model(DEFAULT_SPEC)
    import timm

    return timm.create_model(root_arg.removeprefix("timm:"), num_classes=NUM_CLASSES, drop_rate=0.0)


def timm_loop(root_arg, images, labels, pre: Preprocessing, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    net = timm_model(root_arg)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (BATCH,), generator=gen)
        loss = F.cross_entropy(net(model_input(images[idx].numpy(), pre)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return steps * BATCH / (time.perf_counter() - t0)


def bench_root(root_arg: str | None, seed: int) -> Root:
    torch.manual_seed(seed)
    if root_arg is None:
        return root_for(DEFAULT_SPEC, build_model(DEFAULT_SPEC), "bench")
    return load_root(root_arg)


def mutask_path(root_arg, size: int, frozen_blocks: int, seed: int):
    root = bench_root(root_arg, seed)
    store = ComponentStore()
    root_path = root.add_to(store)
    fresh, ids = {}, []
    for cid in [c for c in root_path.components if store[c].name != root.head_name]:  # the root's own head left out
        name = store[cid].name
        pos = root.block_position(name)
        frozen = name in root.stem or (pos is not None and pos < frozen_blocks)
        if frozen and frozen_blocks > 0:
            ids.append(cid)
            continue
        comp = store.clone(cid)
        fresh[comp.id] = comp
        ids.append(comp.id)
    head = Component(store.new_id(), root.head_name, root.new_head(NUM_CLASSES))
    head.module.requires_grad_(True)
    fresh[head.id] = head
    ids.append(head.id)
    path = TaskPath("bench", "bench", ids, dict(NO_AUG, image_size=size, num_blocks=root.depth))
    return root, PathModel.from_store(store, path, fresh), [p for c in fresh.values() for p in c.module.parameters()]


def mutask_loop(root_arg, split, val, size: int, steps: int, frozen_blocks: int, seed: int) -> float:
    root, model, params = mutask_path(root_arg, size, frozen_blocks, seed)
    hp = dict(NO_AUG, image_size=size)
    t0 = time.perf_counter()
    train(model, params, split, val, hp, pre=root.preprocessing.at(size), steps=steps, batch_size=BATCH, validations=1, seed=seed)
    return steps * BATCH / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--state", help="an evolved STATE: report its time per task visit")
    ap.add_argument("--root", help="timm:NAME (random init): any root kind mutask takes (default: the default root's ViT)")
    ap.add_argument("--image-size", type=int, help=f"training image size (default {ARCH['img_size']})")
    ap.add_argument("--results", help="results directory (default benchmarks/results)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n = 2048
    size = a.image_size or ARCH["img_size"]
    root = bench_root(a.root, 0)
    pre = root.preprocessing.at(size) if a.root else PRE.at(size)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    split = Split(images, labels)
    val = Split(images[:64], labels[:64])  # one small validation, as a child's last evaluation
    timm_images, timm_labels = torch.from_numpy(images), torch.from_numpy(labels)
    runs = {"timm": [], "mutask_full": [], "mutask_frozen_half": []}
    half = root.depth // 2
    timm_loop(a.root, timm_images, timm_labels, pre, 5, 0)  # warm-up
    for r in range(a.repeats):  # interleaved, so drift hits every variant alike
        runs["timm"].append(timm_loop(a.root, timm_images, timm_labels, pre, a.steps, r))
        runs["mutask_full"].append(mutask_loop(a.root, split, val, size, a.steps, 0, r))
        runs["mutask_frozen_half"].append(mutask_loop(a.root, split, val, size, a.steps, half, r))
    med = {k: median(v) for k, v in runs.items()}
    doc = {
        "benchmark": "evolve_throughput",
        "architecture": a.root or ARCH,
        "image_size": size,
        "batch_size": BATCH,
        "steps_per_run": a.steps,
        "repeats": a.repeats,
        "images_per_s": {k: {"median": round(v, 1), "runs": [round(x, 1) for x in runs[k]]} for k, v in med.items()},
        "ratio_mutask_full_vs_timm": round(med["mutask_full"] / med["timm"], 3),
        "ratio_frozen_half_vs_full": round(med["mutask_frozen_half"] / med["mutask_full"], 3),
    }
    rows = [
        "| training loop | images/s (median) | ratio |",
        "|---|---:|---:|",
        f"| plain timm loop | {med['timm']:.0f} | 1.00 |",
        f"| mutask child, all components cloned | {med['mutask_full']:.0f} | {doc['ratio_mutask_full_vs_timm']:.2f} x timm |",
        f"| mutask child, bottom {half} blocks frozen | {med['mutask_frozen_half']:.0f} | {doc['ratio_frozen_half_vs_full']:.2f} x full |",
    ]
    if a.state:
        from mutask.evolve.state import System

        s = System.load(a.state)
        visits = {t: s.best_path(t).metrics.get("visit_seconds") for t in s.best}
        doc["visit_seconds"] = visits
        rows += ["", "| task | last visit (s) |", "|---|---:|"] + [f"| {t} | {v} |" for t, v in visits.items()]
    arch = f"root {a.root} (random init) at {size} px" if a.root else f"the default root's architecture at {size} px"
    md = f"{arch}; batch {BATCH}, {a.steps} steps per run, {a.repeats} interleaved repeats, medians.\n\n" + "\n".join(rows)
    write("evolve" if a.root is None else f"evolve-{a.root.removeprefix('timm:')}", doc, md, a.results)
    print(md)
    return doc


if __name__ == "__main__":
    main()
