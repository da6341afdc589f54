"""Shared by the serving tests: a tiny real artifact (evolved and exported once per session),
test images, references from a plain onnxruntime run, and a real server subprocess."""

from __future__ import annotations

import base64
import io
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = dict(rounds=1, children=2, generation_size=2, steps=3, validations=1, batch_size=16)
_CACHE: dict = {}


def build_artifact(tmp: Path) -> Path:
    """Three tiny tasks evolved from the tiny root (b and c start from a's best path, so they
    share its frozen prefix: the export has a shared segment), plus task d: a's path with its
    own patch_embed (it joins a's components after a different first step, so a segment has
    two parents), exported with export_system."""
    from mutask.evolve.evolution import EvolveConfig, Evolution
    from mutask.evolve.state import System
    from mutask.export.build import export_system
    from tests.conftest import add_task, make_root, synthetic_task

    data = {"a": synthetic_task("a", 4, 1), "b": synthetic_task("b", 3, 2), "c": synthetic_task("c", 5, 3)}
    s = System.new(make_root(), seed=0)
    s.config["evolve"] = asdict(EvolveConfig(**TINY))
    s.config["order"] = list(data)
    s.tasks.update({t: {"spec": t, "seed": 0, "num_classes": data[t].num_classes} for t in data})
    Evolution(s, data, tmp / "state", show_progress=False).run(list(data))
    pa = s.best_path("a")
    add_task(s, "d", pa.components[:-1], dict(pa.hparams), 3, seed=4, own=("patch_embed",))
    data["d"] = synthetic_task("d", 3, 4)
    s.config["order"].append("d")
    return export_system(s, tmp / "art", data=data, show_progress=False)


@pytest.fixture(scope="session")
def serving_artifact(tmp_path_factory) -> Path:
    """The artifact, built once per session (even when several test modules ask for it)."""
    if "artifact" not in _CACHE:
        base = tmp_path_factory.mktemp("serving-artifact")
        old = os.environ.get("MUTASK_CACHE")
        os.environ["MUTASK_CACHE"] = str(base / "cache")
        try:
            _CACHE["artifact"] = build_artifact(base)
        finally:
            if old is None:
                os.environ.pop("MUTASK_CACHE", None)
            else:
                os.environ["MUTASK_CACHE"] = old
    return _CACHE["artifact"]


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def error_of(r) -> str:
    """The message of an error answer (BentoML answers its errors as a one-element JSON list)."""
    body = r.json()
    return (body[0] if isinstance(body, list) else body)["error"]


# ---- images -------------------------------------------------------------------------------


def encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def sample_images() -> dict[str, bytes]:
    """Images of various sizes, modes and formats, named by what they are."""
    from PIL import Image

    rng = np.random.default_rng(7)
    rgb = Image.fromarray((rng.random((45, 61, 3)) * 255).astype(np.uint8))
    band = np.zeros((32, 32, 3), np.uint8)
    band[10:14] = 240
    out = {
        "rgb32-png": encode(Image.fromarray(band), "PNG"),  # already S x S: no resize
        "rgb45x61-png": encode(rgb, "PNG"),
        "rgb-jpeg": encode(rgb, "JPEG", quality=90),
        "large-jpeg": encode(rgb.resize((300, 200)), "JPEG"),
        "tiny3x2-png": encode(rgb.resize((3, 2)), "PNG"),
        "L-png": encode(rgb.convert("L"), "PNG"),
        "L-jpeg": encode(rgb.convert("L"), "JPEG"),
        "P-png": encode(rgb.convert("P"), "PNG"),
        "P-gif": encode(rgb.convert("P"), "GIF"),
        "RGBA-png": encode(rgb.convert("RGBA"), "PNG"),
        "LA-png": encode(rgb.convert("LA"), "PNG"),
        "1-png": encode(rgb.convert("1"), "PNG"),
        "CMYK-jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "I16-png": encode(rgb.convert("L").convert("I;16"), "PNG"),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgb, "TIFF"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    out["exif-rotated-jpeg"] = encode(rgb, "JPEG", exif=exif)
    try:
        out["webp"] = encode(rgb, "WEBP")
    except (KeyError, OSError):
        pass
    return out


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid small PNG whose header claims width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    from PIL import Image

    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    # IHDR chunk: length(4) "IHDR"(4) width(4) height(4) ... crc(4), right after the 8-byte signature
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- references ---------------------------------------------------------------------------


def evolve_input(data: bytes, pre) -> np.ndarray:
    """What evaluation feeds a task whose preprocessing is ``pre`` (mutask.evolve.data's
    resizing, then ``pre``'s normalisation)."""
    from PIL import Image

    from mutask.evolve.data import Split
    from mutask.preprocessing import to_rgb_array

    split = Split([to_rgb_array(Image.open(io.BytesIO(data)))], np.zeros(1, np.int64))  # as evolve's folder loader keeps it
    return pre.normalize(split.resized(pre.image_size, resize=pre.resize))


def reference_logits(artifact: Path, task: str, data: bytes) -> np.ndarray:
    """A plain onnxruntime run of the task's per-task graph on evaluation's preprocessing."""
    import onnxruntime as ort

    from mutask.export.artifact import load_artifact

    art = load_artifact(artifact, verify=False)
    key = (str(artifact), task)
    if key not in _CACHE:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:  # this process may already run ONNX Runtime's global pools (it never does in tests)
            _CACHE[key] = ort.InferenceSession(str(art.graph_path(task)), so, providers=["CPUExecutionProvider"])
        except Exception:
            so.use_per_session_threads = False
            _CACHE[key] = ort.InferenceSession(str(art.graph_path(task)), so, providers=["CPUExecutionProvider"])
    x = evolve_input(data, art.tasks[task].preprocessing)
    return _CACHE[key].run(None, {"image": x})[0][0]


# ---- a real server ------------------------------------------------------------------------


from mutask.server_process import free_port  # noqa: E402,F401  (re-exported for the tests)


def subprocess_env(extra: dict | None = None) -> dict:
    """The environment for a child: BentoML home and Prometheus dir in temp dirs, no tracking."""
    env = dict(os.environ)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in (extra or {}).items()})
    for k in ("BENTOML_HOME", "PROMETHEUS_MULTIPROC_DIR"):
        assert env.get(k), f"{k} must be set (conftest does it, or pass it)"
    return env


def Server(artifact: Path, log_path: Path, env: dict | None = None):
    """``mutask serve ART`` as a subprocess (mutask.server_process.ServerProcess) with the test environment."""
    from mutask.server_process import ServerProcess

    return ServerProcess(artifact, log_path=log_path, env=subprocess_env(env))


# ---- the bad-input battery ----------------------------------------------------------------


def bad_inputs(good_png: bytes, limit_bytes: int | None = None) -> list:
    """(name, method, path, request kwargs, expected status, text the error must contain).
    With ``limit_bytes`` (the server's MUTASK_MAX_IMAGE_BYTES) an over-size image is included."""
    from PIL import Image

    jpeg = encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    cases = [
        ("unknown task", "POST", "/predict", dict(data={"task": "nope"}, files={"image": ("x.png", good_png, "image/png")}), 404, "valid tasks: a, b, c"),
        ("numeric task", "POST", "/predict", dict(data={"task": "7"}, files={"image": ("x.png", good_png, "image/png")}), 404, "'7'"),
        ("missing task", "POST", "/predict", dict(files={"image": ("x.png", good_png, "image/png")}), 400, "missing field `task`"),
        ("missing image", "POST", "/predict", dict(data={"task": "a"}), 400, "missing field `image`"),
        ("image as text", "POST", "/predict", dict(data={"task": "a", "image": "http://127.0.0.1:1/x.png"}, files={"other": ("o", b"x")}), 400, "file upload"),
        ("two images", "POST", "/predict", dict(data={"task": "a"}, files=[("image", ("x.png", good_png)), ("image", ("y.png", good_png))]), 400, "one image"),
        ("not an image", "POST", "/predict", dict(data={"task": "a"}, files={"image": ("x.txt", b"hello, not an image", "text/plain")}), 400, "not an image"),
        ("empty image", "POST", "/predict", dict(data={"task": "a"}, files={"image": ("x.png", b"", "image/png")}), 400, "empty"),
        ("truncated png", "POST", "/predict", dict(data={"task": "b"}, files={"image": ("x.png", good_png[: len(good_png) // 2], "image/png")}), 400, "image"),
        ("truncated jpeg", "POST", "/predict", dict(data={"task": "c"}, files={"image": ("x.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}), 400, "truncated"),
        ("bomb png", "POST", "/predict", dict(data={"task": "a"}, files={"image": ("x.png", png_bomb(), "image/png")}), 400, "pixels"),
        ("empty body", "POST", "/predict", dict(content=b""), 400, "empty body"),
        ("json to /predict", "POST", "/predict", dict(json={"task": "a", "image": "x"}), 400, "multipart/form-data"),
        ("malformed multipart", "POST", "/predict", dict(content=b"--zz\r\nContent-Disposition: form-data; name=\"task\"\r\n\r\na", headers={"content-type": "multipart/form-data; boundary=zz"}), 400, "multipart/form-data"),
        ("multipart no boundary", "POST", "/predict", dict(content=b"garbage", headers={"content-type": "multipart/form-data"}), 400, "multipart"),
        ("batch unknown task", "POST", "/predict_batch", dict(json={"task": "nope", "images": [b64(good_png)]}), 404, "valid tasks"),
        ("batch empty list", "POST", "/predict_batch", dict(json={"task": "a", "images": []}), 400, "empty"),
        ("batch bad base64", "POST", "/predict_batch", dict(json={"task": "a", "images": ["%%%not base64"]}), 400, "base64"),
        ("batch not an image", "POST", "/predict_batch", dict(json={"task": "a", "images": [b64(good_png), b64(b"nope")]}), 400, "not an image"),
        ("batch too many", "POST", "/predict_batch", dict(json={"task": "a", "images": [b64(good_png)] * 65}), 400, "limit"),
        ("batch invalid json", "POST", "/predict_batch", dict(content=b"{not json", headers={"content-type": "application/json"}), 400, None),
        ("batch wrong types", "POST", "/predict_batch", dict(json={"task": "a", "images": "abc"}), 400, None),
        ("batch missing images", "POST", "/predict_batch", dict(json={"task": "a"}), 400, None),
        ("batch empty body", "POST", "/predict_batch", dict(content=b"", headers={"content-type": "application/json"}), 400, "empty body"),
        ("batch as multipart", "POST", "/predict_batch", dict(data={"task": "a"}, files={"images": ("x.png", good_png)}), 400, "application/json"),
        ("tasks as multipart", "POST", "/tasks", dict(content=b"--zz--", headers={"content-type": "multipart/form-data; boundary=zz"}), 400, "application/json"),
        ("GET /predict", "GET", "/predict", {}, 405, None),
    ]
    if limit_bytes is not None:
        big = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)), "PNG")
        assert len(big) > limit_bytes, (len(big), limit_bytes)
        cases.append(("over the size limit", "POST", "/predict", dict(data={"task": "a"}, files={"image": ("x.png", big, "image/png")}), 400, "limit"))
        cases.append(("batch image over the limit", "POST", "/predict_batch", dict(json={"task": "a", "images": [b64(big)]}), 400, "limit"))
    return cases


def check_battery(client, good_png: bytes, limit_bytes: int | None = None) -> None:
    """Send every bad input with ``client`` (httpx.Client or starlette's TestClient): the
    expected 4xx with a clear JSON error, never a 500; the service still answers after."""
    failures = []
    for name, method, path, kw, status, text in bad_inputs(good_png, limit_bytes):
        r = client.request(method, path, **kw)
        if r.status_code != status:
            failures.append(f"{name}: {r.status_code} (want {status}): {r.text[:300]}")
            continue
        if status == 405:
            continue
        body = r.json()
        if isinstance(body, list):  # BentoML's own 4xx answers are a one-element list
            body = body[0]
        msg = str(body.get("error", "")) + " " + str(body.get("detail", ""))
        if text is not None and text not in msg:
            failures.append(f"{name}: message {msg!r} lacks {text!r}")
    # odd but valid: file names BentoML's temporary file would choke on, an extra field, no content type
    for filename in ("a" * 300 + ".png", "ü" * 200, "../../etc/passwd", "x\x00y.png", "dir/" * 80 + "z.png"):
        r = client.post("/predict", data={"task": "b"}, files={"image": (filename, good_png, "image/png")})
        if r.status_code != 200:
            failures.append(f"file name {filename[:20]!r}: {r.status_code}: {r.text[:200]}")
    r = client.post("/predict", data={"task": "c", "extra": "1"}, files={"image": ("x", good_png, "application/x-whatever")})
    if r.status_code != 200:
        failures.append(f"extra field: {r.status_code}: {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert client.get("/livez").status_code == 200
    r = client.post("/predict", data={"task": "a"}, files={"image": ("x.png", good_png, "image/png")})
    assert r.status_code == 200, r.text
