"""STATE: an evolved multitask system on disk, and in memory (:class:`System`).

A STATE directory holds two files:

- ``components-<n>.safetensors``: every unique component once, tensor keys ``<id>/<tensor>``
  (e.g. ``c12/attn.qkv.weight``), metadata ``{"format": "mutask-components", "version": "1"}``;
- ``state.json``: everything else: format and version, the root spec, the evolution config,
  tasks, paths (component ids, hyperparameters, parent, metrics), each task's best path,
  component names and locks, id counters, the RNG state, the history of every child tried,
  and the in-flight task visit (for ``--resume``).

Writes are atomic: the weights go to a new numbered file, then ``state.json`` is replaced by
rename, then older weight files are removed. A crash at any point leaves the last complete
state readable.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mutask.cache import current_umask, write_document
from mutask.documents import read_document
from mutask.errors import MutaskError

from .model import ComponentStore, TaskPath
from .progress import Progress
from .roots import Root, build_model, root_for

FORMAT = "mutask-state"
VERSION = 1
STATE_FILE = "state.json"


@dataclass
class System:
    """The multitask system: root, unique components, paths, and evolution bookkeeping."""

    root: Root
    store: ComponentStore
    paths: dict[str, TaskPath]
    best: dict[str, str] = field(default_factory=dict)  # task -> best path id
    tasks: dict[str, dict] = field(default_factory=dict)  # task -> {"spec", "seed", "class_names", ...}
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    progress: Progress | None = None  # None: no run in progress
    rng: random.Random = field(default_factory=random.Random)
    next_path: int = 0
    root_params: int = 0

    @classmethod
    def new(cls, root: Root, seed: int = 0) -> "System":
        store = ComponentStore()
        root_path = root.add_to(store)
        return cls(root, store, {root_path.id: root_path}, rng=random.Random(seed), root_params=root.params())

    def new_path_id(self) -> str:
        pid = f"p{self.next_path}"
        self.next_path += 1
        return pid

    @property
    def root_path(self) -> TaskPath:
        return self.paths["root"]

    def best_path(self, task: str) -> TaskPath:
        return self.paths[self.best[task]]

    # -- parameter accounting (the method note's definitions) ------------------------------
    def accounted_params(self, component_ids, task: str, fresh: dict | None = None) -> float:
        """Each component counts num_params / k, k = tasks using it (this one included).
        ``fresh`` maps ids of a child's clones (not in the store) to components."""
        fresh = fresh or {}
        total = 0.0
        for cid in dict.fromkeys(component_ids):  # each once, in path order: the same float sum every run
            if cid in fresh:
                total += fresh[cid].num_params
            else:
                c = self.store[cid]
                total += c.num_params / (1 + len(c.locks - {task}))
        return total

    def path_params(self, component_ids, fresh: dict | None = None) -> int:
        fresh = fresh or {}
        return sum((fresh.get(cid) or self.store[cid]).num_params for cid in set(component_ids))

    def system_params(self) -> int:
        """Unique parameters of the system: every component some task's best path uses."""
        used = {cid for t in self.best for cid in self.best_path(t).components}
        return self.store.params(used)

    # -- persistence ---------------------------------------------------------------------
    def save(self, directory) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        gen = self.config.get("_saves", 0) + 1
        self.config["_saves"] = gen
        weights_name = f"components-{gen}.safetensors"
        tensors = {}
        for cid, comp in self.store.components.items():
            for k, v in comp.tensors().items():
                tensors[f"{cid}/{k}"] = v.detach().to("cpu").contiguous()
        fd, tmp = tempfile.mkstemp(prefix=".components-", dir=d)
        os.close(fd)
        save_file(tensors, tmp, metadata={"format": "mutask-components", "version": "1"})
        os.chmod(tmp, 0o666 & ~current_umask())  # like state.json: mkstemp and save_file make 0600
        os.replace(tmp, d / weights_name)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "weights": weights_name,
            "root": {"spec": self.root.spec, "source": self.root.source, "params": self.root_params},
            "config": self.config,
            "tasks": self.tasks,
            "best": self.best,
            "paths": {pid: p.to_json() for pid, p in self.paths.items()},
            "components": {
                cid: {"name": c.name, "root": c.root, "locks": sorted(c.locks), "num_params": c.num_params}
                for cid, c in self.store.components.items()
            },
            "next_component": self.store.next_id,
            "next_path": self.next_path,
            "rng_state": _rng_to_json(self.rng.getstate()),
            "progress": self.progress.to_json() if self.progress is not None else None,
            "history": self.history,
        }
        write_document(d / STATE_FILE, doc, indent=1)
        for old in d.glob("components-*.safetensors"):
            if old.name != weights_name:
                old.unlink(missing_ok=True)
        for leftover in save_leftovers(d):  # temporaries of saves that were killed
            leftover.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory, device: torch.device | None = None) -> "System":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        state_file = d / STATE_FILE
        if not d.is_dir():
            raise MutaskError(f"STATE {str(d)!r} does not exist. Give a directory written by `mutask evolve --out STATE`.")
        if not state_file.is_file():
            if only_save_leftovers(d):
                raise MutaskError(
                    f"{str(d)!r} holds only the temporary files of a first save that never finished: there is nothing to resume. "
                    f"Start the run again with `mutask evolve --out {d} --task ...` (it reuses the directory)."
                )
            raise MutaskError(f"{str(d)!r} holds no {STATE_FILE}: it is not a mutask STATE. Give a directory written by `mutask evolve --out STATE`.")
        doc = read_document(
            state_file, format=FORMAT, version=VERSION, version_key="version", what="mutask STATE",
            fix="Restore the STATE from a copy, or evolve its tasks again with this version of mutask.",
        )
        weights = d / doc["weights"]
        try:
            tensors = load_file(str(weights))
        except (FileNotFoundError, SafetensorError, OSError) as e:
            raise MutaskError(f"STATE {str(d)!r}: its weights {weights.name} are missing or damaged ({e}). Restore the directory or evolve again.") from e
        spec = dict(doc["root"]["spec"])
        spec["pretrained"] = False  # the root's weights are in the state
        root = root_for(spec, build_model({k: v for k, v in spec.items() if k != "dir"}), doc["root"]["source"])
        store = ComponentStore()
        by_comp: dict[str, dict] = {}
        for key, t in tensors.items():
            cid, _, name = key.partition("/")
            by_comp.setdefault(cid, {})[name] = t
        for cid, meta in doc["components"].items():
            if cid not in by_comp:
                raise MutaskError(f"STATE {str(d)!r}: component {cid} has no tensors in {weights.name}; the STATE is damaged.")
            comp = store.add(meta["name"], root.module_for(meta["name"], by_comp[cid]), root=meta["root"], cid=cid)
            comp.locks = set(meta["locks"])
            if device is not None:
                comp.module.to(device)
        store.next_id = doc["next_component"]
        rng = random.Random()
        rng.setstate(_rng_from_json(doc["rng_state"]))
        return cls(
            root=root,
            store=store,
            paths={pid: TaskPath.from_json(p) for pid, p in doc["paths"].items()},
            best=dict(doc["best"]),
            tasks=dict(doc["tasks"]),
            config=dict(doc["config"]),
            history=list(doc["history"]),
            progress=Progress.from_json(doc.get("progress")),
            rng=rng,
            next_path=doc["next_path"],
            root_params=int(doc["root"]["params"]),
        )


SAVE_TEMPORARIES = (".components-", ".state-")  # System.save writes these, then renames them


def save_leftovers(directory) -> list[Path]:
    """Temporary files of saves that did not finish (a save renames its own before it ends)."""
    d = Path(directory)
    return [p for p in d.iterdir() if p.is_file() and p.name.startswith(SAVE_TEMPORARIES)] if d.is_dir() else []


def only_save_leftovers(directory) -> bool:
    """Whether ``directory`` holds nothing but the temporaries of an unfinished first save."""
    d = Path(directory)
    return d.is_dir() and any(d.iterdir()) and len(save_leftovers(d)) == len(list(d.iterdir()))


def _rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(obj):
    version, internal, gauss = obj
    return (version, tuple(internal), gauss)
