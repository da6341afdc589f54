"""A real server (`mutask serve ART` in a subprocess, loopback, a free port) queried over HTTP
with BentoML's SyncHTTPClient and plain httpx: answers equal a plain onnxruntime run of each
per-task graph, a burst of concurrent mixed-task requests, /tasks, /readyz, /metrics, the
bad-input battery (never a 500, the server alive after)."""

from __future__ import annotations

import concurrent.futures
import re
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from mutask.server_process import metric_value
from tests.test_serving_helpers import Server, check_battery, error_of, reference_logits, sample_images, serving_artifact

__all__ = ["serving_artifact"]  # the session fixture, imported for pytest

LIMIT = 300_000  # MUTASK_MAX_IMAGE_BYTES for this server


@pytest.fixture(scope="module")
def server(serving_artifact, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    env = {
        "BENTOML_HOME": base / "bentoml-home-http",
        "PROMETHEUS_MULTIPROC_DIR": tmp_path_factory.mktemp("prometheus-http"),
        "MUTASK_MAX_IMAGE_BYTES": LIMIT,
        "MUTASK_MAX_IMAGE_PIXELS": 4_000_000,
    }
    with Server(serving_artifact, tmp_path_factory.mktemp("server") / "server.log", env) as srv:
        yield srv
    assert srv.proc.poll() is not None


def test_cli_printed_the_url_and_no_torch_is_loaded(server):
    import psutil

    assert re.search(rf"listening on http://127\.0\.0\.1:{server.port}", server.log())
    assert "ONNX Runtime threads per session" in server.log()  # per-session pools, no spinning global pool
    procs = [psutil.Process(server.proc.pid)] + psutil.Process(server.proc.pid).children(recursive=True)
    assert any("_bentoml_impl.worker" in " ".join(p.cmdline()) for p in procs)
    for p in procs:  # neither the CLI/arbiter nor the worker has torch's libraries mapped
        maps = Path(f"/proc/{p.pid}/maps")
        if maps.exists():
            text = maps.read_text()
            assert "libtorch" not in text and "/torch/" not in text, p.cmdline()
            if "_bentoml_impl.worker" in " ".join(p.cmdline()) and sys.platform == "linux":
                # the worker's uvicorn runs on uvloop with the httptools parser (serving deps)
                assert "/uvloop/" in text and "/httptools/" in text


def test_every_task_matches_plain_onnxruntime(server, serving_artifact, tmp_path):
    import bentoml

    images = sample_images()
    names = ["rgb45x61-png", "large-jpeg", "P-png", "LA-png", "exif-rotated-jpeg"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for task in ("a", "b", "c", "d"):
            for name in names:
                r = c.post("/predict", data={"task": task}, files={"image": (name, images[name])})
                assert r.status_code == 200, r.text
                ref = reference_logits(serving_artifact, task, images[name])
                assert r.json()["index"] == int(ref.argmax()), (task, name)
    with bentoml.SyncHTTPClient(server.url, timeout=30) as client:
        assert client.is_ready()
        for task in ("a", "b", "c", "d"):
            path = tmp_path / f"{task}.jpg"
            path.write_bytes(images["rgb-jpeg"])
            out = client.predict(task=task, image=path)
            out = out if isinstance(out, dict) else out.model_dump()
            ref = reference_logits(serving_artifact, task, images["rgb-jpeg"])
            assert out["task"] == task and out["index"] == int(ref.argmax())
            assert abs(sum(out["scores"].values()) - 1.0) < 1e-6 or len(out["scores"]) == 5
        tasks = client.tasks()
        tasks = tasks if isinstance(tasks, dict) else dict(tasks)
        assert set(tasks) == {"a", "b", "c", "d"}


def test_bentoml_client_calls_every_endpoint_with_its_signature_types(server, serving_artifact, tmp_path):
    """bentoml.SyncHTTPClient and AsyncHTTPClient, arguments as the signatures show them: lists
    as lists; bad input comes back as BentoML's own errors with the server's message."""
    import asyncio

    import bentoml
    from bentoml.exceptions import BentoMLException

    from tests.test_serving_helpers import b64

    images = sample_images()
    path = tmp_path / "x.png"
    path.write_bytes(images["rgb45x61-png"])
    want = {t: int(reference_logits(serving_artifact, t, images["rgb45x61-png"]).argmax()) for t in "abcd"}

    def plain(x):
        return x if isinstance(x, dict) else x.model_dump()

    with bentoml.SyncHTTPClient(server.url, timeout=30) as client:
        assert plain(client.predict(task="b", image=path))["index"] == want["b"]
        out = plain(client.predict_tasks(image=path, tasks=["d", "a"]))
        assert [(p["task"], p["index"]) for p in out["predictions"]] == [("d", want["d"]), ("a", want["a"])]
        out = plain(client.predict_batch(task="c", images=[b64(images["rgb45x61-png"])] * 2))
        assert [p["index"] for p in out["predictions"]] == [want["c"]] * 2
        assert set(client.tasks()) == set("abcd")
        with pytest.raises(BentoMLException, match="valid tasks: a, b, c, d"):
            client.predict_tasks(image=path, tasks=["a", "nope"])
        with pytest.raises(BentoMLException, match="not valid base64"):
            client.predict_batch(task="a", images=["%%%"])

    async def use_async():
        async with bentoml.AsyncHTTPClient(server.url, timeout=30) as client:
            return plain(await client.predict_tasks(image=path, tasks=["c"]))

    assert [p["index"] for p in asyncio.run(use_async())["predictions"]] == [want["c"]]


# What schemathesis may report, and why no schema can rule it out: an image's bytes (a schema
# says "a binary file" or "a string", not "a decodable PNG"), and in a multipart form an empty
# `tasks` list, which is no field at all, the same as leaving it out (every task).
SCHEMA_CANNOT_SAY = {
    ("ST202", "POST /predict"): "random bytes as the image are not an image",
    ("ST202", "POST /predict_tasks"): "random bytes as the image are not an image",
    ("ST202", "POST /predict_batch"): "random strings as images are not base64 images",
    ("ST201", "POST /predict_tasks"): "an empty `tasks` list is sent as no field: every task",
}


def test_schemathesis_finds_nothing_beyond_image_bytes(server, tmp_path):
    import json
    import subprocess

    st = Path(sys.executable).with_name("schemathesis")
    r = subprocess.run(
        [st, "run", server.url + "/docs.json", "--checks", "all", "--max-examples", "15", "--max-time", "60", "--seed", "1",
         "--continue-on-failure", "--no-color", "--report", "json", "--report-dir", tmp_path, "--request-timeout", "20"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    (report,) = tmp_path.glob("*.json")
    doc = json.loads(report.read_text())
    assert doc["operations"]["tested"] >= 4 and doc["test_cases"]["errored"] == 0, r.stdout[-3000:]
    found = {(f["code"], op) for f in doc.get("failures", []) for op in f["operations"]}
    assert found <= set(SCHEMA_CANNOT_SAY), (found - set(SCHEMA_CANNOT_SAY), r.stdout[-6000:])
    assert "Traceback" not in server.log() and " 500 " not in server.log()


def test_burst_of_concurrent_mixed_task_requests(server, serving_artifact):
    images = sample_images()
    names = sorted(images)
    jobs = [("abcd"[i % 4], names[i % len(names)]) for i in range(64)]
    expected = {(t, n): int(reference_logits(serving_artifact, t, images[n]).argmax()) for t, n in set(jobs)}
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=32)) as c:
        before = c.get("/metrics").text

        def one(job):
            t, n = job
            r = c.post("/predict", data={"task": t}, files={"image": (n, images[n])})
            return job, r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, jobs))
        after = c.get("/metrics").text
    bad = [(job, status, body) for job, status, body in results if status != 200 or body["index"] != expected[job] or body["task"] != job[0]]
    assert not bad, bad[:3]
    for t in "abcd":
        assert metric_value(after, "mutask_requests_total", task=t) - metric_value(before, "mutask_requests_total", task=t) == 64 // 4
    rows = metric_value(after, "mutask_engine_batch_size_sum") - metric_value(before, "mutask_engine_batch_size_sum")
    batches = metric_value(after, "mutask_engine_batch_size_count") - metric_value(before, "mutask_engine_batch_size_count")
    assert rows == 64 and 1 <= batches <= 64


def test_tasks_readyz_metrics_openapi(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/livez").status_code == 200
        tasks = c.post("/tasks").json()
        assert set(tasks) == {"a", "b", "c", "d"}
        for rec in tasks.values():
            assert {"labels", "image_size", "params", "accounted_params", "val_accuracy", "test_accuracy"} <= set(rec)
        c.post("/predict_batch", json={"task": "b", "images": []})  # an error series for b
        m = c.get("/metrics")
        assert m.status_code == 200
        for t in ("a", "b", "c", "d"):
            for series in ("mutask_requests_total", "mutask_request_latency_seconds_bucket", "mutask_batch_size_bucket", "mutask_errors_total"):
                assert re.search(rf'^{series}{{[^}}]*task="{t}"', m.text, re.M), (series, t)
        assert metric_value(m.text, "mutask_errors_total", task="b", kind="bad_request") >= 1
        # compute seconds by session: a shared segment or a task's own graph, whichever way the
        # cost model sent the batches so far
        assert re.search(r'^mutask_segment_seconds_total\{[^}]*shared="(true|false)"', m.text, re.M)
        assert c.get("/").status_code == 200
        spec = c.get("/docs.json").json()
        assert {"/predict", "/predict_batch", "/tasks"} <= set(spec["paths"])


def test_bad_input_battery_over_http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        check_battery(c, sample_images()["rgb45x61-png"], limit_bytes=LIMIT)
        # far over the limit, declared up front: answered without buffering the body
        big = np.random.default_rng(1).integers(0, 255, 3 * LIMIT, dtype=np.uint8).tobytes()
        r = c.post("/predict", data={"task": "a"}, files={"image": ("big.bin", big)})
        assert r.status_code == 400 and "limit" in error_of(r)
        m = c.get("/metrics").text
        assert metric_value(m, "bentoml_service_request_total", http_response_code="500") == 0
        assert metric_value(m, "mutask_errors_total", kind="bad_image") >= 4
    assert server.proc.poll() is None


def test_two_servers_keep_their_own_metrics_and_predict_tasks(server, serving_artifact, tmp_path_factory):
    """A second server with the same BentoML home (the same machine, the same user) used to
    wipe the first's Prometheus files; each now counts only its own requests. The second also
    answers one image for several tasks as the single-task requests do."""
    png = sample_images()["rgb45x61-png"]
    env = {"BENTOML_HOME": tmp_path_factory.getbasetemp() / "bentoml-home-http", "PROMETHEUS_MULTIPROC_DIR": tmp_path_factory.mktemp("prometheus-http2")}
    with httpx.Client(base_url=server.url, timeout=30) as c1:
        first = c1.get("/metrics").text
        with Server(serving_artifact, tmp_path_factory.mktemp("server2") / "server.log", env) as second_srv:
            with httpx.Client(base_url=second_srv.url, timeout=30) as c2:
                for _ in range(3):
                    assert c1.post("/predict", data={"task": "a"}, files={"image": ("x.png", png)}).status_code == 200
                for _ in range(5):
                    assert c2.post("/predict", data={"task": "b"}, files={"image": ("x.png", png)}).status_code == 200
                one = {t: c2.post("/predict", data={"task": t}, files={"image": ("x.png", png)}).json() for t in ("c", "d")}
                r = c2.post("/predict_tasks", data={"tasks": "d,c"}, files={"image": ("x.png", png)})
                assert r.status_code == 200, r.text
                got = r.json()["predictions"]
                assert [(g["task"], g["index"]) for g in got] == [("d", one["d"]["index"]), ("c", one["c"]["index"])]
                for g in got:
                    np.testing.assert_allclose(list(g["scores"].values()), list(one[g["task"]]["scores"].values()), rtol=1e-5, atol=1e-6)
                m2 = c2.get("/metrics").text
            m1 = c1.get("/metrics").text
    delta = {t: metric_value(m1, "mutask_requests_total", task=t) - metric_value(first, "mutask_requests_total", task=t) for t in "abcd"}
    assert delta == {"a": 3, "b": 0, "c": 0, "d": 0}
    assert {t: metric_value(m2, "mutask_requests_total", task=t) for t in "abcd"} == {"a": 0, "b": 5, "c": 2, "d": 2}
    assert metric_value(m1, "mutask_requests_total", task="a") >= 3  # the first's earlier counts survived
