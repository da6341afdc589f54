"""Export: deduplicated weights, per-task and segment ONNX graphs over them, parity, atomicity,
the torch-free reader, the CLI and BentoML."""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mutask.evolve.evolution import Evolution
from mutask.evolve.model import PathModel
from mutask.evolve.state import System
from mutask.evolve.train import predict
from mutask.preprocessing import Preprocessing
from mutask.export.artifact import WEIGHTS, ArtifactError, artifact_stats, external_refs, load_artifact
from mutask.export.build import export_system
from mutask.export.graphs import INLINE_LIMIT
from mutask.export.segments import plan_segments
from mutask.export.verify import verify_artifact
from mutask.export.weights import content_key
from mutask.errors import MutaskError
from tests.conftest import add_task, make_root, synthetic_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(rounds=1, children=3, generation_size=2, steps=4, validations=1, batch_size=16)


def new_system(root, names, data):
    from dataclasses import asdict

    from mutask.evolve.evolution import EvolveConfig

    s = System.new(root, seed=0)
    s.config["evolve"] = asdict(EvolveConfig(**TINY))
    s.config["order"] = names
    s.tasks.update({t: {"spec": t, "seed": 0, "num_classes": data[t].num_classes} for t in names})
    return s


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    """Tasks a and b evolved (b seeded from a: shared prefix); task c = a's path at image
    size 48 (position embedding resampled in the graph) with an unchanged clone of a's norm
    (the same bytes: stored once) and its own head; task d = b's path with its own patch_embed
    (it meets b's components after a different first step). Exported once."""
    base = tmp_path_factory.mktemp("evolved")
    data = {"a": synthetic_task("a", 4, 1), "b": synthetic_task("b", 3, 2), "c": synthetic_task("c", 5, 3), "d": synthetic_task("d", 3, 4)}
    s = new_system(make_root(), ["a", "b"], data)
    Evolution(s, data, base / "st", show_progress=False).run(["a", "b"])
    pa = s.best_path("a")
    comps = list(pa.components[:-1])
    i = [s.store[c].name for c in comps].index("norm")
    comps[i] = s.store.adopt(s.store.clone(comps[i])).id
    add_task(s, "c", comps, dict(pa.hparams, image_size=48), 5, seed=3)
    pb = s.best_path("b")
    add_task(s, "d", pb.components[:-1], dict(pb.hparams), 3, seed=4, own=("patch_embed",))
    art = export_system(s, base / "art", data=data, show_progress=False)
    return s, data, art


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """One task on the root (no evolution): the cheap system for the write-path tests."""
    base = tmp_path_factory.mktemp("solo")
    s = System.new(make_root(), seed=0)
    add_task(s, "solo", s.root_path.components[:-1], {"image_size": 32, "num_blocks": 3}, 3, seed=5)
    s.config["order"] = ["solo"]
    s.save(base / "st")
    data = {"solo": synthetic_task("solo", 3, 5, n_train=8, n_eval=24)}
    return s, data, base / "st"


def _tree(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# --------------------------------------------------------------------------- the artifact


def test_weights_hold_every_unique_tensor_once(evolved):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    s, _, art = evolved
    a = load_artifact(art)
    tensors = load_file(str(art / WEIGHTS))
    keys = [content_key(v) for v in tensors.values()]
    assert len(keys) == len(set(keys)), "a tensor is stored twice"
    used = {c for t in s.best for c in s.best_path(t).components}
    assert set(a.components) == used
    # c's norm is an unchanged clone of a's: its tensors point at a's bytes, not copies
    na = next(c for c in s.best_path("a").components if s.store[c].name == "norm")
    nc = next(c for c in s.best_path("c").components if s.store[c].name == "norm")
    assert na != nc and a.components[nc].tensors == a.components[na].tensors
    # every component tensor is in the file, with its exact content
    for cid in used:
        rec = a.components[cid]
        assert rec.num_params == s.store[cid].num_params and rec.name == s.store[cid].name
        assert rec.used_by == [t for t in s.best if cid in s.best_path(t).components]
        for name, t in s.store[cid].tensors().items():
            assert np.array_equal(tensors[rec.tensor_map[name]], t.cpu().numpy())
    # header metadata says which components use each tensor
    with safe_open(str(art / WEIGHTS), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "mutask-weights"
    for key in tensors:
        assert all(key in a.components[c].tensors for c in meta[key].split(","))
    assert sum(v.nbytes for v in tensors.values()) == a.manifest.unique_param_bytes


def test_manifest_contract(evolved):
    s, data, art = evolved
    m = load_artifact(art).manifest
    written = json.loads((art / "manifest.json").read_text())  # the JSON as the writer wrote it
    assert m.format_version == 4 and m.weights == WEIGHTS
    assert m.root.source == "tiny-test-root" and m.root.root_params == s.root_params
    assert list(m.tasks) == ["a", "b", "c", "d"]
    for t, rec in m.tasks.items():
        p = s.best_path(t)
        assert rec.labels == (data[t].class_names if t in "ab" else [f"{t}-{i}" for i in range(data[t].num_classes)])
        assert rec.image_size == p.image_size and rec.preprocessing == Preprocessing.signed_unit(p.image_size)  # the tiny root's
        assert written["tasks"][t]["preprocessing"] == Preprocessing.signed_unit(p.image_size).model_dump(mode="json")
        assert rec.params == s.path_params(p.components)
        assert rec.accounted_params == pytest.approx(s.accounted_params(p.components, t))
        assert rec.components == p.components and rec.metrics.test_accuracy == p.metrics["test_accuracy"]
        assert rec.spec == t and rec.seed == 0
        chain = rec.segments
        assert sum((m.segments[sid].components for sid in chain), []) == p.components
        assert m.segments[chain[0]].input == "image" and m.segments[chain[0]].parents == []
        assert m.segments[chain[-1]].output == "logits"
        for prev, sid in zip(chain, chain[1:]):
            assert prev in m.segments[sid].parents and m.segments[sid].input == "hidden"
            assert int(prev[1:]) < int(sid[1:])  # ids in topological order
        assert all(t in m.segments[sid].tasks for sid in chain)
        assert all(m.segments[sid].image_size == p.image_size for sid in chain)
        par = m.parity.tasks[t]
        assert par.inputs == "test split" and par.examples == len(data[t].test) and par.ok
    assert m.tasks["c"].image_size == 48
    # a and b share a prefix at 32 px; c (48 px) shares no segment with them, only weights
    shared = [sid for sid, seg in m.segments.items() if len(seg.tasks) > 1]
    assert shared and all("c" not in m.segments[sid].tasks for sid in shared)
    assert set(m.tasks["c"].components[:3]) <= set(m.tasks["a"].components)
    # each (component, image size) is in exactly one segment
    steps = [(c, seg.image_size) for seg in m.segments.values() for c in seg.components]
    assert len(steps) == len(set(steps))
    # d starts with its own patch_embed, then joins b: the segment where they meet has two parents
    db, dd = m.tasks["b"].segments, m.tasks["d"].segments
    assert db[0] != dd[0] and db[1:] and dd[1:]
    meet = m.segments[dd[1]]
    assert {"b", "d"} <= set(meet.tasks) and {db[0], dd[0]} <= set(meet.parents)


def test_each_task_graph_runs_alone_in_onnxruntime(evolved, tmp_path):
    import onnxruntime as ort

    s, data, art = evolved
    a = load_artifact(art)
    for t in a.tasks:
        d = tmp_path / t
        d.mkdir()
        shutil.copy(a.graph_path(t), d / "model.onnx")
        shutil.copy(art / WEIGHTS, d / WEIGHTS)
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["logits"]
        assert sess.get_inputs()[0].shape[0] == "batch"
        p = s.best_path(t)
        pre = a.tasks[t].preprocessing
        x = pre.normalize(data[t].test.resized(pre.image_size, resize=pre.resize))
        got = np.concatenate([sess.run(None, {"image": x[:1]})[0], sess.run(None, {"image": x[1:]})[0]])
        on_cpu = copy.deepcopy(PathModel.from_store(s.store, p)).cpu()  # compared with ONNX Runtime's CPU run on one device
        ref = predict(on_cpu, data[t].test, s.root.preprocessing.at(p.image_size))
        assert got.shape == (len(x), len(a.tasks[t].labels))
        assert np.abs(got - ref).max() <= 1e-4
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_segment_chains_equal_task_graphs(evolved):
    from mutask.export.verify import ort_session, run_chain

    s, data, art = evolved
    a = load_artifact(art)
    for t in a.tasks:
        pre = a.tasks[t].preprocessing
        x = pre.normalize(data[t].test.resized(pre.image_size, resize=pre.resize))
        whole = ort_session(a.graph_path(t)).run(None, {"image": x})[0]
        sessions = [ort_session(a.segment_path(sid)) for sid in a.chain(t)]
        assert [ss.get_inputs()[0].name for ss in sessions] == ["input"] * len(sessions)
        assert np.abs(run_chain(sessions, x) - whole).max() <= 1e-4
    rep = verify_artifact(art, data=data)
    assert rep["ok"] and all(r["inputs"] == "test split" for r in rep["tasks"].values())
    # without data (the specs name no loadable task) it checks random inputs and says so
    rep = verify_artifact(art)
    assert rep["ok"] and all(r["inputs"].startswith("random inputs") for r in rep["tasks"].values())


def test_graphs_carry_no_weights(evolved):
    import onnx

    s, _, art = evolved
    a = load_artifact(art)
    st = artifact_stats(art)
    files = [a.graph_path(t) for t in a.tasks] + [a.segment_path(sid) for sid in a.segments]
    for f in files:
        model = onnx.load(str(f), load_external_data=False)
        ext = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and all(len(i.raw_data) <= INLINE_LIMIT for i in model.graph.initializer)
        assert all(e.value == WEIGHTS for i in ext for e in i.external_data if e.key == "location")
        assert f.stat().st_size < 32 * 1024  # structure only
        assert [r for r in external_refs(f.read_bytes()) if r["external"]]
    # every weight byte is on disk once: the weights file is its tensors plus a small header
    unique = a.manifest.unique_param_bytes
    assert st["unique_param_bytes"] == unique
    assert st["weights_file_bytes"] <= 1.01 * unique
    assert st["total_bytes"] <= 1.01 * unique + st["graph_bytes"] + st["manifest_bytes"]
    assert st["naive_bytes"] > st["weights_file_bytes"] * 1.5  # three tasks would hold ~3 copies
    print(f"\nexport bytes: unique params {unique:,}, weights file {st['weights_file_bytes']:,}, graphs {st['graph_bytes']:,} "
          f"({st['num_graphs']} files), manifest {st['manifest_bytes']:,}; total {st['total_bytes']:,}; naive {st['naive_bytes']:,}")


def test_plan_segments():
    steps = {
        "a": [("p", 32), ("b0", 32), ("b1", 32), ("ha", 32)],
        "b": [("p", 32), ("b0", 32), ("x1", 32), ("hb", 32)],
        "c": [("p", 32), ("b0", 32), ("x1", 32), ("hc", 32)],
        "d": [("p", 48), ("b0", 48), ("hd", 48)],
        "e": [("q", 32), ("b0", 32), ("x1", 32), ("he", 32)],  # own first step, then joins b and c
    }
    segs, chains = plan_segments(steps)
    assert chains == {
        "a": ["s0", "s3", "s4"], "b": ["s0", "s3", "s5", "s6"], "c": ["s0", "s3", "s5", "s7"],
        "d": ["s1"], "e": ["s2", "s3", "s5", "s8"],
    }
    assert segs["s0"] == {"components": ["p"], "image_size": 32, "tasks": ["a", "b", "c"], "parents": [], "input": "image", "output": "hidden"}
    # b0 is shared by a, b, c and e although e reached it through q: one segment, two parents
    assert segs["s3"] == {"components": ["b0"], "image_size": 32, "tasks": ["a", "b", "c", "e"], "parents": ["s0", "s2"], "input": "hidden", "output": "hidden"}
    assert segs["s5"]["components"] == ["x1"] and segs["s5"]["tasks"] == ["b", "c", "e"] and segs["s5"]["parents"] == ["s3"]
    assert segs["s4"] == {"components": ["b1", "ha"], "image_size": 32, "tasks": ["a"], "parents": ["s3"], "input": "hidden", "output": "logits"}
    # the same components at 48 px are other steps: d runs alone, in one segment
    assert segs["s1"] == {"components": ["p", "b0", "hd"], "image_size": 48, "tasks": ["d"], "parents": [], "input": "image", "output": "logits"}
    # a pure prefix tree stays one: every segment has at most one parent
    segs, chains = plan_segments({t: steps[t] for t in "abc"})
    assert all(len(s["parents"]) <= 1 for s in segs.values()) and chains["a"] == ["s0", "s1"]
    with pytest.raises(ValueError, match="own head"):
        plan_segments({"a": [("p", 32)], "b": [("p", 32), ("h", 32)]})
    with pytest.raises(ValueError, match="cycle"):
        plan_segments({"a": [("p", 32), ("x", 32), ("y", 32), ("ha", 32)], "b": [("p", 32), ("y", 32), ("x", 32), ("hb", 32)]})
    with pytest.raises(ValueError, match="starts the path"):
        plan_segments({"a": [("p", 32), ("ha", 32)], "b": [("q", 32), ("p", 32), ("hb", 32)]})
    with pytest.raises(ValueError, match="empty"):
        plan_segments({"a": []})


# --------------------------------------------------------------------------- writing


def test_force_and_interrupted_export(solo, tmp_path, monkeypatch):
    import mutask.export.build as build
    import mutask.export.parity as parity

    s, data, _ = solo
    art = tmp_path / "art"
    export_system(s, art, data=data, show_progress=False)
    before = _tree(art)
    with pytest.raises(MutaskError, match="--force"):
        export_system(s, art, data=data, show_progress=False)
    assert _tree(art) == before

    # interrupted mid-way (weights written; then graphs written, parity running):
    # no ART, no temp dirs, an old ART intact
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "plan_segments", boom)
    with pytest.raises(KeyboardInterrupt):
        export_system(s, tmp_path / "new", data=data, show_progress=False)
    assert not (tmp_path / "new").exists() and not _leftovers(tmp_path, "new")
    monkeypatch.undo()
    monkeypatch.setattr(parity, "graph_outputs", boom)
    with pytest.raises(KeyboardInterrupt):
        export_system(s, art, data=data, force=True, show_progress=False)
    assert _tree(art) == before and not _leftovers(tmp_path, "art")
    monkeypatch.undo()

    (art / "marker").write_text("old")
    export_system(s, art, data=data, force=True, show_progress=False)
    assert not (art / "marker").exists() and load_artifact(art).tasks.keys() == {"solo"}
    assert not _leftovers(tmp_path, "art")
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
    assert not (tmp_path / "art").exists() and not _leftovers(tmp_path, "art")


# --------------------------------------------------------------------------- reading


def test_tampered_artifacts_are_refused(evolved, tmp_path):
    import onnx

    _, _, art = evolved

    def copy(name):
        d = tmp_path / name
        shutil.copytree(art, d)
        return d

    d = copy("flip")
    w = bytearray((d / WEIGHTS).read_bytes())
    w[len(w) // 2] ^= 0xFF
    (d / WEIGHTS).write_bytes(bytes(w))
    with pytest.raises(ArtifactError, match="weights.safetensors.*sha256"):
        load_artifact(d)
    load_artifact(d, verify=False)  # the cheap open only checks presence and size

    d = copy("trunc")
    (d / WEIGHTS).write_bytes((art / WEIGHTS).read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(d, verify=False)

    d = copy("missing")
    victim = load_artifact(d).tasks["b"].graph
    (d / victim).unlink()
    with pytest.raises(ArtifactError, match=f"missing {victim}"):
        load_artifact(d)

    d = copy("version")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 1  # the prefix-tree format: "parent" where version 2 has "parents"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version 1.*reads version 4"):
        load_artifact(d)

    d = copy("graph")
    g = d / load_artifact(d).tasks["a"].graph
    b = bytearray(g.read_bytes())
    b[-3] ^= 0x01
    g.write_bytes(bytes(b))
    with pytest.raises(ArtifactError, match=f"{g.name} does not match its sha256"):
        load_artifact(d)

    # a graph whose reference points off a tensor, with the manifest hash made to match
    d = copy("offset")
    g = d / load_artifact(d).tasks["a"].graph
    model = onnx.load(str(g), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    entry = next(e for e in init.external_data if e.key == "offset")
    entry.value = str(int(entry.value) + 4)
    g.write_bytes(model.SerializeToString())
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"][g.name] = {"sha256": hashlib.sha256(g.read_bytes()).hexdigest(), "bytes": g.stat().st_size}
    (d / "manifest.json").write_text(json.dumps(resealed(m)))
    with pytest.raises(ArtifactError, match="not one tensor"):
        load_artifact(d)

    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")


def resealed(m: dict) -> dict:
    """``m`` with its manifest_sha256 recomputed: what a writer that made this manifest would
    have written (the schema's checks are reached only past the digest)."""
    from mutask.export.manifest import content_digest

    return dict(m, manifest_sha256=content_digest(dict(m, manifest_sha256="")))


def _edited_manifest(art, tmp_path, edit):
    """A directory holding ``art``'s manifest.json after ``edit(manifest dict)``, resealed
    (the schema is checked before any other file is looked at)."""
    d = tmp_path / "edited"
    d.mkdir()
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(resealed(m)))
    return d


def test_an_edit_without_a_new_digest_is_refused(evolved, tmp_path):
    _, _, art = evolved
    d = tmp_path / "art"
    shutil.copytree(art, d)
    m = json.loads((d / "manifest.json").read_text())
    m["tasks"]["a"]["labels"][0] = "renamed"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="manifest_sha256.*edited or damaged after export") as e:
        load_artifact(d, verify=False)
    assert f"`mutask export STATE --out {d} --force`" in str(e.value)
    (d / "manifest.json").write_text(json.dumps(resealed(m)))
    assert load_artifact(d).tasks["a"].labels[0] == "renamed"  # the digest is what binds it


def _add_cycle(m):
    """Two extra segments, each the other's parent (valid in every other respect)."""
    seg = m["segments"][m["tasks"]["a"]["segments"][-1]]
    for sid, parent in (("s98", "s99"), ("s99", "s98")):
        m["segments"][sid] = dict(seg, input="hidden", parents=[parent])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["tasks"]["a"].update(num_classes="four"), r"field tasks\.a\.num_classes: .*integer"),
        (lambda m: m["segments"]["s0"].update(input_shape="batch x 3"), r"field segments\.s0\.input_shape: .*list"),
        (lambda m: m["tasks"]["b"].pop("labels"), r"field tasks\.b\.labels: Field required"),
        (lambda m: m.pop("weights_sha256"), r"field weights_sha256: Field required"),
        (lambda m: m["tasks"]["a"]["segments"].__setitem__(-1, "s42"), r"tasks\.a\.segments: segment s42 does not exist"),
        (_add_cycle, r"segments\.s9[89]\.parents: the parent links form a cycle s9[89] -> s9[89] -> s9[89]"),
    ],
    ids=["wrong-type", "wrong-shape-type", "missing-task-field", "missing-top-field", "chain-names-missing-segment", "parent-cycle"],
)
def test_manifest_schema_refusals(evolved, tmp_path, edit, message):
    _, _, art = evolved
    d = _edited_manifest(art, tmp_path, edit)
    with pytest.raises(ArtifactError, match=message) as e:
        load_artifact(d, verify=False)
    assert str(d / "manifest.json") in str(e.value)
    assert f"`mutask export STATE --out {d} --force`" in str(e.value)


def test_format_version_1_is_refused_with_the_reexport_command(evolved, tmp_path):
    _, _, art = evolved

    def to_version_1(m):  # version 1 had a prefix tree: one "parent" per segment
        m["format_version"] = 1
        for seg in m["segments"].values():
            parents = seg.pop("parents")
            seg["parent"] = parents[0] if parents else None

    d = _edited_manifest(art, tmp_path, to_version_1)
    with pytest.raises(ArtifactError, match="format_version 1.*reads version 4") as e:
        load_artifact(d, verify=False)
    assert f"`mutask export STATE --out {d} --force`" in str(e.value)


def test_reader_imports_without_torch(evolved):
    _, _, art = evolved
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import mutask.export, mutask.export.artifact\n"
        "from mutask.export import load_artifact, FORMAT_VERSION, ArtifactError, Artifact\n"
        f"a = load_artifact({str(art)!r})\n"
        "t = a.tensors()\n"
        "assert a.chain('a') and a.graph_path('c').is_file() and a.segment_path(a.chain('c')[0]).is_file()\n"
        "assert sorted(a.tasks) == ['a', 'b', 'c', 'd'] and a.weights_path.name == 'weights.safetensors'\n"
        "assert set(t) == {k for c in a.components.values() for k in c.tensors}\n"
        "assert not [m for m in sys.modules if m.startswith(('torch.', 'onnx', 'mutask.evolve'))]\n"
        "print('ok', len(t))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


# --------------------------------------------------------------------------- CLI and BentoML


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
    assert list(stored.tasks) == ["solo"] and stored.labels("solo") == ["solo-0", "solo-1", "solo-2"]
    assert str(model.path).startswith(os.environ["BENTOML_HOME"])


def test_verify_only_reports_a_graph_onnxruntime_refuses(evolved, tmp_path, capsys, monkeypatch):
    """A graph that passes the integrity checks (its hash made to match) but that ONNX Runtime
    cannot load: `--verify-only` exits 2 with a message naming the file, no traceback."""
    import logging

    import onnx

    # main()'s logging.basicConfig: a handler on this test's stderr, not an earlier test's
    monkeypatch.setattr(logging.getLogger(), "handlers", [])

    from mutask.cli import main

    _, _, art = evolved
    d = tmp_path / "art"
    shutil.copytree(art, d)
    g = d / load_artifact(d).tasks["a"].graph
    model = onnx.load(str(g), load_external_data=False)
    model.graph.node[0].op_type = "NoSuchOperator"
    g.write_bytes(model.SerializeToString())
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"][g.name] = {"sha256": hashlib.sha256(g.read_bytes()).hexdigest(), "bytes": g.stat().st_size}
    (d / "manifest.json").write_text(json.dumps(resealed(m)))
    load_artifact(d)  # integrity holds
    assert main(["export", "--verify-only", str(d), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{g}: ONNX Runtime cannot load this graph" in err and "--force" in err
    assert "Traceback" not in err


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
