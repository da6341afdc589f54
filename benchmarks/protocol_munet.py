"""The quality protocol's muNet jobs: the ``mutask evolve`` command line of one (strategy, seed),
and the job record read back from the STATE it writes (``state.json``: see mutask/evolve/state.py).

Parameters of a task's winning (best) path, three ways:

- ``accounted``: the paper's: each component counts num_params / k, k = the tasks whose best
  paths use it (locks at the end of the run);
- ``unique_new``: parameters of the path's components that are not the root's and that no
  other task's best path uses (what adding this task cost, beyond what it shares);
- ``path``: every parameter the task's model runs with.

System parameters: every unique component some best path uses, once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def evolve_command(strategy: str, scale_factor: float, tasks: list[str], seed: int, state_dir, p: dict, threads: int | None) -> list[str]:
    """``python -m mutask.cli evolve ...`` for one muNet job of preset ``p``."""
    cmd = [sys.executable, "-m", "mutask.cli", "evolve", "--root", p["root"], "--out", str(state_dir),
           "--rounds", str(p["rounds"]), "--children", str(p["children"]), "--generation-size", str(p["generation_size"]),
           "--steps", str(p["steps"]), "--batch-size", str(p["batch_size"]), "--validations", str(p["validations"]),
           "--scale-factor", str(scale_factor), "--seed", str(seed), "--image-size", str(p["image_size"]),
           "--strategy", strategy, "-q"]
    for t in tasks:
        cmd += ["--task", t]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def path_structure(path: dict, comps: dict, root_ids: set, task: str) -> dict:
    """What a path is made of: root components shared frozen, clones (trained copies of root
    components), adapters, components it shares from other tasks, its head, and its key
    hyperparameters."""
    counts = {"frozen": 0, "cloned": 0, "adapters": 0, "from_other_tasks": 0, "head": 0}
    adapters = []
    for cid in path["components"]:
        c = comps[cid]
        name = c["name"]
        if cid in root_ids:
            counts["frozen"] += 1
        elif name.startswith("adapters."):
            counts["adapters"] += 1
            adapters.append(name.split(".", 1)[1])
        elif name in ("classifier", "head", "fc"):
            counts["head"] += 1
        else:
            counts["cloned"] += 1
        if cid not in root_ids and set(c["locks"]) - {task}:
            counts["from_other_tasks"] += 1
    hp = path["hparams"]
    return dict(counts, adapter_blocks=adapters, image_size=hp["image_size"], lr=hp["lr"], num_blocks=hp["num_blocks"],
                adapter_width=hp.get("adapter_width") if adapters else None, parent=path.get("parent"))


def read_state(state_dir) -> dict:
    """The job record of a finished ``mutask evolve`` STATE."""
    doc = json.loads((Path(state_dir) / "state.json").read_text())
    comps = doc["components"]
    root_ids = set(doc["paths"]["root"]["components"])
    cfg = doc["config"]["evolve"]
    tasks, used = {}, set()
    for task, pid in doc["best"].items():
        path = doc["paths"][pid]
        ids = list(dict.fromkeys(path["components"]))
        used.update(ids)
        history = [h for h in doc["history"] if h["task"] == task]
        tasks[task] = {
            "test_accuracy": path["metrics"]["test_accuracy"],
            "val_accuracy": path["metrics"]["val_accuracy"],
            "params": {
                "accounted": sum(comps[c]["num_params"] / max(1, len(comps[c]["locks"])) for c in ids),
                "unique_new": sum(comps[c]["num_params"] for c in ids if c not in root_ids and set(comps[c]["locks"]) <= {task}),
                "path": sum(comps[c]["num_params"] for c in ids),
            },
            "structure": path_structure(path, comps, root_ids, task),
            "train_images": sum(h.get("steps", cfg["steps"]) for h in history) * cfg["batch_size"],
            "children": len(history),
            "visit_seconds": path["metrics"].get("visit_seconds"),
        }
    history = [
        {k: h.get(k) for k in ("task", "round", "generation", "child", "parent", "seed", "accepted", "val_accuracy", "score",
                               "params", "accounted_params", "new_params", "train_seconds")}
        | {"hparams": {k: h["hparams"].get(k) for k in ("lr", "lr_schedule", "momentum", "image_size", "adapter_width", "mu", "num_blocks")},
           "adapters": [c.split(".", 1)[1] for c in h.get("components", []) if c.startswith("adapters.")]}
        for h in doc["history"]
    ]
    return {
        "tasks": tasks,
        "system_params": sum(comps[c]["num_params"] for c in used),
        "root_params": doc["root"]["params"],
        "config": {k: cfg[k] for k in ("strategy", "scale_factor", "rounds", "children", "generation_size", "steps", "batch_size", "validations", "precision", "seed")},
        "history": history,
    }
