"""Serving in-process: preprocessing bit-for-bit with evaluation, execution providers, the
BentoML service through starlette's TestClient, the bad-input battery, no torch, and refusing
bad artifacts (CLI and `bentoml serve`). The engine and its batcher: tests/test_engine.py."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import sys
import textwrap
from pathlib import Path
import time

import numpy as np
import pytest

from tests.test_serving_helpers import (
    REPO, check_battery, copy_artifact, error_of, evolve_input, free_port, png_bomb, reference_logits,
    sample_images, serving_artifact, subprocess_env,
)

__all__ = ["serving_artifact"]  # the session fixture, imported for pytest
_APP: dict = {}


# ---- preprocessing ------------------------------------------------------------------------


def preprocess_bytes(data: bytes, size: int):
    from mutask.preprocessing import Preprocessing
    from mutask.serving.images import preprocess_for

    return preprocess_for(data, [Preprocessing.signed_unit(size)], max_bytes=10_000_000, max_pixels=40_000_000)[0]


def test_preprocess_matches_evaluation_bit_for_bit():
    from mutask.preprocessing import Preprocessing

    images = sample_images()
    assert len(images) >= 15
    for name, data in images.items():
        for size in (32, 24, 57):
            want = evolve_input(data, Preprocessing.signed_unit(size))
            got = preprocess_bytes(data, size)
            assert got.dtype == np.float32 and got.shape == (1, 3, size, size), name
            assert got.flags["C_CONTIGUOUS"]
            assert np.array_equal(got, want), f"{name} at {size}: max diff {np.abs(got - want).max()}"
            assert got.min() >= -1.0 and got.max() <= 1.0


def test_preprocess_applies_exif_orientation():
    from PIL import Image

    from tests.test_serving_helpers import encode

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW: the blue half goes to the top
    x = preprocess_bytes(encode(img, "PNG", exif=exif), 20)
    assert x[0, 2, 2, 10] > 0.9 and x[0, 0, 2, 10] < -0.9  # top: blue
    assert x[0, 0, 17, 10] > 0.9  # bottom: red


def test_preprocess_rejects_bad_bytes_with_clear_messages():
    from PIL import Image

    from mutask.preprocessing import Preprocessing
    from mutask.serving.images import ImageError, preprocess_for
    from tests.test_serving_helpers import encode

    def decode(data, max_bytes=10_000_000, max_pixels=40_000_000):
        return preprocess_for(data, [Preprocessing.signed_unit(8)], max_bytes=max_bytes, max_pixels=max_pixels)

    png = encode(Image.new("RGB", (50, 50), (1, 2, 3)), "PNG")
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    cases = {
        b"": "empty",
        b"not an image at all": "not an image",
        png[:40]: "not an image Pillow can read|truncated|could not be decoded",
        jpeg[: len(jpeg) // 2]: "truncated",
        png_bomb(): "pixels",
        png_bomb(1 << 20, 1 << 20): "too large to decode safely|MUTASK_MAX_IMAGE_PIXELS",  # past Image.MAX_IMAGE_PIXELS
    }
    for data, text in cases.items():
        with pytest.raises(ImageError, match=text):
            decode(data)
    with pytest.raises(ImageError, match="over the limit of 100 bytes"):
        decode(png, max_bytes=100)
    with pytest.raises(ImageError, match="MUTASK_MAX_IMAGE_PIXELS"):
        decode(png, max_pixels=100)


# ---- the engine's providers and sources ------------------------------------------------


def test_providers_choice_and_cpu_fallback(serving_artifact, monkeypatch):
    import onnxruntime as ort

    from mutask.export.artifact import load_artifact
    from mutask.serving import engine as eng

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(eng, "gpu_present", lambda: True)
    assert eng.choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert eng.choose_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(eng, "gpu_present", lambda: False)
    assert eng.choose_providers("auto") == ["CPUExecutionProvider"]
    assert eng.choose_providers("cuda")[0] == "CUDAExecutionProvider"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert eng.choose_providers("cuda") == ["CPUExecutionProvider"]
    with pytest.raises(eng.EngineError, match="unknown device"):
        eng.choose_providers("tpu")
    monkeypatch.undo()
    # asking for CUDA where it cannot run (no GPU, or no CUDA libraries) falls back to CPU
    served = eng.Engine(load_artifact(serving_artifact), device="cuda", threads=1)
    assert served.ready
    if not eng.gpu_present():
        assert served.device == "cpu" and served.active_providers == ["CPUExecutionProvider"]


def test_artifact_from_a_bentoml_model(serving_artifact, monkeypatch):
    import shutil

    import bentoml

    from mutask.serving.repository import open_artifact

    with bentoml.models.create("mutask-serving-test") as model:
        for f in serving_artifact.iterdir():
            shutil.copy2(f, model.path + "/" + f.name)
    monkeypatch.delenv("MUTASK_ARTIFACT", raising=False)
    monkeypatch.setenv("MUTASK_BENTOML_MODEL", str(model.tag))
    art = open_artifact()
    assert set(art.tasks) == {"a", "b", "c", "d"} and str(art.path).startswith(str(bentoml.models.get(model.tag).path))
    monkeypatch.setenv("MUTASK_BENTOML_MODEL", "no-such-model:v1")
    from mutask.serving.repository import ServingError

    with pytest.raises(ServingError, match="no such BentoML model"):
        open_artifact()


def test_settings_come_from_the_environment(monkeypatch):
    from mutask.serving.cli import settings_env
    from mutask.serving.settings import Settings, SettingsError

    monkeypatch.setenv("MUTASK_MAX_BATCH", "8")
    monkeypatch.setenv("MUTASK_ACCESS_LOG", "1")
    s = Settings.from_env(max_wait_ms=3.0, device=None)
    assert (s.max_batch, s.access_log, s.tracing, s.max_wait_ms, s.device) == (8, True, False, 3.0, "auto")
    for k, v in settings_env(s).items():
        monkeypatch.setenv(k, v)
    assert Settings.from_env() == s
    for name, value in (("MUTASK_DEVICE", "gpu"), ("MUTASK_MAX_BATCH", "0"), ("MUTASK_KEEP_ALIVE_S", "soon")):
        monkeypatch.setenv(name, value)
        with pytest.raises(SettingsError, match=name):
            Settings.from_env()
        monkeypatch.setenv(name, settings_env(s)[name])


# ---- the service in-process ---------------------------------------------------------------


@pytest.fixture()
def client(serving_artifact, monkeypatch):
    monkeypatch.setenv("MUTASK_ARTIFACT", str(serving_artifact))
    monkeypatch.setenv("MUTASK_MAX_IMAGE_BYTES", "300000")
    from starlette.testclient import TestClient

    from mutask.serving.service import Mutask

    if "app" not in _APP:  # BentoML registers its metrics per ASGI app: build it once per process
        _APP["app"] = Mutask.to_asgi()
    with TestClient(_APP["app"]) as c:
        yield c


def test_predict_answers_the_same_whichever_way_it_is_handled(client, serving_artifact, tmp_path):
    """A small PNG is decoded on the event loop, the same pixels with compressed metadata or
    over INLINE_BYTES in the decode pool; the guard answers a known task itself, the API
    function (what BentoML calls) answers the same."""
    import io

    from PIL import Image, PngImagePlugin

    import bentoml

    from mutask.serving.service import INLINE_BYTES

    pixels = (np.random.default_rng(3).random((24, 24, 3)) * 255).astype(np.uint8)

    def png(**text):
        info = PngImagePlugin.PngInfo()
        for k, (v, zipped) in text.items():
            info.add_text(k, v, zip=zipped)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG", pnginfo=info)
        return buf.getvalue()

    variants = {"small": png(), "zTXt": png(note=("x" * 60_000, True)), "large": png(note=("y" * (INLINE_BYTES + 1), False))}
    assert len(variants["small"]) < INLINE_BYTES < len(variants["large"])
    svc = bentoml.get_current_service()
    pre_b = [svc.engine.tasks["b"].preprocessing]
    assert svc._decode_small(pre_b, variants["small"]) is not None
    assert svc._decode_small(pre_b, variants["zTXt"]) is None and svc._decode_small(pre_b, variants["large"]) is None
    answers = {}
    for name, data in variants.items():
        r = client.post("/predict", data={"task": "b"}, files={"image": ("x.png", data, "image/png")})
        assert r.status_code == 200, r.text
        answers[name] = r.json()
    assert answers["small"] == answers["zTXt"] == answers["large"]
    assert answers["small"]["index"] == int(reference_logits(serving_artifact, "b", variants["small"]).argmax())
    path = tmp_path / "x.png"
    path.write_bytes(variants["small"])
    from mutask.serving.service import Mutask

    api = Mutask.inner.__dict__["predict"].func  # what BentoML calls, on the app's own event loop
    via_api = client.portal.call(lambda: api(svc, task="b", image=path))
    assert via_api.model_dump() == answers["small"]


def test_service_in_process(client, serving_artifact):
    images = sample_images()
    for task in ("a", "b", "c", "d"):
        for name in ("rgb45x61-png", "CMYK-jpeg", "exif-rotated-jpeg"):
            r = client.post("/predict", data={"task": task}, files={"image": (name, images[name], "application/octet-stream")})
            assert r.status_code == 200, r.text
            body = r.json()
            ref = reference_logits(serving_artifact, task, images[name])
            assert body["task"] == task and body["index"] == int(ref.argmax())
            assert body["label"] == client.post("/tasks").json()[task]["labels"][body["index"]]
            assert len(body["scores"]) == min(5, len(ref))
            p = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
            assert abs(body["scores"][body["label"]] - p.max()) < 1e-4
            assert list(body["scores"].values()) == sorted(body["scores"].values(), reverse=True)
    tasks = client.post("/tasks").json()
    assert set(tasks) == {"a", "b", "c", "d"} and client.post("/tasks").json() == tasks
    for t, rec in tasks.items():
        assert rec["num_labels"] == len(rec["labels"]) and rec["image_size"] == 32
        assert rec["params"] > 0 and 0 < rec["accounted_params"] <= rec["params"]
        assert 0.0 <= rec["val_accuracy"] <= 1.0 and rec["test_accuracy"] is not None
        assert set(rec["shared_segments"]) <= set(rec["segments"])
    assert any(rec["shared_segments"] for rec in tasks.values())
    assert client.get("/readyz").status_code == 200 and client.get("/livez").status_code == 200
    metrics = client.get("/metrics").text
    for t in ("a", "b", "c", "d"):
        assert f'mutask_requests_total{{task="{t}"}}' in metrics
        assert f'mutask_request_latency_seconds_count{{task="{t}"}}' in metrics
        assert f'mutask_batch_size_count{{task="{t}"}}' in metrics
    spec = client.get("/docs.json").json()
    for path in ("/predict", "/predict_batch", "/tasks"):
        assert path in spec["paths"]
    assert "multipart/form-data" in json.dumps(spec["paths"]["/predict"])
    assert "top-5" in json.dumps(spec["paths"]["/predict"])


def test_predict_batch_in_process(client, serving_artifact):
    from tests.test_serving_helpers import b64

    images = sample_images()
    names = ["rgb32-png", "L-png", "P-gif", "RGBA-png", "1-png", "I16-png"]
    r = client.post("/predict_batch", json={"task": "c", "images": [b64(images[n]) for n in names[:-1]] + ["data:image/png;base64," + b64(images[names[-1]])]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["index"] for p in preds] == [int(reference_logits(serving_artifact, "c", images[n]).argmax()) for n in names]


def same_answers(got: list, want: list) -> None:
    """Answers equal up to float rounding (a task's graph and its segment chain agree to ~1e-6)."""
    assert [(g["task"], g["label"], g["index"], list(g["scores"])) for g in got] == [(w["task"], w["label"], w["index"], list(w["scores"])) for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(list(g["scores"].values()), list(w["scores"].values()), rtol=1e-5, atol=1e-6)


def test_predict_tasks_in_process(client, serving_artifact):
    images = sample_images()
    data = images["rgb45x61-png"]
    single = {t: client.post("/predict", data={"task": t}, files={"image": ("x.png", data, "image/png")}).json() for t in "abcd"}
    for form in ({"tasks": "c,a"}, {"tasks": ["c", "a", "c"]}, {"tasks": json.dumps(["c", "a"])}):
        r = client.post("/predict_tasks", data=form, files={"image": ("x.png", data, "image/png")})
        assert r.status_code == 200, r.text
        same_answers(r.json()["predictions"], [single["c"], single["a"]])
    r = client.post("/predict_tasks", files={"image": ("x.png", data, "image/png")})  # no tasks: every task
    assert r.status_code == 200
    same_answers(r.json()["predictions"], [single[t] for t in "abcd"])
    r = client.post("/predict_tasks", data={"tasks": "a,nope"}, files={"image": ("x.png", data, "image/png")})
    assert r.status_code == 404 and "nope" in error_of(r) and "valid tasks: a, b, c, d" in error_of(r)
    for form, files, needle in (
        ({"tasks": " , "}, {"image": ("x.png", data, "image/png")}, "`tasks` is empty"),
        ({"tasks": "a"}, None, "missing field `image`"),
        ({"tasks": "a"}, {"image": ("x.png", b"not an image", "image/png")}, "bad image"),
        ({"tasks": "a"}, {"image": ("x.png", data, "image/png"), "tasks": ("t.txt", b"a", "text/plain")}, "not a file"),
    ):
        r = client.post("/predict_tasks", data=form, files=files) if files else client.post("/predict_tasks", data=form)
        assert r.status_code == 400 and needle in error_of(r), (needle, r.text)
    assert "/predict_tasks" in client.get("/docs.json").json()["paths"]


def test_bad_input_battery_in_process(client):
    check_battery(client, sample_images()["rgb45x61-png"], limit_bytes=300000)
    metrics = client.get("/metrics").text
    assert 'mutask_errors_total{kind="bad_image",task="a"}' in metrics
    assert 'kind="unknown_task"' in metrics


# ---- no torch -----------------------------------------------------------------------------


def test_serving_never_imports_torch(serving_artifact, tmp_path):
    code = textwrap.dedent(
        """
        import sys
        from starlette.testclient import TestClient
        import mutask.serving, mutask.serving.cli, mutask.serving.engine, mutask.serving.images
        from mutask.serving.service import Mutask
        from tests.test_serving_helpers import sample_images
        with TestClient(Mutask.to_asgi()) as c:
            for t in ("a", "b", "c", "d"):
                r = c.post("/predict", data={"task": t}, files={"image": ("x.png", sample_images()["rgb-jpeg"])})
                assert r.status_code == 200, r.text
            assert c.post("/tasks").status_code == 200 and c.get("/metrics").status_code == 200
        bad = [m for m in ("torch", "timm", "torchvision", "mutask.evolve") if m in sys.modules]
        assert not bad, bad
        print("NO-TORCH-OK")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=subprocess_env({"MUTASK_ARTIFACT": serving_artifact}),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "NO-TORCH-OK" in r.stdout, r.stdout + r.stderr


# ---- bad artifacts: the service refuses to start ------------------------------------------


def _damaged(serving_artifact, tmp_path):
    """name -> a damaged copy of the artifact."""
    out = {"missing": tmp_path / "does-not-exist"}
    d = copy_artifact(serving_artifact, tmp_path / "tampered")
    w = d / "weights.safetensors"
    b = bytearray(w.read_bytes())
    b[-5] ^= 0xFF
    w.write_bytes(bytes(b))
    out["tampered"] = d
    d = copy_artifact(serving_artifact, tmp_path / "truncated")
    w = d / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    out["truncated"] = d
    d = copy_artifact(serving_artifact, tmp_path / "graph")
    g = sorted(d.glob("segment.*.onnx"))[0]
    g.write_bytes(g.read_bytes()[:-10])
    out["graph"] = d
    d = copy_artifact(serving_artifact, tmp_path / "preprocessing")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["tasks"]["b"]["preprocessing"]["resize"] = "nearest"
    (d / "manifest.json").write_text(json.dumps(manifest))
    out["preprocessing"] = d
    d = copy_artifact(serving_artifact, tmp_path / "nomanifest")
    (d / "manifest.json").unlink()
    out["nomanifest"] = d
    return out


def test_bad_artifacts_are_refused(serving_artifact, tmp_path, monkeypatch):
    from mutask.serving.repository import ServingError, open_artifact

    bad = _damaged(serving_artifact, tmp_path)
    for name, path in bad.items():
        with pytest.raises(ServingError, match="does not exist|sha256|truncated|bytes|manifest|not supported") as e:
            open_artifact(path)
        assert str(path) in str(e.value), name
        assert e.value.exit_code == 2
    monkeypatch.delenv("MUTASK_ARTIFACT", raising=False)
    monkeypatch.delenv("MUTASK_BENTOML_MODEL", raising=False)
    with pytest.raises(ServingError, match="MUTASK_ARTIFACT"):
        open_artifact()

    # `mutask serve` exits 2 with the message, before any server starts
    port = free_port()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "mutask.cli", "serve", str(bad["tampered"]), "--port", str(port)],
                       cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "mutask serve: error:" in r.stderr and "sha256" in r.stderr and str(bad["tampered"]) in r.stderr
    assert "listening" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "mutask.cli", "serve", str(bad["missing"])],
                       cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr

    # `bentoml serve` with MUTASK_ARTIFACT naming a damaged artifact exits at once: no half-ready server
    r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "mutask.serving.service:Mutask", "--host", "127.0.0.1", "--port", str(port)],
                       cwd=str(REPO), env=subprocess_env({"MUTASK_ARTIFACT": bad["truncated"]}), capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    assert "cannot be served" in r.stdout + r.stderr and "truncated" in r.stdout + r.stderr
    assert time.monotonic() - t0 < 80


# ---- packaging ----------------------------------------------------------------------------


def _uv_available() -> bool:
    import importlib.metadata
    import shutil

    if shutil.which("uv"):
        return True
    try:
        importlib.metadata.version("uv")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _uv_available(), reason="bentoml build would pip-install uv (needs the network)")
def test_the_bento_serves_from_a_venv_of_its_own_requirements(serving_artifact, tmp_path):
    """As README deploys: the artifact in BentoML's model store, `MUTASK_BENTOML_MODEL=TAG
    bentoml build`; then, as its container would, a fresh venv holding only the Bento's
    env/python/requirements.txt (no torch, no timm, no mutask install) serves the Bento's
    src/ with the model shipped inside it: correct answers, pre-packed weights."""
    import shutil

    import httpx

    from mutask.server_process import ServiceProcess

    home = tmp_path / "bentoml-home"
    make_model = (
        "import bentoml, shutil, sys, pathlib\n"
        "with bentoml.models.create('mutask-system') as m:\n"
        "    [shutil.copy2(f, m.path) for f in pathlib.Path(sys.argv[1]).iterdir()]\n"
    )
    env = subprocess_env({"BENTOML_HOME": home, "MUTASK_BENTOML_MODEL": "mutask-system:latest"})
    env.pop("MUTASK_ARTIFACT", None)
    r = subprocess.run([sys.executable, "-c", make_model, str(serving_artifact)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "."], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Successfully built" in r.stdout + r.stderr, r.stdout + r.stderr
    # the container's build context: the Bento with its models (what `bentoml containerize` and
    # `bentoml export` put together)
    r = subprocess.run([sys.executable, "-m", "bentoml", "export", "mutask:latest", str(tmp_path / "mutask.bento")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    bento = tmp_path / "bento"
    with tarfile.open(tmp_path / "mutask.bento") as tar:
        tar.extractall(bento, filter="data")
    assert (bento / "models" / "mutask-system" / "latest").exists(), "the model ships inside the Bento"
    src = bento / "src"
    files = {str(p.relative_to(src)) for p in src.rglob("*.py")}
    assert {"serving/service.py", "serving/engine.py", "export/artifact.py", "mutask/preprocessing.py", "mutask/cores.py"} <= files
    assert not any(f.startswith(("evolve/", "tests/", "benchmarks/")) or f in ("export/build.py", "serving/cli.py", "mutask/server_process.py") for f in files), files
    reqs = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch" not in reqs and "timm" not in reqs
    # what the generated container does: a fresh venv with the requirements, `bentoml serve` the Bento
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile and "EXPOSE 3000" in dockerfile
    assert 'exec bentoml "$@" "$BENTO_PATH"' in (bento / "env" / "docker" / "entrypoint.sh").read_text()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    install = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python")] if Path(uv).exists() else [str(venv / "bin" / "pip"), "install", "-q"]
    r = subprocess.run([*install, "-r", str(bento / "env" / "python" / "requirements.txt")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    clean = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "BENTOML_HOME": tmp_path / "container-home",
             "BENTOML_DO_NOT_TRACK": "true", "MUTASK_BENTOML_MODEL": "mutask-system:latest"}
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], env=clean, cwd=str(tmp_path), capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    port = free_port()
    srv = ServiceProcess([venv / "bin" / "bentoml", "serve", bento, "--port", port, "--host", "127.0.0.1"],
                         port=port, log_path=tmp_path / "bento.log", env=clean)
    with srv:
        data = sample_images()["rgb45x61-png"]
        for task in ("a", "d"):
            r = httpx.post(srv.url + "/predict", data={"task": task}, files={"image": ("x.png", data, "image/png")}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["index"] == int(reference_logits(serving_artifact, task, data).argmax())
        log = srv.log()
    assert "weights prepacked" in log and "No module named" not in log, log
    assert str(REPO) not in log, "nothing loads from the repository"


def test_a_worker_that_cannot_start_stops_the_whole_server(serving_artifact, tmp_path):
    """No half-ready server: when the service fails in the worker (after the arbiter's checks
    passed), the worker stops the arbiter instead of BentoML restarting it forever, and
    `mutask serve` exits 2 with the reason."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('MUTASK_TEST_BREAK_ENGINE'):\n"
        "    import mutask.serving.engine as e\n"
        "    def boom(self, *a, **k):\n"
        "        raise e.EngineError('simulated failure while loading the sessions')\n"
        "    e.Engine.__init__ = boom\n"
    )
    env = subprocess_env({"MUTASK_TEST_BREAK_ENGINE": "1", "MUTASK_ARTIFACT": serving_artifact})
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "mutask.cli", "serve", str(serving_artifact), "--port", str(free_port())],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "could not start" in r.stderr and "simulated failure" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 60
