"""The quality protocol's baselines: plain torch training loops on the root, one job per
(strategy, seed), every task of the protocol in turn.

    python -m mutask.benchmarks.protocol_baselines --strategy lora:8 --task digits --task shapes \\
        --root efficientnet-lite0 --image-size 64 --lrs 0.005,0.01,0.02,0.05 --steps 240 \\
        --batch-size 64 --validations 2 --seed 0 --out JOB.json

Same data, preprocessing and recipe as muNet's children: the task from
``mutask.evolve.tasks.load_task`` (the protocol points ``MUTASK_CACHE`` at the seed's data),
the root's own preprocessing at ``--image-size``, and ``mutask.evolve.train.train`` (SGD,
momentum 0.9, warm-up + cosine, clipping at norm 1, best of ``--validations`` validations).
Each learning rate of ``--lrs`` is one candidate, trained from the root; the candidate with
the best validation accuracy is the task's model and is the only one tested.

Strategies (component names are the root's: stem, blocks, tail, head):

- ``probe``: a new head on the frozen root (linear probe);
- ``finetune``: every root component trained, a new head;
- ``freeze:K``: the stem and the bottom K blocks frozen, the rest trained;
- ``adapters:W``: the root frozen, a residual adapter of width W before every block
  (mutask's own conv adapter: x + up(relu(down(bn(x)))), ``up`` zero-initialised), the final norm
  and the head trained;
- ``lora:R``: LoRA of rank R (alpha 2R) through the ``peft`` library on every Conv2d with
  groups == 1 (stem, pointwise and head convolutions; peft refuses depthwise ones at this
  rank) and a new head; the rest frozen.

Frozen BatchNorm and every Dropout stay in eval mode (no dropout, as in muNet's recipe).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mutask.evolve.roots.conv import ConvAdapter  # muNet's own conv adapter: the baseline trains the same module

KINDS = ("probe", "finetune", "freeze", "adapters", "lora")


def parse(spec: str) -> tuple[str, int | None]:
    kind, _, arg = spec.partition(":")
    if kind not in KINDS or (kind in ("freeze", "adapters", "lora")) != arg.isdigit():
        raise SystemExit(f"unknown baseline {spec!r}: probe, finetune, freeze:K, adapters:W or lora:R")
    return kind, int(arg) if arg else None


class Frozen(nn.Module):
    """Wraps a network whose frozen parts stay in eval mode while it trains."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.net.modules():
            own = list(m.parameters(recurse=False))
            if isinstance(m, nn.Dropout) or (isinstance(m, _BatchNorm) and not any(p.requires_grad for p in own)):
                m.eval()
        return self


def count(params) -> int:
    return sum(p.numel() for p in params)


def flat_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"blocks.{i}.{j}", b) for i, stage in enumerate(net.blocks) for j, b in enumerate(stage)]


def build(spec: str, template: nn.Module, num_classes: int, seed: int) -> tuple[nn.Module, list, dict]:
    """(model, trainable parameters, facts: new params, frozen root params used, structure)."""
    kind, arg = parse(spec)
    torch.manual_seed(seed)
    net = copy.deepcopy(template)
    net.reset_classifier(num_classes)
    nn.init.zeros_(net.classifier.weight)
    nn.init.zeros_(net.classifier.bias)
    net.requires_grad_(False)
    net.classifier.requires_grad_(True)
    blocks = flat_blocks(net)
    units = {"conv_stem": net.conv_stem, "bn1": net.bn1, **dict(blocks), "conv_head": net.conv_head, "bn2": net.bn2}
    trained = set()  # root components (the head aside) this strategy trains: its clones
    if kind == "finetune":
        trained = set(units)
    elif kind == "freeze":
        trained = {n for n, _ in blocks[arg:]} | {"conv_head", "bn2"}
    elif kind == "adapters":
        trained = {"bn2"}  # the final norm, as muNet's paths and the reference's adapter baseline
        for i, stage in enumerate(net.blocks):
            for j, b in enumerate(stage):
                channels = next(m for m in b.modules() if isinstance(m, nn.Conv2d)).in_channels
                stage[j] = nn.Sequential(ConvAdapter(channels, arg), b)
    for n in trained:
        units[n].requires_grad_(True)
    structure = {"frozen": len(units) - len(trained), "cloned": len(trained), "adapters": len(blocks) if kind == "adapters" else 0,
                 "lora_layers": 0, "head": 1}
    frozen_root = sum(count(m.parameters()) for n, m in units.items() if n not in trained)
    model = net
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        config = LoraConfig(r=arg, lora_alpha=2 * arg, lora_dropout=0.0, target_modules=targets, modules_to_save=["classifier"])
        model = get_peft_model(net, config)
        structure["lora_layers"] = len(targets)
    params = [p for p in model.parameters() if p.requires_grad]
    facts = {"new_params": count(params), "frozen_root_params": frozen_root, "structure": structure}
    return Frozen(model), params, facts


def run_task(spec: str, root, data, a, task_index: int) -> dict:
    from mutask.evolve import hparams as H
    from mutask.evolve.train import accuracy, device, train

    pre = root.preprocessing.at(a.image_size)
    dev = device()
    candidates, best = [], None
    for k, lr in enumerate(a.lrs):
        model, params, facts = build(spec, root.template, data.num_classes, seed=a.seed * 1000 + task_index)
        model.to(dev)
        hp = dict(H.defaults(a.image_size, root.depth), lr=lr)
        t0 = time.perf_counter()
        result = train(model, params, data.train, data.validation, hp, pre=pre, steps=a.steps, batch_size=a.batch_size,
                       validations=a.validations, seed=a.seed * 1000 + task_index, precision=a.precision)
        record = {"lr": lr, "val_accuracy": result.val_accuracy, "best_step": result.best_step, "curve": result.curve,
                  "train_images": a.steps * a.batch_size, "train_seconds": round(time.perf_counter() - t0, 2)}
        candidates.append(record)
        if best is None or result.val_accuracy > best[0]["val_accuracy"]:
            best = (record, accuracy(model, data.test, pre, precision=a.precision), facts)
    record, test, facts = best
    return {
        "test_accuracy": test,
        "val_accuracy": record["val_accuracy"],
        "selected_lr": record["lr"],
        "new_params": facts["new_params"],
        "frozen_root_params": facts["frozen_root_params"],
        "structure": dict(facts["structure"], image_size=a.image_size, lr=record["lr"]),
        "train_images": a.steps * a.batch_size * len(a.lrs),
        "candidates": candidates,
    }


def run(a) -> dict:
    from mutask.evolve.roots import load_root
    from mutask.evolve.tasks import load_task

    parse(a.strategy)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    root = load_root(a.root)
    root.template.eval()
    tasks = {}
    for i, name in enumerate(a.tasks):
        data = load_task(name, seed=0)  # the seed's data: MUTASK_CACHE holds it under seed 0 (see protocol.py)
        tasks[data.name] = run_task(a.strategy, root, data, a, i)
    for r in tasks.values():  # the three parameter counts (see protocol_munet.py): the frozen root is shared by every task
        r["params"] = {"accounted": r["new_params"] + r["frozen_root_params"] / len(tasks), "unique_new": r["new_params"],
                       "path": r["new_params"] + r["frozen_root_params"]}
    frozen = max((r["frozen_root_params"] for r in tasks.values()), default=0)
    return {
        "strategy": a.strategy,
        "engine": "plain torch loop (mutask.benchmarks.protocol_baselines) with mutask.evolve.train.train",
        "seed": a.seed,
        "tasks": tasks,
        "system_params": frozen + sum(r["new_params"] for r in tasks.values()),
        "root_params": root.params(),
        "config": {"lrs": a.lrs, "steps": a.steps, "batch_size": a.batch_size, "validations": a.validations,
                   "image_size": a.image_size, "root": a.root, "precision": a.precision},
        "wall_seconds": round(time.time() - t0, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", required=True)
    ap.add_argument("--task", dest="tasks", action="append", required=True)
    ap.add_argument("--root", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], required=True)
    ap.add_argument("--steps", type=int, required=True, help="steps per candidate")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--validations", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        doc = run(a)
    except ImportError as e:  # peft (LoRA) missing where the protocol runs: the row is skipped with the reason
        doc = {"strategy": a.strategy, "seed": a.seed, "skipped": f"{type(e).__name__}: {e}"}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
