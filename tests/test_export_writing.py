"""Writing an artifact: --force, interrupted and failed exports leave nothing, the parity
sample, the CLI and BentoML's model store."""

import json
import os
import shutil

import pytest

from mutask.errors import MutaskError
from mutask.evolve.model import PathModel
from mutask.export.artifact import load_artifact
from mutask.export.build import export_system
from mutask.export.verify import verify_artifact
from tests.export_helpers import leftovers, solo_system, tree


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    return solo_system(tmp_path_factory)


def test_force_and_interrupted_export(solo, tmp_path, monkeypatch):
    import mutask.export.build as build
    import mutask.export.parity as parity

    s, data, _ = solo
    art = tmp_path / "art"
    export_system(s, art, data=data, show_progress=False)
    before = tree(art)
    with pytest.raises(MutaskError, match="--force"):
        export_system(s, art, data=data, show_progress=False)
    assert tree(art) == before

    # interrupted mid-way (weights written; then graphs written, parity running):
    # no ART, no temp dirs, an old ART intact
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "plan_segments", boom)
    with pytest.raises(KeyboardInterrupt):
        export_system(s, tmp_path / "new", data=data, show_progress=False)
    assert not (tmp_path / "new").exists() and not leftovers(tmp_path, "new")
    monkeypatch.undo()
    monkeypatch.setattr(parity, "chain_vs_graph", boom)
    with pytest.raises(KeyboardInterrupt):
        export_system(s, art, data=data, force=True, show_progress=False)
    assert tree(art) == before and not leftovers(tmp_path, "art")
    monkeypatch.undo()

    (art / "marker").write_text("old")
    export_system(s, art, data=data, force=True, show_progress=False)
    assert not (art / "marker").exists() and load_artifact(art).tasks.keys() == {"solo"}
    assert not leftovers(tmp_path, "art")
    # --force never deletes something that is not an artifact
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(MutaskError, match="not a mutask artifact"):
        export_system(s, tmp_path / "mine", data=data, force=True, show_progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_parity_failure_writes_nothing(solo, tmp_path, monkeypatch):
    s, data, _ = solo
    original = PathModel.forward
    monkeypatch.setattr(PathModel, "forward", lambda self, x: original(self, x) + 1e-3)  # the reference drifts
    with pytest.raises(MutaskError, match="parity failed") as e:
        export_system(s, tmp_path / "art", data=data, show_progress=False)
    assert "solo" in str(e.value) and "max |diff|" in str(e.value)
    assert not (tmp_path / "art").exists() and not leftovers(tmp_path, "art")


def test_cli_and_bentoml(solo, tmp_path, capsys):
    from mutask.cli import main

    _, _, state = solo
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    assert main(["export", str(tmp_path / "half"), "--out", str(tmp_path / "x")]) == 2
    old = tmp_path / "old"
    shutil.copytree(state, old)
    doc = json.loads((old / "state.json").read_text())
    doc["version"] = 99
    (old / "state.json").write_text(json.dumps(doc))
    assert main(["export", str(old), "--out", str(tmp_path / "x")]) == 2
    assert "version 99" in capsys.readouterr().err
    assert main(["export", str(state)]) == 2 and "--out ART is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    art = tmp_path / "art"
    assert main(["export", str(state), "--out", str(art), "-q", "--bentoml-model", "mutask-test"]) == 0
    out = capsys.readouterr().out
    assert "exported 1 task(s)" in out and "unique parameter bytes" in out
    assert main(["export", str(state), "--out", str(art), "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", "--verify-only", str(art), "-q"]) == 0
    assert "ok" in capsys.readouterr().out
    (art / load_artifact(art).tasks["solo"].graph).unlink()
    assert main(["export", "--verify-only", str(art), "-q"]) == 2
    assert "missing" in capsys.readouterr().err

    import bentoml

    model = bentoml.models.get("mutask-test:latest")
    stored = load_artifact(model.path)
    assert list(stored.tasks) == ["solo"] and stored.tasks["solo"].labels == ["solo-0", "solo-1", "solo-2"]
    assert str(model.path).startswith(os.environ["BENTOML_HOME"])


def test_parity_runs_on_a_bounded_sample(solo, tmp_path):
    """A test split larger than --parity-samples is checked on that many evenly spaced images;
    0 checks them all."""
    s, data, _ = solo
    n = len(data["solo"].test)
    art = export_system(s, tmp_path / "sample", data=data, parity_samples=5, show_progress=False)
    rec = load_artifact(art).manifest.parity.tasks["solo"]
    assert rec.examples == 5 and f"5 of {n}" in rec.inputs and rec.ok
    art = export_system(s, tmp_path / "all", data=data, parity_samples=0, show_progress=False)
    rec = load_artifact(art).manifest.parity.tasks["solo"]
    assert rec.examples == n and rec.inputs == "test split"
    rep = verify_artifact(art, data=data, samples=7)
    assert rep["tasks"]["solo"]["examples"] == 7 and rep["ok"]
