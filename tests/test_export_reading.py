"""Reading an artifact: tampered files, edited manifests and old versions are refused with the
re-export command; the reader needs no torch; --verify-only reports a graph ONNX Runtime refuses;
FORMAT.md is what the manifest model generates; the chain check's rule."""

import json
import shutil
import subprocess
import sys

import pytest

from mutask.export.artifact import WEIGHTS, ArtifactError, load_artifact
from tests.export_helpers import REPO, edited_manifest, evolved_artifact, rehash_graph, resealed


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    return evolved_artifact(tmp_path_factory)


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
    rehash_graph(d, g)
    with pytest.raises(ArtifactError, match="not one tensor"):
        load_artifact(d)

    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")


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
    d = edited_manifest(art, tmp_path, edit)
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

    d = edited_manifest(art, tmp_path, to_version_1)
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
        "assert a.chain('a') and a.graph_path('c').is_file() and a.segment_path(a.chain('c')[0]).is_file()\n"
        "assert sorted(a.tasks) == ['a', 'b', 'c', 'd'] and a.weights_path.name == 'weights.safetensors'\n"
        "from mutask.export.agreement import agreement\n"  # the chain rule serving judges by
        "assert 'onnx' in sys.modules  # the graphs are read with the onnx package\n"
        "assert not [m for m in sys.modules if m.startswith(('torch.', 'onnxscript', 'onnx_ir', 'mutask.evolve'))]\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


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
    rehash_graph(d, g)
    load_artifact(d)  # integrity holds
    assert main(["export", "--verify-only", str(d), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{g}: ONNX Runtime cannot load this graph" in err and "--force" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- the contract, once


def test_format_md_is_what_the_manifest_model_generates():
    """export/FORMAT.md is generated (`python -m mutask.export.format`): a field added to the
    model, a description changed, or a hand edit of the file fails here until it is re-generated."""
    from mutask.export import format as fmt
    from mutask.export.manifest import Manifest, TaskEntry

    text = fmt.render()
    assert fmt.PATH.read_text(encoding="utf-8") == text, "export/FORMAT.md is out of date: run `python -m mutask.export.format`"
    for name, field in {**Manifest.model_fields, **TaskEntry.model_fields}.items():
        assert field.description and f"| `{name}` |" in text  # every field, with its description
    assert TaskEntry.model_fields["labels"].description in text
    assert fmt.main(["--check"]) == 0


def test_chain_agreement_rule_and_unreadable_graph_bytes():
    import numpy as np

    from mutask.export.artifact import external_refs
    from mutask.export.agreement import ATOL, agreement

    ref = np.array([[1.0, 0.0, 2.0], [0.5, 3.0, 0.0]], np.float32)
    assert agreement(ref + ATOL / 2, ref).ok
    off = agreement(ref + 10 * ATOL, ref)
    assert not off.ok and off.max_abs_diff == pytest.approx(10 * ATOL, rel=1e-3) and off.argmax_agreement == 1.0
    big = ref * 20  # logits up to 60: float32 rounding grows with them, and so does the bound
    assert agreement(big + 10 * ATOL, big).ok and not agreement(big + 100 * ATOL, big).ok
    flipped = ref.copy()
    flipped[0, 0] = 5.0  # same tolerance broken, arg-max moved
    assert agreement(flipped, ref).argmax_agreement == 0.5 and not agreement(flipped, ref).ok
    assert not agreement(ref[:1], ref).ok  # another shape never agrees
    with pytest.raises(ValueError, match="not an ONNX model"):
        external_refs(b"\xff\xff\xff\xff not protobuf")
