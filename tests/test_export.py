"""Export's artifact: deduplicated weights, the manifest's contents, per-task and segment ONNX
graphs over the one weights file, segment chains equal to task graphs, how paths are cut."""

import copy
import json
import shutil

import numpy as np
import pytest

from mutask.evolve.model import PathModel
from mutask.evolve.train import predict
from mutask.export.artifact import WEIGHTS, external_refs, load_artifact
from mutask.export.sizes import artifact_stats
from mutask.export.manifest import INLINE_LIMIT
from mutask.export.segments import plan_segments
from mutask.export.verify import verify_artifact
from mutask.export.weights import content_key
from mutask.preprocessing import Preprocessing
from tests.export_helpers import evolved_artifact


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    return evolved_artifact(tmp_path_factory)


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
    from mutask.export.chain import chain_vs_graph, ort_session

    s, data, art = evolved
    a = load_artifact(art)
    for t in a.tasks:
        pre = a.tasks[t].preprocessing
        x = pre.normalize(data[t].test.resized(pre.image_size, resize=pre.resize))
        sessions = [ort_session(a.segment_path(sid)) for sid in a.chain(t)]
        assert [(ss.get_inputs()[0].name, ss.get_outputs()[0].name) for ss in sessions] == [("input", "output")] * len(sessions)
        whole, agree = chain_vs_graph(a.graph_path(t), [a.segment_path(sid) for sid in a.chain(t)], [x[:5], x[5:]])
        assert whole.shape == (len(x), a.tasks[t].num_classes) and agree.ok and agree.max_abs_diff <= 1e-4
        # the chain, fed by hand, gives the whole graph's logits
        h = x
        for ss in sessions:
            h = ss.run(None, {"input": h})[0]
        assert np.abs(h - whole).max() <= 1e-4
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
        assert external_refs(f.read_bytes())
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
