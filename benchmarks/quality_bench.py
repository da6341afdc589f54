"""Quality: muNet against fine-tuning baselines on the embedded suite, same compute per task.

    python -m mutask.benchmarks.quality_bench run --root ROOT --config munet-s1.0 --out RUNS/munet-s1.0 [budget flags]
    python -m mutask.benchmarks.quality_bench table RUNS/*     # writes results/quality.json + quality.md (--name)

Every configuration goes through the same engine (``mutask evolve``) with the same rounds,
children per visit and steps per child, so each task gets the same number of training steps:
- ``munet-s1.0``, ``munet-s0.9``...: muNet with that scale factor;
- ``finetune``: every component cloned and trained, new head;
- ``freeze-K``: embeddings and the bottom K blocks frozen, the rest trained;
- ``adapters-W``: the root frozen, adapters of width W before every block, + norm + head.
Runs are independent processes, so they can run side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mutask.benchmarks import harness

PAPER = {"label": "paper (muNet vs fine-tuning, ViT-B/16, 10 VDD tasks)", "accuracy_gain": "+2.39 % avg", "params_per_task": "-47 %"}


def strategy_of(config: str) -> dict:
    """``munet-s0.9`` -> muNet at scale factor 0.9; ``freeze-2`` -> ``freeze:2`` (evolve checks the rest)."""
    if config.startswith("munet-s"):
        return {"strategy": "munet", "scale_factor": float(config[len("munet-s"):])}
    return {"strategy": config.replace("-", ":", 1)}


def run(a) -> None:
    from mutask.evolve.run import evolve
    from mutask.evolve.tasks import EMBEDDED_TASKS

    overrides = {k: getattr(a, k) for k in ("rounds", "children", "generation_size", "steps", "validations", "batch_size")}
    evolve(list(a.tasks or EMBEDDED_TASKS), a.out, root=a.root, budget=a.budget, show_progress=False, seed=a.seed, **overrides, **strategy_of(a.config))


def table(a) -> dict:
    from mutask.evolve.report import report
    from mutask.evolve.state import System

    rows = {}
    for d in a.runs:
        s = System.load(d)
        doc = report(s)
        cfg = s.config["evolve"]
        name = Path(d).name
        tasks = doc["tasks"]
        rows[name] = {
            "test_accuracy": {t: v["test_accuracy"] for t, v in tasks.items()},
            "avg_test_accuracy": sum(v["test_accuracy"] for v in tasks.values()) / len(tasks),
            "params_per_task": doc["params_per_task"],
            "system_params": doc["system_params"],
            "root_params": doc["root_params"],
            "root": s.root.source,
            "config": {k: cfg[k] for k in ("strategy", "scale_factor", "rounds", "children", "generation_size", "steps", "validations", "batch_size", "budget")},
            "children_trained": doc["children_trained"],
        }
    base = rows.get("finetune")
    if base:
        for r in rows.values():
            r["accuracy_vs_finetune"] = r["avg_test_accuracy"] - base["avg_test_accuracy"]
            r["params_per_task_vs_finetune"] = r["params_per_task"] / base["params_per_task"] - 1
    tasks = list(next(iter(rows.values()))["test_accuracy"]) if rows else []
    head = "| config | " + " | ".join(tasks) + " | avg test acc | params/task | vs fine-tune: acc | vs fine-tune: params/task |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for name, r in rows.items():
        acc = " | ".join(f"{r['test_accuracy'][t]:.3f}" for t in tasks)
        d_acc = f"{100 * r['accuracy_vs_finetune']:+.2f} %" if base else "-"
        d_par = f"{100 * r['params_per_task_vs_finetune']:+.0f} %" if base else "-"
        lines.append(f"| {name} | {acc} | {r['avg_test_accuracy']:.3f} | {r['params_per_task']:,.0f} | {d_acc} | {d_par} |")
    lines.append(f"| {PAPER['label']} | " + " | ".join("" for _ in tasks) + f" | | | {PAPER['accuracy_gain']} | {PAPER['params_per_task']} |")
    any_cfg = next(iter(rows.values()))["config"] if rows else {}
    md = (
        f"Root: {', '.join(sorted({r['root'] for r in rows.values()}))}. "
        "Test accuracy per task (one run per config, seed 0), parameters per task = accounted params "
        "averaged over tasks. Same compute per task for every config: "
        f"{any_cfg.get('rounds')} rounds x {any_cfg.get('children')} children x {any_cfg.get('steps')} steps "
        f"(batch {any_cfg.get('batch_size')}).\n\n" + "\n".join(lines)
    )
    doc = {"benchmark": "quality", "runs": rows, "paper_reference": PAPER, "repeats": 1, "machine": a.machine or harness.machine()}
    harness.write_record(a.name, doc, md, a.results)
    print(md)
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", required=True)
    r.add_argument("--root")
    r.add_argument("--out", required=True)
    r.add_argument("--budget", default="quick")
    r.add_argument("--task", dest="tasks", action="append")
    r.add_argument("--seed", type=int, default=0)
    for k in ("rounds", "children", "generation_size", "steps", "validations", "batch_size"):
        r.add_argument("--" + k.replace("_", "-"), type=int)
    t = sub.add_parser("table")
    t.add_argument("runs", nargs="+")
    t.add_argument("--results")
    t.add_argument("--name", default="quality", help="results file name (default quality; e.g. quality-real for the real root)")
    t.add_argument("--machine-json", dest="machine_json", help="machine info recorded where the runs ran")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        run(a)
    else:
        a.machine = json.loads(Path(a.machine_json).read_text()) if a.machine_json else None
        table(a)


if __name__ == "__main__":
    main()
