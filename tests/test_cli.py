"""The `mutask` command end to end on tiny budgets: pretrain, tasks, evolve, report, --from, errors."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from mutask.cli import main


@pytest.fixture(scope="module")
def tiny_root_dir(tmp_path_factory):
    import os

    d = tmp_path_factory.mktemp("root") / "root"
    os.environ["MUTASK_CACHE"] = str(tmp_path_factory.getbasetemp() / "mutask-cache")
    assert main(["pretrain", "--out", str(d), "--budget", "tiny", "-q"]) == 0
    return d


@pytest.fixture(scope="module")
def folder_task(tmp_path_factory):
    """A 3-class ImageFolder of mixed sizes: bright band at the top, middle or bottom."""
    d = tmp_path_factory.mktemp("data") / "bands"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["top", "middle", "bottom"]):
        (d / name).mkdir(parents=True)
        for i in range(16):
            size = int(rng.integers(24, 48))
            img = (rng.random((size, size)) * 60).astype(np.uint8)
            img[c * size // 3 : (c + 1) * size // 3] = 230
            Image.fromarray(img, "L").save(d / name / f"{i}.png")
    return d


def component_bytes(state_dir, ids):
    doc = json.loads((state_dir / "state.json").read_text())
    tensors = load_file(str(state_dir / doc["weights"]))
    return {k: v.tobytes() for k, v in tensors.items() if k.split("/")[0] in ids}


def test_tasks_json(capsys):
    assert main(["tasks", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 8
    for r in rows:
        assert {"name", "num_classes", "splits", "image_size"} <= r.keys()


def test_pretrain_writes_a_usable_root(tiny_root_dir):
    cfg = json.loads((tiny_root_dir / "config.json").read_text())
    assert cfg["pretrained_on"] == "symbols" and 0.0 <= cfg["val_accuracy"] <= 1.0
    assert (tiny_root_dir / "model.safetensors").stat().st_size > 100_000


def test_evolve_report_extend(tiny_root_dir, folder_task, tmp_path, capsys):
    state = tmp_path / "state"
    args = ["evolve", "--task", "digits", "--task", "shapes", "--task", f"bands={folder_task}",
            "--root", str(tiny_root_dir), "--out", str(state), "--budget", "tiny", "-q"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["report", str(state), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["tasks"]) == {"digits", "shapes", "bands"}
    assert doc["root_params"] > 0 and doc["system_params"] >= doc["root_params"]
    for t in doc["tasks"].values():
        assert 0.0 <= t["val_accuracy"] <= 1.0 and 0.0 <= t["test_accuracy"] <= 1.0
        assert t["accounted_params"] <= t["params"]
        assert t["components"]
    assert any(t["accounted_params"] < t["params"] for t in doc["tasks"].values())
    assert doc["params_per_task"] == pytest.approx(sum(t["accounted_params"] for t in doc["tasks"].values()) / 3)
    assert (state / "system.png").stat().st_size > 1000

    # extend with a new task: the first tasks' tensors stay byte-identical
    ids = {c for t in doc["tasks"].values() for c in t["components"]}
    before = component_bytes(state, ids)
    state2 = tmp_path / "state2"
    assert main(["evolve", "--from", str(state), "--task", "counting", "--out", str(state2), "--budget", "tiny", "-q"]) == 0
    capsys.readouterr()
    after = component_bytes(state2, ids)
    assert after == before
    assert main(["report", str(state2), "--json"]) == 0
    doc2 = json.loads(capsys.readouterr().out)
    assert set(doc2["tasks"]) == {"digits", "shapes", "bands", "counting"}
    for t in ("digits", "shapes", "bands"):
        assert doc2["tasks"][t]["components"] == doc["tasks"][t]["components"]
        assert doc2["tasks"][t]["test_accuracy"] == doc["tasks"][t]["test_accuracy"]

    # an existing STATE is never written over
    stamp = (state / "state.json").read_bytes()
    assert main(args) == 2
    assert (state / "state.json").read_bytes() == stamp


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "no_such_task"], "no_such_task"),
        (["--task", "digits", "--root", "timm:not_a_model_xyz"], "not_a_model_xyz"),
        (["--task", "digits", "--root", "/nonexistent/root"], "does not exist"),
        (["--task", "digits", "--budget", "tiny", "--scale-factor", "1.5"], "scale-factor"),
        (["--task", "digits", "--strategy", "bogus"], "strategy"),
        (["--task", "digits", "--image-size", "0"], "--image-size 0 cannot work: use a positive multiple of the root's patch size, at most 384"),
        (["--task", "digits", "--image-size", "400"], "--image-size 400 cannot work"),
        (["--task", "digits", "--image-size", "20"], "--image-size 20 cannot work: use a multiple of the root's patch size 8 from 8 to 384"),
    ],
)
def test_evolve_bad_input_exits_2_and_writes_nothing(args, message, tmp_path, capsys, tiny_root_dir):
    out = tmp_path / "out"
    full = ["evolve", "--out", str(out), "-q"] + args
    if "--root" not in args:
        full += ["--root", str(tiny_root_dir)]
    assert main(full) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resume_and_report_of_bad_states(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "state.json").write_text("{")
    assert main(["evolve", "--out", str(tmp_path / "half"), "--resume", "-q"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["evolve", "--out", str(tmp_path / "half"), "--resume", "--image-size", "16", "-q"]) == 2
    assert "drop --task, --root, --from and --image-size" in capsys.readouterr().err


def test_an_interrupted_first_save_is_recognised_and_cleaned(tiny_root_dir, tmp_path, capsys):
    """A kill during the very first save leaves only a temporary file: --resume says so, and
    the same --out works again; later saves remove temporaries of killed saves; files follow the umask."""
    import os

    out = tmp_path / "state"
    out.mkdir()
    (out / ".components-abc123").write_bytes(b"\0" * 64)
    assert main(["evolve", "--out", str(out), "--resume", "-q"]) == 2
    err = capsys.readouterr().err
    assert "first save that never finished" in err and f"mutask evolve --out {out}" in err
    (out / ".state-dead.json").write_text("{")  # another killed save's temporary
    old = os.umask(0o022)
    try:
        assert main(["evolve", "--out", str(out), "--task", "digits", "--budget", "tiny", "--root", str(tiny_root_dir), "-q"]) == 0
    finally:
        os.umask(old)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert (out / "state.json").stat().st_mode & 0o777 == 0o644
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.glob("components-*.safetensors"))


def test_out_that_is_a_file_and_help_without_none(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["evolve", "--out", str(f), "--task", "digits", "-q"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    for command in ("evolve", "pretrain", "export", "serve", "bench", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text, (command, text)
        if command in ("evolve", "pretrain", "serve"):
            assert "--threads" in text, command


def test_threads_sets_torch_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["pretrain", "--out", str(tmp_path / "r"), "--budget", "tiny", "--threads", "1", "-q"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["pretrain", "--out", str(tmp_path / "r2"), "--budget", "tiny", "--threads", "0", "-q"]) == 2
    finally:
        torch.set_num_threads(before)


def test_image_size_sets_where_new_tasks_start(tiny_root_dir, folder_task, tmp_path, capsys):
    """--image-size N: every new task's record and first generation; without it, the default rule."""
    state = tmp_path / "state"
    args = ["evolve", "--task", f"bands={folder_task}", "--task", "digits", "--root", str(tiny_root_dir),
            "--out", str(state), "--budget", "tiny", "-q"]
    assert main(args + ["--image-size", "16"]) == 0
    doc = json.loads((state / "state.json").read_text())
    assert {t: r["start_image_size"] for t, r in doc["tasks"].items()} == {"bands": 16, "digits": 16}
    first = {}
    for h in doc["history"]:
        first.setdefault(h["task"], h["hparams"]["image_size"])
    assert first == {"bands": 16, "digits": 16}

    state2 = tmp_path / "state2"
    assert main(["evolve", "--from", str(state), "--task", "shapes", "--out", str(state2), "--budget", "tiny", "-q"]) == 0
    capsys.readouterr()
    tasks = json.loads((state2 / "state.json").read_text())["tasks"]
    assert tasks["bands"]["start_image_size"] == 16  # kept from the first run
    assert tasks["shapes"]["start_image_size"] == 32  # the default: min(root 32, the suite's 32)


def test_newcomers_default_path_is_the_real_root(capsys):
    """`mutask demo` and `mutask evolve` default to the ImageNet EfficientNet-Lite0 and say so; the
    demo's budget is the named `demo` preset, described with its numbers; the toy root is not offered."""
    from mutask.evolve.config import BUDGETS, DEFAULT_ROOT, DEMO_BUDGET

    parser = __import__("mutask.cli", fromlist=["build_parser"]).build_parser()
    demo = parser.parse_args(["demo"])
    assert (demo.root, demo.budget) == (DEFAULT_ROOT, DEMO_BUDGET) == ("efficientnet-lite0", "demo")
    assert parser.parse_args(["evolve", "--out", "x"]).root is None  # None: evolve.config.DEFAULT_ROOT
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    b = BUDGETS["demo"]
    assert "EfficientNet-Lite0" in text and f"{b['children']} children of {b['steps']} steps at batch {b['batch_size']}" in text
    assert "15 minutes" in text and "mutask pretrain" not in text and "toy root" not in text
    with pytest.raises(SystemExit):
        main(["evolve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: efficientnet-lite0)" in text and "pretrained on first use" not in text
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert "pretrain pretrain a toy ViT root (tests and experiments; not the default root)" in listing


def test_demo_tasks_are_the_suite_plus_installed_optional_tasks(monkeypatch):
    from mutask import demo
    from mutask.evolve.suite import TASKS
    from mutask.evolve.tasks import EMBEDDED_TASKS

    monkeypatch.setitem(TASKS, "mnist", TASKS["mnist"].__class__(**{**TASKS["mnist"].__dict__, "available": lambda: True}))
    monkeypatch.setitem(TASKS, "fashion", TASKS["fashion"].__class__(**{**TASKS["fashion"].__dict__, "available": lambda: False}))
    assert demo.demo_tasks() == list(EMBEDDED_TASKS) + ["mnist"]
    assert set(demo.TOY_DEMO_ACCURACY) == set(EMBEDDED_TASKS)  # every suite task has the bar it must clear
