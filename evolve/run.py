"""``mutask evolve``: resolve tasks and root, then start, resume or extend a system."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from mutask.errors import MutaskError

from .evolution import EvolveConfig, Evolution
from .state import STATE_FILE, System, only_save_leftovers, save_leftovers
from .train import device

log = logging.getLogger("mutask")


def _task_record(spec: str, data, seed: int) -> dict:
    return {
        "spec": spec,
        "seed": seed,
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "image_size": data.image_size,
        "source": data.source,
    }


def resolve_tasks(specs: list[str], seed: int) -> tuple[list[str], dict, dict]:
    """Load every task before anything is written; returns (names, data, records)."""
    from .tasks import load_task

    if not specs:
        raise MutaskError("no task given. Pass --task NAME (see `mutask tasks`) or --task DIR / NAME=DIR, once per task.")
    names, data, records = [], {}, {}
    for spec in specs:
        td = load_task(spec, seed=seed)
        if td.name in data:
            raise MutaskError(f"task {td.name!r} is given twice. Name directory tasks apart with NAME=DIR.")
        # record directory tasks by absolute path, so --resume finds them from anywhere
        stored = spec
        _, sep, rest = spec.partition("=")
        target = rest if sep else spec
        if os.path.isdir(target):
            stored = f"{td.name}={os.path.abspath(target)}"
        names.append(td.name)
        data[td.name] = td
        records[td.name] = _task_record(stored, td, seed)
    return names, data, records


def evolve(
    tasks: list[str],
    out,
    *,
    root: str | None = None,
    pretrained: bool = False,
    budget: str = "quick",
    from_state=None,
    resume: bool = False,
    show_progress: bool = True,
    data_seed: int = 0,
    **overrides,
) -> System:
    from .tasks import load_task

    out = Path(out)
    if resume:
        if tasks or from_state or root:
            raise MutaskError("--resume continues the run saved in --out as it was configured; drop --task, --root and --from.")
        system = System.load(out, device())
        order = system.config["order"]
        if system.progress is None:
            log.warning("%s is complete: nothing to resume", out)
            return system
        data = {t: load_task(system.tasks[t]["spec"], seed=system.tasks[t]["seed"]) for t in order}
        return Evolution(system, data, out, show_progress=show_progress).run(order)

    if out.exists() and not out.is_dir():
        raise MutaskError(f"--out {str(out)!r} is a file, not a directory. Choose a new --out for the STATE.")
    if only_save_leftovers(out):
        log.warning("%s holds only temporary files of a first save that never finished: removing them and starting again", out)
        for leftover in save_leftovers(out):
            leftover.unlink()
    if out.exists() and any(out.iterdir()):
        hint = " It holds a STATE: add --resume to continue it, or --from it with a new --out to extend it." if (out / STATE_FILE).exists() else ""
        raise MutaskError(f"--out {str(out)!r} exists and is not empty; mutask never writes over it.{hint} Choose a new --out.")
    cfg = EvolveConfig.from_budget(budget, **overrides)
    names, data, records = resolve_tasks(tasks, data_seed)
    if from_state is not None:
        system = System.load(from_state, device())
        for t in names:
            if t in system.tasks and system.tasks[t]["num_classes"] != records[t]["num_classes"]:
                raise MutaskError(f"task {t!r} exists in {from_state} with {system.tasks[t]['num_classes']} classes, not {records[t]['num_classes']}. Give the new task another name (NAME=DIR).")
        system.progress = None
        # a new STATE: its history starts where the old one ends, its paths and components are kept
    else:
        from .root import load_root

        if root is None:
            from .pretrain import default_root

            r = default_root()
        else:
            r = load_root(root, pretrained=pretrained)
        system = System.new(r, seed=cfg.seed)
        for comp in system.store.components.values():
            comp.module.to(device())
    system.tasks.update(records)
    system.config["evolve"] = asdict(cfg)
    system.config["order"] = names
    system.config.setdefault("runs", []).append({"tasks": names, "budget": budget, "from": str(from_state) if from_state else None})
    log.info("evolving %d task(s) %s on root %s (%d params), budget %s", len(names), names, system.root.source, system.root_params, budget)
    return Evolution(system, data, out, show_progress=show_progress).run(names)
