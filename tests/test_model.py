"""The multitask model core: components, store, path forward against timm."""

import copy

import pytest
import torch

from mutask.evolve.model import ComponentStore, TaskPath, PathModel
from mutask.evolve.roots import build_model, root_for
from mutask.evolve.roots.vit import Adapter, new_head, resample_pos_embed

TINY = {"timm_model": "VisionTransformer", "kwargs": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)}


@pytest.fixture()
def root():
    torch.manual_seed(0)
    vit = build_model(TINY)
    # timm zero-inits nothing we rely on; give the head and tokens real values
    for p in vit.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return root_for(TINY, vit, "tiny")


def test_root_path_matches_timm_forward(root):
    store = ComponentStore()
    path = root.add_to(store)
    model = PathModel.from_store(store, path)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ours = model(x)
        theirs = root.template(x)
        feats = model.forward_features(x)
    assert ours.shape == (5, 7)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.forward_head(feats), ours, atol=0, rtol=0)


def test_inserting_adapter_keeps_outputs_identical(root):
    store = ComponentStore()
    path = root.add_to(store)
    model = PathModel.from_store(store, path)
    adapter = store.add("adapters.1", Adapter(root.embed_dim, 16))
    names = [store[c].name for c in path.components]
    i = names.index("blocks.1")
    with_adapter = TaskPath("p1", "t", path.components[:i] + [adapter.id] + path.components[i:], dict(path.hparams))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), PathModel.from_store(store, with_adapter)(x)
    assert torch.equal(a, b)


def test_zero_head_gives_uniform_logits(root):
    store = ComponentStore()
    path = root.add_to(store)
    head = store.add("head", new_head(root.embed_dim, 4))
    p = TaskPath("p", "t", path.components[:-1] + [head.id], dict(path.hparams))
    with torch.no_grad():
        out = PathModel.from_store(store, p)(torch.randn(3, 3, 32, 32))
    assert torch.equal(out, torch.zeros(3, 4))


def test_shared_component_is_one_object(root):
    store = ComponentStore()
    path = root.add_to(store)
    h1, h2 = store.add("head", new_head(root.embed_dim, 3)), store.add("head", new_head(root.embed_dim, 5))
    p1 = TaskPath("a", "t1", path.components[:-1] + [h1.id], {})
    p2 = TaskPath("b", "t2", path.components[:-1] + [h2.id], {})
    m1, m2 = PathModel.from_store(store, p1), PathModel.from_store(store, p2)
    shared = [cid for cid in p1.components if cid in p2.components]
    assert len(shared) == len(path.components) - 1
    for k in range(len(shared)):
        assert m1.steps[k] is m2.steps[k] is store[shared[k]].module
        for a, b in zip(m1.steps[k].parameters(), m2.steps[k].parameters()):
            assert a.data_ptr() == b.data_ptr()
    assert m1.steps[-1] is not m2.steps[-1]


def test_other_image_size_resamples_pos_embed(root):
    store = ComponentStore()
    path = root.add_to(store)
    model = PathModel.from_store(store, path)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 7)
    pos = store[path.components[2]].module.embed
    resized = resample_pos_embed(pos, 1 + 6 * 6)
    assert resized.shape == (1, 37, root.embed_dim)
    assert torch.equal(resized[:, 0], pos[:, 0])  # class position kept
    assert torch.equal(resample_pos_embed(pos, pos.shape[1]), pos)


def test_frozen_prefix_runs_without_autograd(root):
    store = ComponentStore()
    path = root.add_to(store)
    clone = store.clone(path.components[4])  # blocks.1 becomes trainable
    model = PathModel.from_store(store, path, {path.components[4]: clone})
    assert model.frozen_prefix_len() == 4
    seen = []
    hook = model.steps[3].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    hook.remove()
    assert seen == [False]
    assert all(p.grad is not None for p in clone.module.parameters())
    assert all(p.grad is None for cid in path.components for p in store[cid].module.parameters())


def test_rebuild_components_from_tensors(root):
    store = ComponentStore()
    path = root.add_to(store)
    rebuilt = ComponentStore()
    for cid in path.components:
        c = store[cid]
        rebuilt.add(c.name, root.module_for(c.name, copy.deepcopy(c.tensors())), cid=cid)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(PathModel.from_store(store, path)(x), PathModel.from_store(rebuilt, path)(x))


def test_timm_root_by_name_matches_timm_and_rejects_unsupported_networks():
    from mutask.evolve.roots import load_root
    from mutask.errors import MutaskError

    torch.manual_seed(0)
    root = load_root("timm:vit_tiny_patch16_224")  # timm's architecture, random weights (no network)
    assert (root.depth, root.embed_dim, root.patch_size, root.image_size) == (12, 192, 16, 224)
    store = ComponentStore()
    path = root.add_to(store)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(PathModel.from_store(store, path)(x), root.template(x), atol=1e-5, rtol=0)
    with pytest.raises(MutaskError, match="not supported"):
        load_root("timm:convnext_atto")  # (resnet18 is a conv root now: tests/test_conv_root.py)
    avg = {"timm_model": "VisionTransformer", "kwargs": dict(TINY["kwargs"], global_pool="avg")}
    with pytest.raises(MutaskError, match="pools with 'avg'"):
        root_for(avg, build_model(avg), "avg-pool")


def test_a_new_root_family_is_one_registered_class(monkeypatch):
    """A family registers itself (and may claim short --root names); load_root and root_for
    find it, and refuse its modules with the reason before it is registered."""
    from mutask.errors import MutaskError
    from mutask.evolve.roots import registry
    from mutask.evolve.roots.conv import ConvRoot

    monkeypatch.setattr(registry, "_FAMILIES", list(registry._FAMILIES))
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))

    class TinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_stem = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.blocks = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1))
            self.classifier = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.classifier(self.blocks(self.conv_stem(x)).mean(dim=(2, 3)))

    spec = {"timm_model": "tiny-net", "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize": "bilinear"}, "image_size": 32}
    with pytest.raises(MutaskError, match="not supported: it is a TinyNet, not a timm VisionTransformer, EfficientNet or ResNet"):
        root_for(spec, TinyNet(), "tiny-net")

    @registry.register_root
    class TinyNetRoot(ConvRoot):
        kind, supported, head_name = "TinyNet", "a TinyNet", "classifier"

        @classmethod
        def problems(cls, module):
            return [] if isinstance(module, TinyNet) else None

        @classmethod
        def layout(cls, m):
            return [("conv_stem", m.conv_stem)], [(f"blocks.{i}", b) for i, b in enumerate(m.blocks)], []

    torch.manual_seed(0)
    net = TinyNet()
    registry.register_names(["tiny-net"], lambda name: (dict(spec), net))
    root = registry.load_root("tiny-net")
    assert isinstance(root, TinyNetRoot) and root.depth == 2 and root.source == "tiny-net"
    store = ComponentStore()
    path = root.add_to(store)
    assert [store[c].name for c in path.components] == ["conv_stem", "blocks.0", "blocks.1", "classifier"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(PathModel.from_store(store, path)(x), net(x))
    assert "a TinyNet" in registry.supported()
