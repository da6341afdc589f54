"""A muNet generation trained together (evolve/generation.py) against the same children trained
one after another with a plain timm loop, frozen the same way.

    python -m mutask.benchmarks.generation_bench [--pairs 10] [--steps 30] [--children 4] [--image-size 64]

The root is the ImageNet EfficientNet-Lite0 (``--root``), the task ``digits`` at ``--image-size``
(64 px), batch 64, ``--threads`` torch threads (2), ``--precision`` (fp32) for both sides; where
mutask's default (``auto``) resolves to another precision (bf16 on a CPU with native bf16, for this
channels-last root), a third side, ``mutask_auto``, runs it. The generation is the first one of a task visit, made by
:class:`~mutask.evolve.evolution.Evolution`: the root as a seed, unmutated, then children of the
root mutated with the evolution's RNG (its clones and adapters are what make their frozen
prefixes). Both sides start every repeat from copies of the same initial components and train
``--steps`` steps with ``--validations`` evaluations of the validation split each, best
checkpoint kept:

- ``timm``: for each child, the plain loop of a timm fine-tuning script over
  ``nn.Sequential(child's modules)`` (timm's own blocks; the frozen ones ``requires_grad`` off
  and in eval mode, so autograd starts at the first trainable one), NCHW, the same batches,
  schedule, clipping and evaluations as mutask;
- ``mutask``: :func:`mutask.evolve.generation.train_generation` (frozen prefixes shared, cached
  per image where nothing augments, channels-last for this conv root).

Paired and interleaved: each pair runs both sides back to back (the order alternating between
pairs); the ratio is timm's wall time over mutask's (training and validation), its median over
the pairs with a 95 % percentile-bootstrap interval (:func:`harness.paired_ratio`: none under 10
pairs). Before the pairs, the plain timm loop is pinned (full training and frozen forward,
images/s); each side's warm-up run (untimed) runs under cProfile and says where its time goes. ``--val-images`` and ``--max-minutes`` shorten a run
on a busy machine (the record says how many pairs ran). Writes ``results/generation.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mutask.benchmarks.harness import SHARED, fmt_ratio, median, paired_ratio, times, write_record
from mutask.evolve.data import Split
from mutask.evolve.evolution import Evolution, EvolveConfig, init_seed
from mutask.evolve.generation import train_generation
from mutask.evolve.model import Component, PathModel
from mutask.evolve.roots import load_root
from mutask.evolve.state import System
from mutask.evolve.tasks import load_task
from mutask.evolve.train import _autocast, autocast_dtype, batch_order, lr_scheduler, model_input, split_images
from mutask.evolve import hparams as H

BATCH = 64


def make_generation(root, data, n: int, image_size: int, steps: int, validations: int, seed: int):
    """(evolution, children, batch seed): a visit's first generation as the loop makes it."""
    s = System.new(root, seed=seed)
    s.config["evolve"] = asdict(EvolveConfig(steps=steps, validations=validations, batch_size=BATCH, generation_size=n, children=n))
    s.config["order"] = [data.name]
    s.tasks[data.name] = {"spec": data.name, "seed": 0, "num_classes": data.num_classes, "start_image_size": image_size}
    ev = Evolution(s, {data.name: data}, "/nonexistent", show_progress=False).ops  # the operators: making children as a visit does
    hp = ev.default_hparams(data.name)
    keys = {k: hp[k] for k in H.DATA_KEYS}
    batch_seed = s.rng.randrange(2**31)
    kids = [ev.make_child(data.name, s.paths["root"], i > 0, keys, init_seed(batch_seed, i)) for i in range(n)]
    return ev, kids, batch_seed


def copies(kids):
    """Fresh copies of every child's trainable components, by component id."""
    return [{cid: Component(cid, c.name, copy.deepcopy(c.module)) for cid, c in fresh.items()} for _, fresh in kids]


# ----------------------------------------------------------------------------- the plain loop


def timm_child(modules, trainable, data, hp, pre, steps, validations, seed, dtype) -> float:
    """One child, the plain way; returns its best validation accuracy."""
    model = nn.Sequential(*modules)
    for m, t in zip(modules, trainable):
        m.requires_grad_(t)
    params = [p for p in model.parameters() if p.requires_grad]
    images, labels = split_images(data.train, pre), np.asarray(data.train.labels, dtype=np.int64)
    val_images, val_labels = split_images(data.validation, pre), np.asarray(data.validation.labels)
    gen = torch.Generator().manual_seed(seed)
    order = batch_order(len(labels), BATCH, steps, gen)
    opt = torch.optim.SGD(params, lr=float(hp["lr"]), momentum=float(hp["momentum"]), nesterov=bool(hp["nesterov"]) and float(hp["momentum"]) > 0)
    sched = lr_scheduler(opt, steps, hp)
    eval_at = {max(1, round(steps * (k + 1) / validations)) for k in range(validations)}

    def train_mode():
        for m, t in zip(modules, trainable):
            m.train(t)

    best = (-1.0, None)
    train_mode()
    for step, rows in enumerate(order, start=1):
        x, y = model_input(images[rows], pre), torch.from_numpy(labels[rows])
        sched.step_update(step - 1)
        with _autocast(torch.device("cpu"), dtype):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step in eval_at:
            model.eval()
            correct = 0
            with torch.no_grad(), _autocast(torch.device("cpu"), dtype):
                for i in range(0, len(val_labels), 256):
                    correct += int((model(model_input(val_images[i : i + 256], pre)).float().argmax(1).numpy() == val_labels[i : i + 256]).sum())
            acc = correct / len(val_labels)
            if acc > best[0]:
                best = (acc, [p.detach().clone() for p in params])
            train_mode()
    for m in modules:
        m.requires_grad_(False)
    return best[0]


def run_timm(ev, kids, data, pre, steps, validations, seed, dtype) -> list[float]:
    out = []
    for (path, _), mine in zip(kids, copies(kids)):
        modules = [mine[c].module if c in mine else ev.sys.store[c].module for c in path.components]
        out.append(timm_child(modules, [c in mine for c in path.components], data, path.hparams, pre, steps, validations, seed, dtype))
    return out


def run_mutask(ev, kids, data, pre, steps, validations, seed, precision) -> list[float]:
    mine = copies(kids)
    models = [PathModel.from_store(ev.sys.store, path, m) for (path, _), m in zip(kids, mine)]
    params = [[p for c in m.values() for p in c.module.parameters()] for m in mine]
    results = train_generation(models, params, data.train, data.validation, [p.hparams for p, _ in kids], pre=pre, steps=steps,
                               batch_size=BATCH, validations=validations, seed=seed, precision=precision)
    return [r.val_accuracy for r in results]


# ----------------------------------------------------------------------------- measuring


def pin_timm(model: nn.Module, image_size: int, dtype, repeats: int = 3) -> dict:
    """The plain timm loop's images/s at batch 64: full training (every parameter) and frozen forward."""
    x, y = torch.randn(BATCH, 3, image_size, image_size), torch.randint(0, 10, (BATCH,))
    model = copy.deepcopy(model).requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def full():
        model.train()
        with _autocast(torch.device("cpu"), dtype):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def frozen():
        model.eval()
        with torch.no_grad(), _autocast(torch.device("cpu"), dtype):
            model(x)

    return {name: round(BATCH / median(times(fn, repeats, warmup=1)), 1) for name, fn in (("full_training", full), ("frozen_forward", frozen))}


def profile(fn, top: int = 10) -> dict:
    """Seconds of ``fn()`` under cProfile and its ``top`` functions by own time."""
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    fn()
    pr.disable()
    total = time.perf_counter() - t
    st = pstats.Stats(pr, stream=io.StringIO())
    rows = sorted(((v[2], f"{k[2]} ({k[0].rsplit('/', 1)[-1]}:{k[1]})" if k[0] != "~" else k[2]) for k, v in st.stats.items()), reverse=True)[:top]
    return {"seconds": round(total, 2), "top": [{"function": name, "seconds": round(sec, 2), "share": round(sec / total, 3)} for sec, name in rows]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="efficientnet-lite0")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--validations", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", help="both sides' precision (mutask's default, auto, is measured beside it where it differs)")
    ap.add_argument("--seed", type=int, default=0, help="the evolution's seed (which children the generation has)")
    ap.add_argument("--val-images", type=int, default=None, help="use only the first N validation images (a shorter run)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop starting pairs when the next would likely end past this")
    ap.add_argument("--name", default="generation", help="results/<name>.{json,md}")
    ap.add_argument("--note", default="", help="a line on the machine's conditions for the record")
    ap.add_argument("--idle", action="store_true", help="the record says the machine was idle (default: shared with other work)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = load_root(args.root)
    data = load_task(args.task, seed=0, show_progress=False)
    if args.val_images:
        v = data.validation
        data.validation = Split(v.images[: args.val_images], v.labels[: args.val_images])
    ev, kids, seed = make_generation(root, data, args.children, args.image_size, args.steps, args.validations, args.seed)
    pre = root.preprocessing.at(args.image_size)
    dtype = autocast_dtype(args.precision, torch.device("cpu"))
    split_images(data.train, pre), split_images(data.validation, pre)  # resized once, outside the timings
    structure = []
    for path, fresh in kids:
        names = [fresh[c].name if c in fresh else ev.sys.store[c].name for c in path.components]
        first = next(i for i, c in enumerate(path.components) if c in fresh)
        structure.append({"components": len(names), "frozen_prefix": first, "trainable": [fresh[c].name for c in path.components if c in fresh]})
    print("children:", *structure, sep="\n  ", flush=True)
    pins = pin_timm(root.template, args.image_size, dtype)
    print("plain timm loop:", pins, flush=True)

    sides = {
        "timm": lambda: run_timm(ev, kids, data, pre, args.steps, args.validations, seed, dtype),
        "mutask": lambda: run_mutask(ev, kids, data, pre, args.steps, args.validations, seed, args.precision),
    }
    auto = autocast_dtype("auto", torch.device("cpu"), channels_last=True)
    if args.precision != "auto" and auto != dtype:  # mutask's own default where it differs: a third side
        sides["mutask_auto"] = lambda: run_mutask(ev, kids, data, pre, args.steps, args.validations, seed, "auto")
    # warm-up of every side (oneDNN's kernels for these shapes, the allocator), under cProfile: where its time goes
    profiles = {side: profile(fn) for side, fn in sides.items()}
    for side, prof in profiles.items():
        print(side, "warm-up (profiled):", prof["seconds"], "s", flush=True)
    pairs = []
    t_start = time.perf_counter()
    for i in range(args.pairs):
        if args.max_minutes and i >= 2 and (time.perf_counter() - t_start) * (i + 1) / i > 60 * args.max_minutes:
            print(f"stopping after {i} pairs: --max-minutes {args.max_minutes}", flush=True)
            break
        row = {}
        for side in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            t = time.perf_counter()
            acc = sides[side]()
            row[side] = round(time.perf_counter() - t, 3)
            row[f"{side}_val_accuracy"] = acc
        for side in sides:
            if side != "timm":
                row[f"ratio_{side}"] = round(row["timm"] / row[side], 3)
        pairs.append(row)
        print(f"pair {i + 1}:", {k: v for k, v in row.items() if "accuracy" not in k}, flush=True)
    doc = {
        "benchmark": "generation",
        "root": args.root, "task": args.task, "image_size": args.image_size, "batch_size": BATCH, "children": args.children,
        "steps": args.steps, "validations": args.validations, "validation_images": len(data.validation), "pairs_asked": args.pairs, "threads": args.threads, "precision": args.precision,
        "autocast": str(dtype) if dtype else "fp32",
        "generation": structure,
        "plain_timm_images_per_s": pins,
        "pairs": pairs,
        "median_seconds": {s: round(median([p[s] for p in pairs]), 2) for s in sides},
        "ratio": {side: paired_ratio([p["timm"] for p in pairs], [p[side] for p in pairs]) for side in sides if side != "timm"},
        "auto_autocast": str(auto) if auto else "fp32",
        "profiles": profiles,
        "note": args.note or ("nothing else ran on the machine" if args.idle else "the machine was shared by other work while measuring"),
    }
    write_record(args.name, doc, markdown(doc), shared_machine=None if args.idle else SHARED)
    print(markdown(doc))


def markdown(doc: dict) -> str:
    lines = [
        "# A generation trained together vs one by one with a plain timm loop",
        "",
        f"Root {doc['root']}, task {doc['task']} at {doc['image_size']} px, batch {doc['batch_size']}, {doc['children']} children x "
        f"{doc['steps']} steps, {doc['validations']} validation(s) of {doc['validation_images']} images each, {doc['threads']} torch threads, precision {doc['precision']} "
        f"(autocast {doc['autocast']}) on both sides. {len(doc['pairs'])} pairs, interleaved (order alternating).",
        "",
        "| side | median wall time (s) |",
        "|---|---:|",
    ]
    lines += [f"| {s} | {v} |" for s, v in doc["median_seconds"].items()]
    lines += [""]
    for side, r in doc["ratio"].items():
        what = f"mutask at its default precision (auto: autocast {doc['auto_autocast']})" if side == "mutask_auto" else f"mutask at {doc['precision']}"
        lines += [f"**Speed-up of {what} over the plain timm loop at {doc['precision']}: {fmt_ratio(r)}** (per pair, timm's wall time / mutask's; {r['method']}).", ""]
    lines += [
              f"Plain timm loop pinned (images/s, batch {doc['batch_size']}): {doc['plain_timm_images_per_s']}.", "",
              "The generation's children (components, frozen prefix length, trainable components):", ""]
    lines += [f"- {c['components']} components, frozen prefix {c['frozen_prefix']}, trainable {', '.join(c['trainable'])}" for c in doc["generation"]]
    for side, prof in doc["profiles"].items():
        lines += ["", f"Where the time goes, {side} (its warm-up run, under cProfile, {prof['seconds']} s):", "",
                  "| function | s | share |", "|---|---:|---:|"]
        lines += [f"| `{r['function']}` | {r['seconds']} | {r['share']:.0%} |" for r in prof["top"]]
    lines += ["", f"Conditions: {doc['note']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
