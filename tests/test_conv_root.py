"""CNN roots (evolve/roots/efficientnet.py, resnet.py, conv.py): timm EfficientNet and ResNet cut into components, frozen
BatchNorm, depth, and `mutask evolve --root timm:...` -> export -> serve end to end."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch

from mutask.errors import MutaskError
from mutask.evolve.model import ComponentStore, PathModel, TaskPath
from mutask.evolve.roots import load_root
from tests.conftest import synthetic_task


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return load_root("timm:resnet18")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_root_path_matches_timm_and_rebuilds_from_tensors(name):
    torch.manual_seed(0)
    root = load_root(f"timm:{name}")
    store = ComponentStore()
    path = root.add_to(store)
    names = [store[c].name for c in path.components]
    if name == "resnet18":
        assert names[:3] == ["conv1", "bn1", "layer1.0"] and names[-2:] == ["layer4.1", "fc"] and root.depths == [7, 8]
    else:
        assert names[:3] == ["conv_stem", "bn1", "blocks.0.0"] and names[-3:] == ["conv_head", "bn2", "classifier"]
        assert root.depths == [root.depth]  # the last stage is one block: the depth cannot move
    assert root.preprocessing.mean == (0.485, 0.456, 0.406) and root.preprocessing.resize == "bicubic"
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(PathModel.from_store(store, path)(x), root.template(x), atol=1e-5, rtol=0)
        rebuilt = ComponentStore()
        for cid in path.components:
            rebuilt.add(store[cid].name, root.module_for(store[cid].name, copy.deepcopy(store[cid].tensors())), cid=cid)
        assert torch.equal(PathModel.from_store(store, path)(x), PathModel.from_store(rebuilt, path)(x))


def test_unsupported_networks_are_refused_with_the_reason():
    with pytest.raises(MutaskError, match="MobileNetV3, whose head convolution runs after the global pooling"):
        load_root("timm:mobilenetv3_small_050")
    with pytest.raises(MutaskError, match="not supported: it is a ConvNeXt"):
        load_root("timm:convnext_atto")


def test_adapter_is_identity_and_a_shorter_path_runs(resnet):
    store = ComponentStore()
    path = resnet.add_to(store)
    i = [store[c].name for c in path.components].index("layer3.0")
    adapter = store.add("adapters.4", resnet.new_adapter(4, 8))
    assert resnet.in_channels[4] == 128 and adapter.module.down.kernel_size == (1, 1)
    with_adapter = TaskPath("p1", "t", path.components[:i] + [adapter.id] + path.components[i:], {})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(PathModel.from_store(store, path)(x), PathModel.from_store(store, with_adapter)(x))
        head = store.add("fc", resnet.new_head(3))
        seven = resnet.path_names(7, lambda i: False)
        assert seven[-2:] == ["layer4.0", "fc"]
        short = TaskPath("p2", "t", path.components[: len(seven) - 1] + [head.id], {})
        assert PathModel.from_store(store, short)(x).shape == (2, 3)


def test_frozen_batchnorm_never_moves_and_a_cloned_one_trains(resnet):
    """A child with a frozen stem and layer1.0 and a cloned layer1.1 trains: the frozen
    components' buffers (BatchNorm running statistics) stay byte-identical, the clone's move."""
    from mutask.evolve.roots.conv import new_pooled_head
    from mutask.evolve.train import train

    store = ComponentStore()
    path = resnet.add_to(store)
    frozen = path.components[:3]  # conv1, bn1, layer1.0
    clone = store.clone(path.components[3])  # layer1.1
    head = store.clone(store.add("fc", new_pooled_head(64, 4)).id)  # a head on layer1's 64 channels
    before = {cid: {k: v.clone() for k, v in store[cid].module.state_dict().items()} for cid in frozen}
    clone_before = clone.module.bn1.running_mean.clone()
    child = TaskPath("c", "t", frozen + [clone.id, head.id], {"image_size": 32})
    model = PathModel.from_store(store, child, {clone.id: clone, head.id: head})
    hp = dict(lr=0.01, lr_schedule="constant", warmup_ratio=0.1, momentum=0.9, nesterov=False, image_size=32,
              crop_area_min=1.0, aspect_ratio_min=1.0, flip=False, color_jitter=0.0)
    task = synthetic_task("t", 4, 0, n_train=64, n_eval=16)
    params = [p for m in (clone.module, head.module) for p in m.parameters()]
    train(model, params, task.train, task.validation, hp, pre=resnet.preprocessing.at(32), steps=3, batch_size=16, validations=1, seed=0)
    assert sum("running_mean" in k for cid in frozen for k in before[cid]) == 3  # bn1, layer1.0's bn1 and bn2
    for cid in frozen:
        after = store[cid].module.state_dict()
        for k, v in before[cid].items():
            assert v.numpy().tobytes() == after[k].numpy().tobytes(), (store[cid].name, k)
    assert not torch.equal(clone.module.bn1.running_mean, clone_before)


# ---- end to end: evolve -> export -> serve ------------------------------------------------


@pytest.mark.parametrize("root", ["timm:resnet18", "timm:efficientnet_lite0"])
def test_evolve_extend_export_serve_a_conv_root(root, tmp_path, capsys):
    """`mutask evolve --root timm:NAME --budget tiny`, `--from` (old tasks byte-identical),
    `mutask export` (per-task and segment graphs, parity), `mutask serve`: every task's answer
    over HTTP equals a plain onnxruntime run of its graph."""
    import json

    from mutask.cli import main
    from mutask.export.artifact import load_artifact
    from tests.test_cli import component_bytes
    from tests.test_serving_helpers import Server, reference_logits, sample_images

    state, state2, art = tmp_path / "state", tmp_path / "state2", tmp_path / "art"
    common = ["--budget", "tiny", "--steps", "3", "--batch-size", "16", "-q"]
    assert main(["evolve", "--root", root, "--task", "digits", "--task", "shapes", "--out", str(state), *common]) == 0
    capsys.readouterr()
    assert main(["report", str(state), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ids = {c for t in doc["tasks"].values() for c in t["components"]}
    assert main(["evolve", "--from", str(state), "--task", "counting", "--out", str(state2), *common]) == 0
    assert component_bytes(state2, ids) == component_bytes(state, ids)
    assert main(["export", str(state2), "--out", str(art), "--parity-samples", "16", "-q"]) == 0
    capsys.readouterr()
    a = load_artifact(art)
    assert set(a.tasks) == {"digits", "shapes", "counting"} and a.segments
    for t in a.tasks.values():
        assert t.preprocessing.mean == (0.485, 0.456, 0.406)
    images = sample_images()
    with Server(art, tmp_path / "server.log") as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for task in a.tasks:
            for name in ("rgb45x61-png", "large-jpeg", "L-png"):
                r = c.post("/predict", data={"task": task}, files={"image": (name, images[name])})
                assert r.status_code == 200, r.text
                ref = reference_logits(art, task, images[name])
                assert r.json()["index"] == int(ref.argmax()), (task, name)
