"""Evolution throughput: mutask's candidate training against a plain timm training loop.

    python -m mutask.benchmarks.evolve_bench [--state STATE] [--repeats 5] [--steps 40]

Three trainings of the default root's architecture on the same uint8 batches (batch 64,
32 px, no augmentation), interleaved and repeated, medians reported:
- ``timm``: a plain loop over ``timm``'s VisionTransformer (SGD momentum, clip at norm 1);
- ``mutask_full``: :func:`evolve.train.train` on a path whose components are all clones
  (fine-tune all: the same parameters as timm's loop);
- ``mutask_frozen_half``: the same with the embeddings and the bottom half of the blocks
  shared frozen (they run without autograd).
With ``--state``, also the time per task visit recorded in an evolved STATE.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from mutask.benchmarks.common import median, write
from mutask.evolve.data import Split
from mutask.evolve.model import Component, ComponentStore, TaskPath, PathModel, block_index, component_kind, new_head
from mutask.evolve.pretrain import ARCH
from mutask.evolve.root import Root, build_vit
from mutask.evolve.train import model_input, train
from mutask.preprocessing import Preprocessing

NUM_CLASSES = 10
BATCH = 64
PRE = Preprocessing.signed_unit(ARCH["img_size"])  # the default root's preprocessing
NO_AUG = {"image_size": ARCH["img_size"], "crop_area_min": 1.0, "aspect_ratio_min": 1.0, "flip": False, "color_jitter": 0.0,
          "lr": 0.01, "lr_schedule": "cosine", "warmup_ratio": 0.1, "momentum": 0.9, "nesterov": False}


def timm_loop(images, labels, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    vit = build_vit({"timm_model": "VisionTransformer", "kwargs": dict(ARCH, num_classes=NUM_CLASSES)})
    vit.train()
    opt = torch.optim.SGD(vit.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (BATCH,), generator=gen)
        loss = F.cross_entropy(vit(model_input(images[idx].numpy(), PRE)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vit.parameters(), 1.0)
        opt.step()
    return steps * BATCH / (time.perf_counter() - t0)


def mutask_path(frozen_blocks: int, seed: int):
    torch.manual_seed(seed)
    spec = {"timm_model": "VisionTransformer", "kwargs": dict(ARCH, num_classes=NUM_CLASSES)}
    root = Root(spec, build_vit(spec), "bench")
    store = ComponentStore()
    root_path = root.add_to(store)
    fresh, ids = {}, []
    for cid in root_path.components[:-1]:
        name = store[cid].name
        frozen = name in ("patch_embed", "cls_token", "pos_embed") or (component_kind(name) == "blocks" and block_index(name) < frozen_blocks)
        if frozen and frozen_blocks > 0:
            ids.append(cid)
            continue
        comp = store.clone(cid)
        fresh[comp.id] = comp
        ids.append(comp.id)
    head = Component(store.new_id(), "head", new_head(root.embed_dim, NUM_CLASSES))
    head.module.requires_grad_(True)
    fresh[head.id] = head
    ids.append(head.id)
    path = TaskPath("bench", "bench", ids, dict(NO_AUG, num_blocks=root.depth))
    return PathModel.from_store(store, path, fresh), [p for c in fresh.values() for p in c.module.parameters()]


def mutask_loop(split, val, steps: int, frozen_blocks: int, seed: int) -> float:
    model, params = mutask_path(frozen_blocks, seed)
    t0 = time.perf_counter()
    train(model, params, split, val, NO_AUG, pre=PRE, steps=steps, batch_size=BATCH, validations=1, seed=seed)
    return steps * BATCH / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--state", help="an evolved STATE: report its time per task visit")
    ap.add_argument("--results", help="results directory (default benchmarks/results)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n = 2048
    images = rng.integers(0, 256, (n, ARCH["img_size"], ARCH["img_size"], 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    split = Split(images, labels)
    val = Split(images[:64], labels[:64])  # one small validation, as a child's last evaluation
    timm_images, timm_labels = torch.from_numpy(images), torch.from_numpy(labels)
    runs = {"timm": [], "mutask_full": [], "mutask_frozen_half": []}
    half = ARCH["depth"] // 2
    timm_loop(timm_images, timm_labels, 5, 0)  # warm-up
    for r in range(a.repeats):  # interleaved, so drift hits every variant alike
        runs["timm"].append(timm_loop(timm_images, timm_labels, a.steps, r))
        runs["mutask_full"].append(mutask_loop(split, val, a.steps, 0, r))
        runs["mutask_frozen_half"].append(mutask_loop(split, val, a.steps, half, r))
    med = {k: median(v) for k, v in runs.items()}
    doc = {
        "benchmark": "evolve_throughput",
        "architecture": ARCH,
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
    md = f"Batch {BATCH}, {a.steps} steps per run, {a.repeats} interleaved repeats, medians.\n\n" + "\n".join(rows)
    write("evolve", doc, md, a.results)
    print(md)
    return doc


if __name__ == "__main__":
    main()
