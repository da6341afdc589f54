"""Training throughput: a mutask child against a plain timm loop, and precisions on a GPU.

    python -m mutask.benchmarks.evolve_bench [--repeats 10] [--steps 40]          # evolve.md (CPU)
    python -m mutask.benchmarks.evolve_bench --root timm:vit_small_patch16_224 --batch 128 --steps 30 \\
        --loops full,frozen --precisions fp32,bf16 --name precision                 # precision.md (GPU)

Loops, on the same uint8 batches (random images, no augmentation), run in turn by
:func:`harness.interleave` (order alternating, repeat i of each loop a pair), in each precision:
- ``timm``: a plain loop over the timm network (SGD momentum, clip at norm 1, train mode);
- ``full``: :func:`evolve.train.train` on a path whose components are all clones (fine-tune
  all: the same parameters as timm's loop);
- ``frozen``: the same with the stem and the bottom half of the blocks shared frozen.
Images/s count training steps only. Ratios: full / timm, frozen / full, and every precision
against the first, each the median of the paired ratios with its interval.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from mutask.benchmarks import harness
from mutask.evolve.data import Split
from mutask.evolve.model import Component, ComponentStore, PathModel, TaskPath
from mutask.evolve.pretrain import ARCH
from mutask.evolve.roots import Root, build_model, load_root, root_for
from mutask.evolve.train import autocast_dtype, device, model_input, train

NUM_CLASSES = 10
DEFAULT_SPEC = {"timm_model": "VisionTransformer", "kwargs": dict(ARCH, num_classes=NUM_CLASSES)}
NO_AUG = {"crop_area_min": 1.0, "aspect_ratio_min": 1.0, "flip": False, "color_jitter": 0.0,
          "lr": 0.01, "lr_schedule": "cosine", "warmup_ratio": 0.1, "momentum": 0.9, "nesterov": False}
LABELS = {"timm": "plain timm loop", "full": "mutask child, all components cloned", "frozen": "mutask child, stem + bottom half of the blocks frozen"}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_root(root_arg: str | None, seed: int) -> Root:
    torch.manual_seed(seed)
    return root_for(DEFAULT_SPEC, build_model(DEFAULT_SPEC), "bench") if root_arg is None else load_root(root_arg)


def timm_loop(root_arg, split: Split, pre, steps: int, batch: int, precision: str, seed: int) -> float:
    """images/s of a plain training loop over the timm network (a fresh NUM_CLASSES head, no dropout)."""
    import timm

    torch.manual_seed(seed)
    net = build_model(DEFAULT_SPEC) if root_arg is None else timm.create_model(root_arg.removeprefix("timm:"), num_classes=NUM_CLASSES, drop_rate=0.0)
    dev = device()
    net.to(dev).train()
    dtype, gen, labels = autocast_dtype(precision, dev), torch.Generator().manual_seed(seed), torch.from_numpy(split.labels).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(split.labels), (batch,), generator=gen)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(model_input(split.images[idx.numpy()], pre, dev)), labels[idx.to(dev)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    _sync()
    return steps * batch / (time.perf_counter() - t0)


def mutask_loop(root_arg, split: Split, size: int, steps: int, batch: int, frozen: bool, precision: str, seed: int) -> float:
    """images/s of :func:`train` on a child of the root: every component cloned, or the stem
    and the bottom half of the blocks shared frozen (the root's own head replaced)."""
    root = bench_root(root_arg, seed)
    store = ComponentStore()
    fresh, ids = {}, []
    for cid in root.add_to(store).components:
        name = store[cid].name
        if name == root.head_name:
            continue
        pos = root.block_position(name)
        if frozen and (name in root.stem or (pos is not None and pos < root.depth // 2)):
            ids.append(cid)
            continue
        comp = store.clone(cid)
        fresh[comp.id] = comp
        ids.append(comp.id)
    head = Component(store.new_id(), root.head_name, root.new_head(NUM_CLASSES))
    fresh[head.id] = head
    ids.append(head.id)
    for c in list(store.components.values()) + list(fresh.values()):
        c.module.to(device()).requires_grad_(c.id in fresh)
    hp = dict(NO_AUG, image_size=size, num_blocks=root.depth)
    model = PathModel.from_store(store, TaskPath("bench", "bench", ids, hp), fresh)
    params = [p for c in fresh.values() for p in c.module.parameters()]
    _sync()
    return train(model, params, split, Split(split.images[:batch], split.labels[:batch]), hp, pre=root.preprocessing.at(size),
                 steps=steps, batch_size=batch, validations=1, seed=seed, precision=precision).images_per_s


def table(doc: dict) -> str:
    """The record's markdown, from its JSON alone (so old records re-render)."""
    ips, ratios = doc["images_per_s"], doc["ratios"]
    lines = [
        f"Training throughput on {doc['device']}: {doc['architecture']} at {doc['image_size']} px, batch {doc['batch']}, "
        f"{doc['steps']} steps per run (training steps only), {doc['repeats']} interleaved repeats, medians; "
        f"ratios: {harness.METHOD}.", "",
        "| training loop | precision | images/s (median) |", "|---|---|---:|",
        *(f"| {LABELS.get(k.split('/')[0], k.split('/')[0])} | {k.split('/')[1]} | {v['median']:,.1f} |" for k, v in ips.items()),
        "", "| ratio | paired median [95 % interval] |", "|---|---:|",
        *(f"| {label} | {harness.fmt_ratio(r)} |" for label, r in ratios.items()),
        *(["", doc["note"]] if doc.get("note") else []),
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="timm:NAME (random init): any root kind mutask takes (default: the default root's ViT)")
    ap.add_argument("--image-size", type=int, help="training image size (default: the root's)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=harness.MIN_PAIRS)
    ap.add_argument("--loops", default="timm,full,frozen")
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--name", help="record name (default evolve, or evolve-NAME for --root timm:NAME)")
    ap.add_argument("--results", help="results directory (default benchmarks/results)")
    a = ap.parse_args(argv)
    root = bench_root(a.root, 0)
    size = a.image_size or (ARCH["img_size"] if a.root is None else root.image_size)
    pre = root.preprocessing.at(size)
    rng = np.random.default_rng(0)
    n = max(2048, 4 * a.batch)
    split = Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, n).astype(np.int64))
    loops, precisions = a.loops.split(","), a.precisions.split(",")

    def variant(loop: str, pr: str):
        if loop == "timm":
            return lambda i: timm_loop(a.root, split, pre, a.steps, a.batch, pr, max(i, 0))
        return lambda i: mutask_loop(a.root, split, size, a.steps, a.batch, loop == "frozen", pr, max(i, 0))

    runs = harness.interleave({f"{lp}/{pr}": variant(lp, pr) for lp in loops for pr in precisions}, a.repeats, warmup=1)
    ratios = {}
    for pr in precisions:
        for num, den in (("full", "timm"), ("frozen", "full")):
            if num in loops and den in loops:
                ratios[f"{num} / {den} ({pr})"] = harness.paired_ratio(runs[f"{num}/{pr}"], runs[f"{den}/{pr}"])
    for lp in loops:
        for pr in precisions[1:]:
            ratios[f"{lp}: {pr} / {precisions[0]}"] = harness.paired_ratio(runs[f"{lp}/{pr}"], runs[f"{lp}/{precisions[0]}"])
    doc = {
        "benchmark": "training_throughput", "architecture": f"root {a.root} (random init)" if a.root else "the default root's architecture",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "image_size": size, "batch": a.batch,
        "steps": a.steps, "repeats": a.repeats,
        "images_per_s": {k: {"median": round(harness.median(v), 1), "runs": [round(x, 1) for x in v]} for k, v in runs.items()},
        "ratios": ratios,
    }
    name = a.name or ("evolve" if a.root is None else f"evolve-{a.root.removeprefix('timm:')}")
    harness.write_record(name, doc, table(doc), a.results)
    print(table(doc))
    return doc


if __name__ == "__main__":
    main()
