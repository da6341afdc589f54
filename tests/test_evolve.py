"""The muNet loop: evolution, scoring, immutability of other tasks, state, resume."""

import json
import math
from dataclasses import asdict

import pytest
import torch

from mutask.evolve.evolution import EvolveConfig, Evolution
from mutask.evolve.model import PathModel
from mutask.evolve.report import draw_system, report
from mutask.evolve.state import System
from mutask.evolve.strategies import parse_strategy
from mutask.evolve.train import lr_scheduler, predict
from mutask.errors import MutaskError
from tests.conftest import synthetic_task

TINY = dict(rounds=1, children=3, generation_size=2, steps=4, validations=1, batch_size=16)


def new_system(root, names, data, **cfg):
    s = System.new(root, seed=0)
    s.config["evolve"] = asdict(EvolveConfig(**dict(TINY, **cfg)))
    s.config["order"] = names
    s.tasks.update({t: {"spec": t, "seed": 0, "num_classes": data[t].num_classes} for t in names})
    return s


def tensors_of(system, task):
    return {cid: {k: v.clone() for k, v in system.store[cid].tensors().items()} for cid in system.best_path(task).components}


def test_evolve_two_tasks_and_report(tiny_root, tmp_path):
    data = {"a": synthetic_task("a", 4, 1), "b": synthetic_task("b", 3, 2)}
    s = new_system(tiny_root, ["a", "b"], data, children=4)
    Evolution(s, data, tmp_path / "st", show_progress=False).run(["a", "b"])
    assert set(s.best) == {"a", "b"}
    assert len(s.history) == 8
    # b's first children are the seeds, unmutated: a's best path, then the root
    assert [(h["seed"], h["parent"]) for h in s.history[4:6]] == [(True, s.best["a"]), (True, "root")]
    assert not any(h["seed"] for h in s.history[6:])
    doc = report(s)
    for t in ("a", "b"):
        rec = doc["tasks"][t]
        assert 0.0 <= rec["val_accuracy"] <= 1.0 and rec["test_accuracy"] is not None
        assert rec["accounted_params"] <= rec["params"]
    assert any(doc["tasks"][t]["accounted_params"] < doc["tasks"][t]["params"] for t in ("a", "b"))
    assert doc["system_params"] == s.store.params({c for t in s.best for c in s.best_path(t).components})
    # every component a best path uses is locked by exactly the tasks using it
    for cid, comp in s.store.components.items():
        users = {t for t in s.best if cid in s.best_path(t).components}
        assert comp.locks == users
    png = draw_system(s, tmp_path / "system.png")
    assert png.stat().st_size > 1000


def test_seeds_take_at_most_half_of_a_visit(tiny_root, tmp_path):
    data = {t: synthetic_task(t, 3, i) for i, t in enumerate("abcd")}
    s = new_system(tiny_root, list("abcd"), data, children=4, generation_size=4)
    Evolution(s, data, tmp_path / "st", show_progress=False).run(list("abcd"))
    seeds_per_task = {t: sum(h["seed"] for h in s.history if h["task"] == t) for t in "abcd"}
    assert seeds_per_task == {"a": 1, "b": 2, "c": 2, "d": 2}  # d had 4 candidates: 3 best paths + root
    assert all(h["seed"] for h in s.history[:1]) and s.history[0]["parent"] == "root"


def test_start_lr_and_no_root_reseed(tiny_root, tmp_path):
    """--lr sets where a task's first paths start; --no-root-reseed: a second visit seeds only
    from other tasks' best paths (the first visit still starts from the root)."""
    data = {"a": synthetic_task("a", 3, 1), "b": synthetic_task("b", 3, 2)}
    s = new_system(tiny_root, ["a", "b"], data, rounds=2, children=4, lr=0.02, reseed_root=False)
    Evolution(s, data, tmp_path / "st", show_progress=False).run(["a", "b"])
    seeds = [(h["round"], h["task"], h["parent"]) for h in s.history if h["seed"]]
    assert seeds[0] == (1, "a", "root") and (1, "b", "root") in seeds
    assert not any(r == 2 and p == "root" for r, _, p in seeds)  # round 2: no root seed
    assert any(r == 2 and t == "b" for r, t, _ in seeds)  # but a's best path still seeds b
    assert s.history[0]["hparams"]["lr"] == 0.02
    with pytest.raises(MutaskError, match="--lr"):
        EvolveConfig(lr=0.0).validate()


def test_continue_best_makes_each_generations_first_child_an_unmutated_child_of_the_best(tiny_root, tmp_path):
    data = {"a": synthetic_task("a", 3, 1)}
    s = new_system(tiny_root, ["a"], data, children=5, generation_size=2, continue_best=True)
    Evolution(s, data, tmp_path / "st", show_progress=False).run(["a"])
    h = s.history
    assert h[0]["seed"] and h[0]["parent"] == "root"  # the root seed first
    for g in (1, 2):  # later generations: first child continues the best path, unmutated
        first = [x for x in h if x["generation"] == g][0]
        assert first["seed"] is True and first["parent"] != "root"
        earlier = [x for x in h if x["generation"] < g and x["accepted"]]
        assert first["parent"] == max(earlier, key=lambda x: x["score"])["child"]  # seed=True: unmutated


def test_children_only_train_their_own_clones(tiny_root, tmp_path):
    data = {"a": synthetic_task("a", 4, 1)}
    s = new_system(tiny_root, ["a"], data, children=2, mutation_prob=1.0)
    root_before = {cid: {k: v.clone() for k, v in s.store[cid].tensors().items()} for cid in s.root_path.components}
    Evolution(s, data, tmp_path / "st", show_progress=False).run(["a"])
    for cid, tensors in root_before.items():
        for k, v in tensors.items():
            assert torch.equal(s.store[cid].tensors()[k].cpu(), v.cpu())  # compared on one device
    # with mu = 1 the mutated child cloned every component: it owns all of them
    child = s.history[1]
    assert child["new_params"] == child["params"]


def test_new_adapters_start_from_the_childs_seed_not_torchs_global_rng(tiny_root, tmp_path):
    from mutask.evolve.operators import init_seed
    from mutask.evolve.hparams import DATA_KEYS

    data = {"a": synthetic_task("a", 4, 1)}
    s = new_system(tiny_root, ["a"], data, mutation_prob=1.0)
    evo = Evolution(s, data, tmp_path / "st", show_progress=False)
    hp = evo.ops.default_hparams("a")
    keys = {k: hp[k] for k in DATA_KEYS}

    def adapters(seed, global_seed):
        torch.manual_seed(global_seed)
        s.rng.seed(7)  # the same mutations each time
        _, fresh = evo.ops.make_child("a", s.root_path, True, keys, seed)
        out = [c.module.down.weight.clone() for c in fresh.values() if c.name.startswith("adapters.")]
        assert out  # mu = 1: an adapter before every block
        return out

    same = adapters(init_seed(5, 0), 1), adapters(init_seed(5, 0), 2)
    assert all(torch.equal(x, y) for x, y in zip(*same))
    other = adapters(init_seed(5, 1), 1)
    assert not torch.equal(same[0][0], other[0])


def test_extension_keeps_existing_tasks_bit_identical(tiny_root, tmp_path):
    data = {"a": synthetic_task("a", 4, 1), "b": synthetic_task("b", 3, 2), "c": synthetic_task("c", 5, 3)}
    s = new_system(tiny_root, ["a", "b"], data)
    Evolution(s, data, tmp_path / "st1", show_progress=False).run(["a", "b"])
    s1 = System.load(tmp_path / "st1")
    before = {t: tensors_of(s1, t) for t in ("a", "b")}
    logits = {t: predict(PathModel.from_store(s1.store, s1.best_path(t)), data[t].test, s1.root.preprocessing.at(s1.best_path(t).image_size)) for t in ("a", "b")}

    s1.tasks["c"] = {"spec": "c", "seed": 0, "num_classes": 5}
    s1.config["order"] = ["c"]
    s1.config["evolve"] = asdict(EvolveConfig(**dict(TINY, children=4, mutation_prob=0.9)))
    Evolution(s1, data, tmp_path / "st2", show_progress=False).run(["c"])
    s2 = System.load(tmp_path / "st2")
    assert set(s2.best) == {"a", "b", "c"}
    for t in ("a", "b"):
        assert s2.best[t] == s1.best[t]
        after = tensors_of(s2, t)
        assert after.keys() == before[t].keys()
        for cid in after:
            for k in after[cid]:
                assert after[cid][k].numpy().tobytes() == before[t][cid][k].numpy().tobytes()
        again = predict(PathModel.from_store(s2.store, s2.best_path(t)), data[t].test, s2.root.preprocessing.at(s2.best_path(t).image_size))
        assert again.tobytes() == logits[t].tobytes()


def test_interrupted_run_resumes(tiny_root, tmp_path, monkeypatch):
    data = {"a": synthetic_task("a", 4, 1), "b": synthetic_task("b", 3, 2)}
    s = new_system(tiny_root, ["a", "b"], data, children=4, generation_size=2)
    out = tmp_path / "st"
    calls = {"n": 0}
    from mutask.evolve import generation

    original = generation.train_children  # the in-process dispatch trains a generation's children together

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # b's first generation
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(generation, "train_children", crashing)
    with pytest.raises(KeyboardInterrupt):
        Evolution(s, data, out, show_progress=False).run(["a", "b"])
    monkeypatch.setattr(generation, "train_children", original)

    saved = System.load(out)
    assert saved.progress is not None and saved.progress.visit.task == "b"
    assert saved.progress.visit.generation == 0 and len(saved.history) == 4
    assert "a" in saved.best and "b" not in saved.best
    Evolution(saved, data, out, show_progress=False).run(saved.config["order"])
    done = System.load(out)
    assert done.progress is None and set(done.best) == {"a", "b"}
    assert len(done.history) == 8
    assert [h["task"] for h in done.history] == ["a"] * 4 + ["b"] * 4


def test_scale_factor_penalises_params(tiny_root, tmp_path):
    data = {"a": synthetic_task("a", 4, 1)}
    s = new_system(tiny_root, ["a"], data, scale_factor=0.5)
    evo = Evolution(s, data, tmp_path / "st", show_progress=False)
    assert evo.ops.score(0.8, 0) == pytest.approx(0.8)
    assert evo.ops.score(0.8, s.root_params) == pytest.approx(0.4)
    evo.run(["a"])
    for h in s.history:
        assert h["score"] == pytest.approx(h["val_accuracy"] * 0.5 ** (h["accounted_params"] / s.root_params))


@pytest.mark.parametrize("strategy", ["finetune", "freeze:2", "adapters:8"])
def test_baselines_have_their_structure(tiny_root, tmp_path, strategy):
    data = {"a": synthetic_task("a", 4, 1)}
    s = new_system(tiny_root, ["a"], data, strategy=strategy, children=2)
    Evolution(s, data, tmp_path / "st", show_progress=False).run(["a"])
    best = s.best_path("a")
    names = [s.store[c].name for c in best.components]
    trained = {s.store[c].name for c in best.components if not s.store[c].root}
    if strategy == "finetune":
        assert trained == set(names)
    elif strategy == "freeze:2":
        assert trained == {"blocks.2", "norm", "head"}
    else:
        assert trained == {"adapters.0", "adapters.1", "adapters.2", "norm", "head"}


def test_state_errors(tiny_root, tmp_path):
    with pytest.raises(MutaskError, match="does not exist"):
        System.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MutaskError, match="no state.json"):
        System.load(tmp_path / "empty")
    data = {"a": synthetic_task("a", 4, 1)}
    s = new_system(tiny_root, ["a"], data, children=1)
    Evolution(s, data, tmp_path / "st", show_progress=False).run(["a"])
    doc = json.loads((tmp_path / "st" / "state.json").read_text())
    doc["version"] = 999
    (tmp_path / "st" / "state.json").write_text(json.dumps(doc))
    with pytest.raises(MutaskError, match="version 999"):
        System.load(tmp_path / "st")
    (tmp_path / "st" / "state.json").write_text('{"format": "mutask-state", "vers')
    with pytest.raises(MutaskError, match="not valid JSON"):
        System.load(tmp_path / "st")


@pytest.mark.parametrize("schedule", ["constant", "cosine", "restarts"])
@pytest.mark.parametrize("total, ratio", [(1, 0.1), (6, 0.4), (40, 0.05), (200, 0.01), (2500, 0.2)])
def test_lr_schedule(schedule, total, ratio):
    """Warm-up from lr/100 to lr over round(total * ratio) steps (at least one), then constant,
    cosine to zero at ``total``, or cosine restarting at each third of the remaining steps."""
    lr = 0.02
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = lr_scheduler(opt, total, {"lr": lr, "warmup_ratio": ratio, "lr_schedule": schedule})
    warm = max(1, round(total * ratio))
    for step in range(total):
        sched.step_update(step)
        if step < warm:
            expected = lr / 100 + (lr - lr / 100) * step / warm
        else:
            t = (step - warm) / max(1, total - warm)
            t = {"constant": 0.0, "cosine": t, "restarts": (3 * t) % 1.0}[schedule]
            expected = lr * 0.5 * (1 + math.cos(math.pi * t))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), step


def test_strategies():
    assert [str(parse_strategy(s)) for s in ("munet", "finetune", "freeze:2", "adapters:8")] == ["munet", "finetune", "freeze:2", "adapters:8"]
    munet, freeze, adapters = parse_strategy("munet"), parse_strategy("freeze:2"), parse_strategy("adapters:8")
    assert munet.seed_candidates(["p1", "p2"]) == ["p1", "p2", "root"] and freeze.seed_candidates(["p1"]) == ["root"]
    assert munet.mutates_structure and not freeze.mutates_structure and not adapters.mutates_structure
    assert adapters.adapter_width == 8 and munet.adapter_width is None and freeze.adapter_width is None
    for bad in ("bogus", "freeze", "freeze:x", "adapters:", "Munet"):
        with pytest.raises(MutaskError, match=r"unknown strategy .*; use munet, finetune, freeze:K or adapters:W\."):
            parse_strategy(bad)
    with pytest.raises(MutaskError, match="unknown strategy 'freeze:-1'"):
        EvolveConfig(strategy="freeze:-1").validate()


def test_start_image_size_rule(tiny_root):
    """min(root size, typical size snapped to the list), at least 2 patches; --image-size wins."""
    from mutask.evolve.roots import build_model, root_for
    from mutask.evolve.run import start_image_size

    assert (tiny_root.image_size, tiny_root.patch_size) == (32, 8)
    assert start_image_size(16, tiny_root) == 16  # small images are not upsampled to the root's size
    assert start_image_size(368, tiny_root) == 32  # large ones start at the root's size
    assert start_image_size(23, tiny_root) == 16  # snapped to the list (16, 32, ...)
    spec = {"timm_model": "VisionTransformer", "kwargs": dict(img_size=224, patch_size=16, embed_dim=48, depth=1, num_heads=3)}
    vit_b = root_for(spec, build_model(spec), "a ViT-B's sizes")  # (a small ViT at ViT-B/16's image and patch size)
    assert start_image_size(16, vit_b) == 32  # two patches at least
    assert start_image_size(100, vit_b) == 96 and start_image_size(384, vit_b) == 224
    assert start_image_size(384, vit_b, requested=48) == 48 and start_image_size(16, vit_b, requested=384) == 384
    for bad in (0, -16, 20, 400):
        with pytest.raises(MutaskError, match=f"--image-size {bad} cannot work: use a multiple of the root's patch size 16 from 16 to 384"):
            start_image_size(96, vit_b, requested=bad)


def test_a_task_starts_at_its_recorded_image_size(tiny_root, tmp_path):
    data = {"a": synthetic_task("a", 3, 1), "b": synthetic_task("b", 3, 2)}
    s = new_system(tiny_root, ["a"], data, children=2, generation_size=2)
    s.tasks["a"]["start_image_size"] = 16
    evo = Evolution(s, data, tmp_path / "st", show_progress=False)
    assert evo.ops.default_hparams("a")["image_size"] == 16
    assert evo.ops.default_hparams("b")["image_size"] == 32  # a record without one (an older STATE): the root's size
    evo.run(["a"])
    assert [h["hparams"]["image_size"] for h in s.history] == [16, 16]  # the first generation starts there
    assert System.load(tmp_path / "st").tasks["a"]["start_image_size"] == 16


def test_the_loop_imports_no_root_family():
    """The loop, its operators and the strategies know no architecture: importing them loads
    no root family (the registry's families come with the STATE, :mod:`mutask.evolve.roots`)."""
    import subprocess
    import sys

    code = ("import sys, mutask.evolve.evolution, mutask.evolve.strategies, mutask.evolve.model; "
            "print(sorted(m for m in sys.modules if m.startswith('mutask.evolve.roots')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
