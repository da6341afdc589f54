"""Shared fixtures: tiny roots and tiny synthetic tasks, an isolated cache and BentoML home."""

import os

import numpy as np
import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MUTASK_CACHE", str(base / "mutask-cache"))
    monkeypatch.setenv("BENTOML_HOME", str(base / "bentoml-home"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    prom = base / "prometheus"
    prom.mkdir(exist_ok=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(prom))


TINY_SPEC = {
    "timm_model": "VisionTransformer",
    "kwargs": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5),
}


def make_root(seed=0):
    import torch

    from mutask.evolve.roots import build_model, root_for

    torch.manual_seed(seed)
    return root_for(TINY_SPEC, build_model(TINY_SPEC), "tiny-test-root")


def synthetic_task(name, num_classes, seed, n_train=96, n_eval=48):
    """Class c is a bright horizontal band at rows 5c..5c+4 over noise: learnable, tiny."""
    from mutask.evolve.data import Split, TaskData

    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, num_classes, n)
        x = (rng.random((n, 32, 32, 3)) * 80).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 5 * c : 5 * c + 4] = 240
        return Split(x, y.astype(np.int64))

    return TaskData(name, [f"class{i}" for i in range(num_classes)], split(n_train), split(n_eval), split(n_eval), 32)


@pytest.fixture()
def tiny_root():
    return make_root()


def add_task(s, task: str, components: list, hparams: dict, num_classes: int, seed: int, own: tuple = ()) -> None:
    """Give ``task`` of System ``s`` a best path over ``components`` plus its own random
    (non-zero) head. ``own``: names of components (e.g. "patch_embed") the task gets as its own
    perturbed clones, so it reaches the rest of the path through a different prefix."""
    import torch

    from mutask.evolve.model import Component, TaskPath
    from mutask.evolve.roots.vit import new_head

    torch.manual_seed(seed)
    components = list(components)
    for i, cid in enumerate(components):
        if s.store[cid].name in own:
            clone = s.store.adopt(s.store.clone(cid))
            with torch.no_grad():
                for t in clone.module.parameters():
                    t.add_(0.05 * torch.randn_like(t))
            components[i] = clone.id
    head = new_head(s.root.embed_dim, num_classes)
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.normal_(head.bias, std=0.1)
    comp = s.store.adopt(Component(s.store.new_id(), "head", head))
    p = TaskPath(s.new_path_id(), task, components + [comp.id], dict(hparams), metrics={"val_accuracy": 0.5, "test_accuracy": 0.5})
    s.paths[p.id] = p
    s.best[task] = p.id
    s.tasks[task] = {"spec": task, "seed": 0, "num_classes": num_classes, "class_names": [f"{task}-{i}" for i in range(num_classes)]}
    for cid in p.components:
        s.store[cid].locks.add(task)
