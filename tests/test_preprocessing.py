"""The root's own preprocessing: the contract's formula, roots recording theirs (timm's data
config, ``mutask pretrain``, STATEs without a record), training's jitter range, and one root
with ImageNet mean/std and bicubic resizing carried through evolution, export, ONNX Runtime and
HTTP to the same logits."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from mutask.errors import MutaskError
from mutask.evolve.roots.base import preprocessing_record
from mutask.evolve.train import value_range
from mutask.preprocessing import Preprocessing, resize_rgb, to_rgb_array
from tests.conftest import TINY_SPEC, synthetic_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_BICUBIC = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": "bicubic"}


def imagenet(size: int) -> Preprocessing:
    return Preprocessing(image_size=size, **IMAGENET_BICUBIC)


def every_pixel_value() -> np.ndarray:
    """uint8 (1, 16, 16, 3): each of the 256 values once per channel, channels in different orders."""
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return np.stack([v, v[::-1], v.T], axis=-1)[None]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# ---- the contract ---------------------------------------------------------------------------


def test_mean_std_half_bilinear_is_x_over_127_5_minus_1_bit_for_bit():
    x = every_pixel_value()
    got = Preprocessing.signed_unit(16).normalize(x)
    want = np.ascontiguousarray((x.astype(np.float32) * np.float32(1.0 / 127.5) + np.float32(-1.0)).transpose(0, 3, 1, 2))
    assert got.dtype == np.float32 and got.shape == (1, 3, 16, 16) and got.flags["C_CONTIGUOUS"]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # the same bits, -0.0 and all
    assert got.min() == -1.0 and got.max() == 1.0
    assert value_range(Preprocessing.signed_unit(16)) == ((-1.0,) * 3, (1.0,) * 3)


def test_per_channel_mean_and_std():
    x = every_pixel_value()
    pre = Preprocessing(image_size=16, resize="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    got = pre.normalize(x)
    want = ((x.astype(np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(0, 3, 1, 2)
    assert np.abs(got - want).max() < 2e-6
    low, high = value_range(pre)
    for c in range(3):  # channel c is normalised with mean[c] and std[c], not another channel's
        assert got[0, c].min() == pytest.approx(low[c], abs=1e-6) and got[0, c].max() == pytest.approx(high[c], abs=1e-6)
        assert low[c] == pytest.approx(-CLIP_MEAN[c] / CLIP_STD[c]) and high[c] == pytest.approx((1 - CLIP_MEAN[c]) / CLIP_STD[c])


def test_image_resizes_with_the_filter_and_at_keeps_everything_but_the_size():
    pixels = (np.random.default_rng(0).random((37, 45, 3)) * 255).astype(np.uint8)
    img = Image.open(io.BytesIO(png(pixels)))
    pre = imagenet(32)
    want = pre.normalize(np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC))[None])
    assert np.array_equal(pre.image(img), want)
    assert np.array_equal(resize_rgb(pixels, 32, resize="bicubic"), resize_rgb(pixels, 32, "bicubic"))
    assert not np.array_equal(resize_rgb(pixels, 32, resize="bicubic"), resize_rgb(pixels, 32, resize="bilinear"))
    at = pre.at(48)
    assert at.image_size == 48 and (at.mean, at.std, at.resize) == (pre.mean, pre.std, pre.resize)
    assert preprocessing_record(pre) == IMAGENET_BICUBIC
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        pre.normalize(pixels)


@pytest.mark.parametrize("bad", [
    {"std": (0.5, 0.0, 0.5)},            # division by zero
    {"mean": (0.5, 1.5, 0.5)},           # not in [0, 1] pixel units
    {"mean": (0.5, 0.5)},                # not 3 channels
    {"resize": "nearest"},
    {"std": (0.5, float("nan"), 0.5)},
])
def test_invalid_preprocessing_is_refused(bad):
    with pytest.raises(ValidationError):
        Preprocessing(**dict(IMAGENET_BICUBIC, image_size=32, **bad))
    with pytest.raises(ValidationError):  # no silent default normalisation
        Preprocessing(image_size=32)


# ---- roots record theirs ----------------------------------------------------------------------


@pytest.mark.parametrize("name, mean, std, resize", [
    ("deit_tiny_patch16_224", IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    ("vit_tiny_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),  # augreg: 0.5, but bicubic
])
def test_timm_root_takes_timm_data_config(name, mean, std, resize):
    from mutask.evolve.roots import load_root

    root = load_root(f"timm:{name}")  # the config comes with the architecture: no network
    assert root.preprocessing == Preprocessing(image_size=224, mean=mean, std=std, resize=resize)
    assert root.spec["preprocessing"] == {"mean": list(mean), "std": list(std), "resize": resize}  # a STATE keeps it
    assert root.preprocessing.at(96).image_size == 96


def test_timm_config_clip_and_unsupported_interpolation():
    from timm.models.vision_transformer import VisionTransformer

    from mutask.evolve.roots import timm_preprocessing

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)
    vit.pretrained_cfg = {"interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD}
    assert timm_preprocessing(vit, "timm:clip-like") == {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "resize": "bicubic"}
    vit.pretrained_cfg = {"interpolation": "nearest", "mean": CLIP_MEAN, "std": CLIP_STD}
    with pytest.raises(MutaskError, match="timm:odd.*'nearest'.*bilinear or bicubic only.*Pick a root"):
        timm_preprocessing(vit, "timm:odd")


def test_root_directories_and_their_records(tmp_path):
    from mutask.evolve.roots import build_model, load_root_dir, save_root_dir

    vit = build_model(TINY_SPEC)
    save_root_dir(vit, dict(TINY_SPEC, preprocessing=IMAGENET_BICUBIC), tmp_path / "imagenet")
    assert load_root_dir(tmp_path / "imagenet").preprocessing == imagenet(32)
    save_root_dir(vit, dict(TINY_SPEC, preprocessing=preprocessing_record(Preprocessing.signed_unit(32))), tmp_path / "pretrained")
    assert json.loads((tmp_path / "pretrained" / "config.json").read_text())["preprocessing"] == {
        "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "bilinear"}
    assert load_root_dir(tmp_path / "pretrained").preprocessing == Preprocessing.signed_unit(32)
    save_root_dir(vit, TINY_SPEC, tmp_path / "unrecorded")  # a root written before roots recorded it
    assert load_root_dir(tmp_path / "unrecorded").preprocessing == Preprocessing.signed_unit(32)
    save_root_dir(vit, dict(TINY_SPEC, preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3, "resize": "lanczos"}), tmp_path / "bad")
    with pytest.raises(MutaskError, match="preprocessing record .* is invalid.*re-create the root"):
        load_root_dir(tmp_path / "bad")


def test_pretrain_records_its_preprocessing(monkeypatch, tmp_path):
    """`mutask pretrain` writes mean = std = 0.5, bilinear into config.json (a 1-step run)."""
    from mutask.evolve import pretrain as P
    from mutask.evolve.roots import load_root_dir

    monkeypatch.setitem(P.BUDGETS, "tiny", {"steps": 1, "batch_size": 4, "lr": 1e-3})
    monkeypatch.setattr("mutask.evolve.tasks.load_task", lambda spec, seed=0: synthetic_task("symbols", 4, seed, n_train=8, n_eval=8))
    P.pretrain(tmp_path / "root", budget="tiny", show_progress=False)
    doc = json.loads((tmp_path / "root" / "config.json").read_text())
    assert doc["preprocessing"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "resize": "bilinear"}
    assert load_root_dir(tmp_path / "root").preprocessing == Preprocessing.signed_unit(P.ARCH["img_size"])


# ---- training ---------------------------------------------------------------------------------


def test_color_jitter_clamps_to_the_roots_range_per_channel():
    from mutask.evolve.train import augment

    hp = {"crop_area_min": 1.0, "aspect_ratio_min": 1.0, "flip": False, "color_jitter": 0.9}
    pixels = np.random.default_rng(1).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    pixels[:8] = 0  # images at the range's ends: jitter pushes them out, the clamp brings them back
    pixels[8:16] = 255
    pre = imagenet(16)
    out = augment(torch.from_numpy(pre.normalize(pixels)), hp, torch.Generator().manual_seed(0), pre)
    low, high = value_range(pre)
    for c in range(3):
        assert out[:, c].min().item() == pytest.approx(low[c], abs=1e-5) and out[:, c].max().item() == pytest.approx(high[c], abs=1e-5)
    assert out[:, 0].min().item() < -2.0  # (0 - 0.485) / 0.229: a [-1, 1] clamp would cut it
    # mean = std = 0.5: the same numbers as jitter on [-1, 1] values clamped to [-1, 1]
    half = Preprocessing.signed_unit(16)
    x = torch.from_numpy(half.normalize(pixels))
    got = augment(x, hp, torch.Generator().manual_seed(0), half)
    g = torch.Generator().manual_seed(0)
    torch.rand(64, 6, generator=g)  # augment draws its geometry first
    v = torch.rand(64, 2, generator=g)
    b, k = ((2 * v[:, 0] - 1) * 0.9).view(-1, 1, 1, 1), (1 + (2 * v[:, 1] - 1) * 0.9).view(-1, 1, 1, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(got, ((x - m) * k + m + b).clamp(-1, 1))


# ---- one ImageNet / bicubic root end to end -----------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_system(tmp_path_factory):
    """A tiny ViT root whose spec records ImageNet mean/std and bicubic resizing, evolved for one
    task (6 classes), saved, loaded back from the STATE and exported."""
    from dataclasses import asdict

    from mutask.evolve.evolution import Evolution, EvolveConfig
    from mutask.evolve.roots import build_model, root_for
    from mutask.evolve.state import System
    from mutask.export.build import export_system

    base = tmp_path_factory.mktemp("imagenet-root")
    torch.manual_seed(0)
    spec = dict(TINY_SPEC, preprocessing=IMAGENET_BICUBIC)
    root = root_for(spec, build_model(spec), "imagenet-bicubic-root")
    data = {"t": synthetic_task("t", 6, 7)}
    s = System.new(root, seed=0)
    s.config["evolve"] = asdict(EvolveConfig(rounds=1, children=2, generation_size=2, steps=3, validations=1, batch_size=16))
    s.config["order"] = ["t"]
    s.tasks["t"] = {"spec": "t", "seed": 0, "num_classes": 6}
    Evolution(s, data, base / "st", show_progress=False).run(["t"])
    loaded = System.load(base / "st")
    art = export_system(loaded, base / "art", data=data, show_progress=False)
    return loaded, data, base / "st", art


def test_imagenet_root_gives_the_same_logits_in_evolve_onnx_and_http(imagenet_system, monkeypatch):
    import onnxruntime as ort
    from starlette.testclient import TestClient

    from mutask.evolve.data import Split
    from mutask.evolve.model import PathModel
    from mutask.evolve.train import predict
    from mutask.export.artifact import load_artifact
    from tests.test_serving import _APP

    s, _, _, art_dir = imagenet_system
    p = s.best_path("t")
    size = p.image_size
    pre = s.root.preprocessing.at(size)
    assert pre == imagenet(size)  # it survived the STATE
    art = load_artifact(art_dir)
    entry = art.tasks["t"]
    assert entry.preprocessing == pre and art.manifest.parity.tasks["t"].ok
    written = json.loads((art_dir / "manifest.json").read_text())["tasks"]["t"]["preprocessing"]
    assert (written["mean"], written["std"], written["resize"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD), "bicubic")

    pixels = (np.random.default_rng(5).random((37, 45, 3)) * 255).astype(np.uint8)  # not S x S: the filter counts
    upload = png(pixels)
    image = Image.open(io.BytesIO(upload))
    x = entry.preprocessing.image(image)
    for other in (Preprocessing.signed_unit(size), Preprocessing(**dict(pre.model_dump(), resize="bilinear"))):
        assert np.abs(other.image(image) - x).max() > 0.05  # ignoring the mean/std, or the filter, changes the input

    # evolve's evaluation: predict() on a split holding the image, and the PathModel on x
    model = PathModel.from_store(s.store, p).cpu().eval()  # compared with CPU tensors below (and ONNX Runtime on the CPU)
    ref = predict(model, Split([to_rgb_array(image)], np.zeros(1, np.int64)), pre)
    with torch.no_grad():
        assert np.array_equal(model(torch.from_numpy(x)).numpy(), ref)
        far = model(torch.from_numpy(Preprocessing.signed_unit(size).image(image))).numpy()
    probs = softmax(ref[0])
    assert np.abs(softmax(far[0]) - probs).max() > 1e-3  # the 0.5 / bilinear input gives other scores

    # ONNX Runtime: the task graph on the manifest's preprocessing
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(art.graph_path("t")), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x})[0]
    assert np.abs(got - ref).max() <= 1e-4

    # HTTP: the in-process BentoML service on the artifact
    monkeypatch.setenv("MUTASK_ARTIFACT", str(art_dir))
    from mutask.serving.service import Mutask

    if "app" not in _APP:  # BentoML registers its metrics per ASGI app: one per process
        _APP["app"] = Mutask.to_asgi()
    with TestClient(_APP["app"]) as client:
        r = client.post("/predict", data={"task": "t"}, files={"image": ("x.png", upload, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    top5 = [entry.labels[j] for j in np.argsort(-probs, kind="stable")[:5]]
    assert body["index"] == int(ref.argmax()) and list(body["scores"]) == top5
    for label, score in body["scores"].items():
        assert abs(score - probs[entry.labels.index(label)]) < 1e-4


def test_state_without_a_preprocessing_record_loads_as_half_bilinear(imagenet_system, tmp_path):
    from mutask.evolve.state import STATE_FILE, System

    _, _, state, _ = imagenet_system
    old = shutil.copytree(state, tmp_path / "old")
    doc = json.loads((old / STATE_FILE).read_text())
    del doc["root"]["spec"]["preprocessing"]
    (old / STATE_FILE).write_text(json.dumps(doc))
    assert System.load(old).root.preprocessing == Preprocessing.signed_unit(32)


def test_version_3_artifact_is_refused_with_the_reexport_command(imagenet_system, tmp_path):
    from mutask.export.artifact import ArtifactError, load_artifact
    from mutask.export.manifest import content_digest

    _, _, _, art = imagenet_system
    d = shutil.copytree(art, tmp_path / "v3")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 3
    for t in m["tasks"].values():  # version 3's record: a fixed scale and offset
        t["preprocessing"] = {"mode": "RGB", "exif_transpose": True, "resize": "bilinear", "scale": 1 / 127.5, "offset": -1.0,
                              "layout": "NCHW", "image_size": t["image_size"]}
    m["manifest_sha256"] = content_digest(dict(m, manifest_sha256=""))
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version 3.*reads version 4") as e:
        load_artifact(d)
    assert f"`mutask export STATE --out {d} --force`" in str(e.value)


def test_model_input_equals_the_contracts_normalize_bit_for_bit():
    """Training normalises on the model's device (torch); the contract's numpy normalize is
    what evaluation, export parity and the server run: the two give the same float32 bits."""
    from mutask.evolve.train import model_input

    pixels = np.random.default_rng(0).integers(0, 256, (4, 9, 9, 3), dtype=np.uint8)
    for pre in (Preprocessing.signed_unit(9), Preprocessing(resize="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=9)):
        want = pre.normalize(pixels)
        got = model_input(pixels, pre).numpy()
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
