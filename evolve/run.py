"""``mutask evolve``: resolve tasks and root, then start, resume or extend a system.

Each new task starts at an image size of its own, recorded in the STATE's tasks record
(``start_image_size``, so ``--resume`` and ``--from`` keep it); muNet's mutations move it from
there. By default it is min(the root's image size, the task's typical size), at least twice the
root's patch size: the typical size is the median min(H, W) of the task's training images snapped
to muNet's image-size list (16, 32, ..., 384; the suite's images are 32 x 32). Small images are
not upsampled to a large root's size (compute and cache grow with the square of the size and the
pixels add nothing), large ones are not trained above the size the root was trained at, and two
patches per side keep a grid of tokens (a CNN root starts at 32 px at least). ``--image-size N``
sets every new task's start instead: for a ViT a multiple of the root's patch size, for a CNN
16 or more; at most 384 (the list's maximum).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from mutask.errors import MutaskError

from . import hparams as H
from .config import EvolveConfig
from .dispatch import InProcess
from .evolution import Evolution
from .hooks import standard_hooks
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


def check_image_size(size: int | None, root=None) -> None:
    """Raise :class:`MutaskError` when ``--image-size`` cannot work: not positive, over the
    image-size list's maximum, or (once the root is known) not one its paths can take (a ViT:
    a multiple of its patch size; a CNN: at least 16)."""
    if size is None:
        return
    top = max(H.LISTS["image_size"])
    if root is not None:
        step, lo, valid = root.image_size_rule(top)
    else:
        step, lo, valid = 1, 1, f"a positive multiple of the root's patch size, at most {top}"
    if size < lo or size > top or size % step:
        raise MutaskError(f"--image-size {size} cannot work: use {valid} (or leave it out to start each task at its images' size).")


def start_image_size(typical: int, root, requested: int | None = None) -> int:
    """The image size a new task's paths start at (see the module docstring): ``requested``
    (``--image-size``) when given, else max(the root's smallest start (a ViT: 2 x patch size;
    a CNN: 32), min(root size, ``typical`` snapped to the image-size list))."""
    if requested is not None:
        check_image_size(requested, root)
        return int(requested)
    return int(max(root.min_start_size, min(root.image_size, H.snap("image_size", int(typical)))))


def resolve_tasks(specs: list[str], seed: int, show_progress: bool | None = None) -> tuple[list[str], dict, dict]:
    """Load every task before anything is written; returns (names, data, records)."""
    from .tasks import load_task

    if not specs:
        raise MutaskError("no task given. Pass --task NAME (see `mutask tasks`) or --task DIR / NAME=DIR, once per task.")
    names, data, records = [], {}, {}
    for spec in specs:
        td = load_task(spec, seed=seed, show_progress=show_progress)
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
    image_size: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    threads: int | None = None,
    **overrides,
) -> System:
    """Start (``tasks`` on ``root``), extend (``from_state``) or ``resume`` a system in ``out``.
    ``image_size``: every new task's starting image size (default: per task, see the module
    docstring). ``workers`` / ``ray_address``: train each generation's children on that many
    local Ray workers / on the Ray cluster at that address, ``threads`` torch threads each
    (:class:`.workers.RayPool`); neither: here, one after another, and Ray is not imported."""
    if workers is None and ray_address is None:
        return _evolve(tasks, out, None, root=root, pretrained=pretrained, budget=budget, from_state=from_state, resume=resume,
                       show_progress=show_progress, data_seed=data_seed, image_size=image_size, **overrides)
    from .workers import RayPool

    pool = RayPool(workers, ray_address, threads)  # checks its arguments before Ray starts
    _check_out(out, resume)
    with pool:
        return _evolve(tasks, out, pool, root=root, pretrained=pretrained, budget=budget, from_state=from_state, resume=resume,
                       show_progress=show_progress, data_seed=data_seed, image_size=image_size, **overrides)


def _check_out(out, resume: bool) -> None:
    """Refuse an --out that cannot take a new STATE (or, with ``resume``, has none), before anything starts."""
    out = Path(out)
    if resume:
        if not (out / STATE_FILE).exists():
            System.load(out)  # raises the STATE's own clear error
        return
    if out.exists() and not out.is_dir():
        raise MutaskError(f"--out {str(out)!r} is a file, not a directory. Choose a new --out for the STATE.")
    if only_save_leftovers(out):
        return
    if out.exists() and any(out.iterdir()):
        hint = " It holds a STATE: add --resume to continue it, or --from it with a new --out to extend it." if (out / STATE_FILE).exists() else ""
        raise MutaskError(f"--out {str(out)!r} exists and is not empty; mutask never writes over it.{hint} Choose a new --out.")


def _evolve(tasks, out, pool, *, root, pretrained, budget, from_state, resume, show_progress, data_seed, image_size, **overrides) -> System:
    from .tasks import load_task

    out = Path(out)
    progress = None if show_progress else False
    if resume:
        if tasks or from_state or root or image_size is not None:
            raise MutaskError("--resume continues the run saved in --out as it was configured; drop --task, --root, --from and --image-size.")
        system = System.load(out, device())
        order = system.config["order"]
        if system.progress is None:
            log.warning("%s is complete: nothing to resume", out)
            return system
        data = {t: load_task(system.tasks[t]["spec"], seed=system.tasks[t]["seed"], show_progress=progress) for t in order}
        return _evolution(system, data, out, pool, show_progress).run(order)

    _check_out(out, resume=False)
    if from_state is None:  # a new system: the default root, at its start size, unless told otherwise
        from .config import DEFAULT_ROOT, REAL_ROOT_IMAGE_SIZE

        root = root or DEFAULT_ROOT
        image_size = image_size if image_size is not None else REAL_ROOT_IMAGE_SIZE.get(root)
    if only_save_leftovers(out):
        log.warning("%s holds only temporary files of a first save that never finished: removing them and starting again", out)
        for leftover in save_leftovers(out):
            leftover.unlink()
    cfg = EvolveConfig.from_budget(budget, **overrides)
    check_image_size(image_size)
    names, data, records = resolve_tasks(tasks, data_seed, show_progress=progress)
    if from_state is not None:
        system = System.load(from_state, device())
        for t in names:
            if t in system.tasks and system.tasks[t]["num_classes"] != records[t]["num_classes"]:
                raise MutaskError(f"task {t!r} exists in {from_state} with {system.tasks[t]['num_classes']} classes, not {records[t]['num_classes']}. Give the new task another name (NAME=DIR).")
        system.progress = None
        # a new STATE: its history starts where the old one ends, its paths and components are kept
    else:
        from .roots import load_root

        r = load_root(root, pretrained=pretrained)
        system = System.new(r, seed=cfg.seed)
        for comp in system.store.components.values():
            comp.module.to(device())
    for t in names:
        records[t]["start_image_size"] = start_image_size(data[t].image_size, system.root, image_size)
    system.tasks.update(records)
    system.config["evolve"] = asdict(cfg)
    system.config["order"] = names
    system.config.setdefault("runs", []).append({"tasks": names, "budget": budget, "from": str(from_state) if from_state else None})
    log.info("evolving %d task(s) %s on root %s (%d params), budget %s", len(names), names, system.root.source, system.root_params, budget)
    return _evolution(system, data, out, pool, show_progress).run(names)


def _evolution(system: System, data: dict, out: Path, pool, show_progress: bool) -> Evolution:
    """The loop with its plug-ins: a generation trained on ``pool`` (Ray) or here; the STATE
    saved to ``out`` at every boundary; a progress bar unless ``show_progress`` is False."""
    dispatch = pool if pool is not None else InProcess()
    return Evolution(system, data, dispatch=dispatch, hooks=standard_hooks(out, show_progress))
