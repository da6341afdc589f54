"""Mixed precision: a child's training throughput in bf16 (or fp16) against fp32, on a GPU.

    python -m mutask.benchmarks.precision_bench [--root timm:vit_small_patch16_224] [--batch 128] [--steps 30] [--repeats 3]

One child of a real-size root (every component cloned, as fine-tuning trains it, and one with
the bottom half of the blocks frozen, as muNet often shares them), trained with mutask's own
loop (:func:`mutask.evolve.train.train`) on in-memory images at the root's size, for each
precision in turn; repeats interleaved, medians. Reports images/s and the ratio to fp32.
The root is initialised at random: throughput does not depend on its weights.
Writes ``precision.json`` and ``precision.md``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from mutask.benchmarks.common import RESULTS, write


def child(system, frozen_blocks: int):
    """A child path of the root with every component from block ``frozen_blocks`` up (and the
    norm and a new head) cloned; returns (PathModel, trainable params)."""
    import torch

    from mutask.evolve.model import Component, PathModel, TaskPath, block_index, component_kind
    from mutask.evolve.roots.vit import new_head

    s = system
    fresh, ids = {}, []
    for cid in s.root_path.components:
        comp = s.store[cid]
        if comp.name == "head":
            continue
        kind = component_kind(comp.name)
        shared = kind in ("patch_embed", "cls_token", "pos_embed") or (kind == "blocks" and block_index(comp.name) < frozen_blocks)
        if shared and frozen_blocks > 0:
            ids.append(cid)
            continue
        clone = s.store.clone(cid)
        fresh[clone.id] = clone
        ids.append(clone.id)
    head = Component(s.store.new_id(), "head", new_head(s.root.embed_dim, 10))
    fresh[head.id] = head
    ids.append(head.id)
    path = TaskPath("bench", "bench", ids, {"image_size": s.root.image_size})
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for c in list(s.store.components.values()) + list(fresh.values()):
        c.module.to(dev)
    for c in fresh.values():
        c.module.requires_grad_(True)
    model = PathModel.from_store(s.store, path, fresh)
    return model, [p for c in fresh.values() for p in c.module.parameters()]


def main(argv=None) -> None:
    import torch

    from mutask.evolve import hparams as H
    from mutask.evolve.data import Split
    from mutask.evolve.roots import load_root
    from mutask.evolve.state import System
    from mutask.evolve.train import train

    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.precision_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="timm:vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    root = load_root(a.root)
    system = System.new(root)
    size = root.image_size
    pre = root.preprocessing.at(size)
    rng = np.random.default_rng(0)
    n = a.batch * 4
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    split, val = Split(images, labels), Split(images[: a.batch], labels[: a.batch])
    hp = dict(H.defaults(size, root.depth), crop_area_min=0.6, flip=True)
    precisions = a.precisions.split(",")
    configs = {"all blocks cloned": 0, f"bottom {root.depth // 2} blocks frozen": root.depth // 2}
    rates = {(c, pr): [] for c in configs for pr in precisions}
    for rep in range(a.repeats):
        for cname, frozen in configs.items():
            for pr in (precisions if rep % 2 == 0 else precisions[::-1]):
                model, params = child(system, frozen)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                res = train(model, params, split, val, hp, pre=pre, steps=a.steps, batch_size=a.batch, validations=1, seed=rep, precision=pr)
                rates[(cname, pr)].append(res.images_per_s)
                print(rep, cname, pr, f"{res.images_per_s:.1f} images/s", flush=True)
                del model, params
    med = {k: statistics.median(v) for k, v in rates.items()}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    doc = {
        "benchmark": "precision", "root": a.root, "image_size": size, "batch": a.batch, "steps": a.steps, "repeats": a.repeats, "device": device,
        "images_per_s": {f"{c} / {pr}": {"median": round(med[(c, pr)], 1), "runs": [round(x, 1) for x in rates[(c, pr)]]} for c, pr in rates},
    }
    lines = [
        f"Child training throughput on {device}: root {a.root}{' (random init)' if a.root.startswith('timm:') else ''} at {size} px, batch {a.batch}, {a.steps} steps per run "
        f"(training steps only: the validation is not counted), {a.repeats} interleaved repeats, medians.",
        "",
        "| child | precision | images/s | vs fp32 |",
        "|---|---|---:|---:|",
    ]
    for c in configs:
        for pr in precisions:
            lines.append(f"| {c} | {pr} | {med[(c, pr)]:.1f} | {med[(c, pr)] / med[(c, precisions[0])]:.2f}x |")
    write("precision", doc, "\n".join(lines), a.results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
