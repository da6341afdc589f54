"""Training a generation together (evolve/generation.py) gives every child what training it alone
with train() gives, while frozen prefixes run once per batch (and once per image when cached)."""

from __future__ import annotations

import copy

import pytest
import torch

from mutask.evolve import hparams as H
from mutask.evolve.generation import prefix_trie, train_generation
from mutask.evolve.model import PathModel, TaskPath
from mutask.evolve.roots import Root, root_for
from mutask.evolve.state import System
from mutask.evolve.train import train
from tests.conftest import synthetic_task

SETTINGS = dict(steps=12, batch_size=16, validations=3, seed=7, precision="fp32")  # 96 training images: 2 epochs


def tiny_conv_root() -> Root:
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    arch = [["ds_r1_k3_s1_e1_c8"], ["ir_r2_k3_s2_e3_c12"], ["ir_r1_k3_s2_e3_c16"]]
    model = EfficientNet(decode_arch_def(arch), num_features=32, stem_size=8, num_classes=5)
    return root_for({"timm_model": "tiny-conv", "kwargs": {}}, model, "tiny-conv-root")


def make_child(s: System, clones=(), adapters=(), num_classes=4, seed=0):
    """A child path of the root: ``clones`` (names) trainable copies, adapters before the blocks
    ``adapters``, its own head; the rest the root's components, shared frozen."""
    root = s.root
    ids = {s.store[c].name: c for c in s.root_path.components}
    names = root.path_names(root.depth, lambda i: i in adapters)
    torch.manual_seed(seed)
    comps, fresh = [], {}
    for name in names:
        if name == root.head_name:
            module = root.new_head(num_classes)
            torch.nn.init.normal_(module.weight, std=0.1)  # not zero: gradients reach the trunk from step 1
        elif name.startswith("adapters."):
            module = root.new_adapter(int(name.split(".")[1]), 8)
        elif name in clones or name in root.always_cloned:
            module = copy.deepcopy(s.store[ids[name]].module)
        else:
            comps.append(ids[name])
            continue
        cid = s.store.new_id()
        fresh[cid] = module.requires_grad_(True)
        comps.append(cid)
    from mutask.evolve.model import Component

    fresh = {cid: Component(cid, names[comps.index(cid)], m) for cid, m in fresh.items()}
    return TaskPath(s.new_path_id(), "a", comps, {}), fresh


def generation(root, structures, hp_overrides=None):
    s = System.new(root, seed=0)
    hp = dict(H.defaults(32, root.depth), **(hp_overrides or {}))
    kids = [make_child(s, seed=i, **st) for i, st in enumerate(structures)]
    for i, (path, _) in enumerate(kids):
        path.hparams = dict(hp, lr=[0.05, 0.02, 0.1, 0.05][i % 4], momentum=[0.9, 0.8, 0.9, 0.5][i % 4])
    return s, kids


def models_of(s, kids):
    """Independent copies of each child's trainable components, as PathModels."""
    out = []
    for path, fresh in kids:
        mine = {cid: copy.deepcopy(c) for cid, c in fresh.items()}
        out.append((PathModel.from_store(s.store, path, mine), [p for c in mine.values() for p in c.module.parameters()], mine))
    return out


def count_images(module: torch.nn.Module) -> list:
    seen = [0]
    module.register_forward_hook(lambda m, i, o: seen.__setitem__(0, seen[0] + i[0].shape[0]))
    return seen


def assert_same(s, kids, data, pre, hp_overrides=None, **kw):
    alone = models_of(s, kids)
    together = models_of(s, kids)
    first = s.store[s.root_path.components[0]].module
    seen = count_images(first)
    ref = [train(m, p, data.train, data.validation, path.hparams, pre=pre, **SETTINGS) for (m, p, _), (path, _) in zip(alone, kids)]
    seen_alone, seen[0] = seen[0], 0
    got = train_generation([m for m, _, _ in together], [p for _, p, _ in together], data.train, data.validation,
                           [path.hparams for path, _ in kids], pre=pre, **SETTINGS, **kw)
    for r, g in zip(ref, got):
        assert g.curve == r.curve and g.best_step == r.best_step and g.val_accuracy == r.val_accuracy
    for (_, _, a), (_, _, b) in zip(alone, together):  # bit for bit: the same kernels on the same batches
        for cid in a:
            for (k, x), y in zip(a[cid].module.state_dict().items(), b[cid].module.state_dict().values()):
                assert y.is_contiguous(), k
                assert torch.equal(y, x), k
    # training moved every child: the comparison is not between untrained copies
    for (_, _, trained), (_, fresh) in zip(alone, kids):
        assert any(not torch.equal(p, q) for cid in fresh for p, q in zip(trained[cid].module.parameters(), fresh[cid].module.parameters()))
    return seen_alone, seen[0]


def test_prefix_trie_shares_common_frozen_prefixes(tiny_root):
    s, kids = generation(tiny_root, [dict(), dict(adapters=(2,)), dict(clones=("blocks.1",)), dict(clones=("patch_embed",))])
    models = [PathModel.from_store(s.store, p, f) for p, f in kids]
    top, ends, lengths = prefix_trie(models)
    assert lengths == [6, 5, 4, 0]  # patch_embed cls pos blocks.0 blocks.1 blocks.2 | adapter | clone | clone
    assert ends[3] is top and ends[1] is ends[0].parent and ends[2] is ends[1].parent
    assert len(top.children) == 1  # one patch_embed node for the three children that share it


def test_cached_generation_equals_training_alone(tiny_root):
    """No augmentation: frozen prefixes run once per image (training split, 2 epochs) and once
    for all validations, shared by the children."""
    data = synthetic_task("a", 4, 1)
    s, kids = generation(tiny_root, [dict(), dict(adapters=(2,)), dict(clones=("blocks.1",)), dict(clones=("patch_embed",))])
    alone, together = assert_same(s, kids, data, tiny_root.preprocessing.at(32))
    n_train, n_val, steps_images = len(data.train), len(data.validation), SETTINGS["steps"] * SETTINGS["batch_size"]
    assert alone == 3 * (steps_images + 3 * n_val)  # three children run the root's patch_embed, each alone
    assert together == n_train + n_val


def test_generation_without_room_to_cache_still_shares(tiny_root):
    data = synthetic_task("a", 4, 1)
    s, kids = generation(tiny_root, [dict(), dict(adapters=(1,))])
    _, together = assert_same(s, kids, data, tiny_root.preprocessing.at(32), cache_bytes=0)
    assert together == SETTINGS["steps"] * SETTINGS["batch_size"] + 3 * len(data.validation)


def test_augmented_generation_equals_training_alone(tiny_root):
    """Random crops, flips and jitter: the shared batch is augmented once per step (the same
    draws every child's own run makes), its frozen prefixes run once per step, not cached."""
    data = synthetic_task("a", 4, 2)
    aug = dict(crop_area_min=0.6, aspect_ratio_min=0.75, flip=True, color_jitter=0.2)
    s, kids = generation(tiny_root, [dict(), dict(clones=("blocks.2",)), dict(adapters=(0,))], aug)
    _, together = assert_same(s, kids, data, tiny_root.preprocessing.at(32))
    assert together == SETTINGS["steps"] * SETTINGS["batch_size"] + len(data.validation)


def test_conv_root_generation_channels_last_equals_training_alone():
    root = tiny_conv_root()
    data = synthetic_task("a", 4, 3)
    s, kids = generation(root, [dict(), dict(clones=("blocks.1.0",)), dict(adapters=(2,)), dict(clones=("bn1",))])
    alone, together = assert_same(s, kids, data, root.preprocessing.at(32), channels_last=True)
    assert together < alone / 3
    for comp in s.store.components.values():  # the store's tensors are back in their usual layout
        assert all(t.is_contiguous() for t in comp.module.state_dict().values())


def test_children_must_share_their_data_keys(tiny_root):
    data = synthetic_task("a", 4, 1)
    s, kids = generation(tiny_root, [dict(), dict()])
    kids[1][0].hparams["flip"] = True
    models = models_of(s, kids)
    with pytest.raises(ValueError, match="data keys"):
        train_generation([m for m, _, _ in models], [p for _, p, _ in models], data.train, data.validation,
                         [p.hparams for p, _ in kids], pre=tiny_root.preprocessing.at(32), **SETTINGS)


def test_auto_precision_is_fp32_on_the_cpu():
    """bf16 autocast measured slower than fp32 on the CPU even channels-last with native bf16
    (generation.md), so ``auto`` there is fp32; ``bf16`` still autocasts when asked."""
    from mutask.evolve import train as T

    cpu = torch.device("cpu")
    assert T.autocast_dtype("auto", cpu, channels_last=True) is None and T.autocast_dtype("auto", cpu) is None
    assert T.autocast_dtype("fp32", cpu, channels_last=True) is None
    assert T.autocast_dtype("bf16", cpu) == torch.bfloat16
