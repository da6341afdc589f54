"""Attacks on a real server (`mutask serve` in a subprocess), each followed by a normal request
that must be answered promptly: oversized and too many headers, scans of random URLs against
/metrics, images whose decoding would cost seconds, idle and half-sent connections, more
connections than the cap, a deeply nested task field, and an edited manifest."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.test_serving_helpers import REPO, Server, copy_artifact, error_of, sample_images, serving_artifact, subprocess_env

__all__ = ["serving_artifact"]

LIMITS = {
    "MUTASK_HEADER_TIMEOUT_S": 1.5,
    "MUTASK_BODY_TIMEOUT_S": 2.5,
    "MUTASK_MAX_CONNECTIONS": 40,
    "MUTASK_KEEP_ALIVE_S": 1.0,
    "MUTASK_MAX_IMAGE_PIXELS": 4_000_000,
    "MUTASK_MAX_REQUEST_PIXELS": 6_000_000,
}


@pytest.fixture(scope="module")
def server(serving_artifact, tmp_path_factory):
    env = {"BENTOML_HOME": tmp_path_factory.mktemp("home"), "PROMETHEUS_MULTIPROC_DIR": tmp_path_factory.mktemp("prom"), **LIMITS}
    with Server(serving_artifact, tmp_path_factory.mktemp("hardening") / "server.log", env) as srv:
        yield srv


def served_promptly(server, within_s: float = 2.0) -> None:
    """A normal /predict answers 200 within ``within_s``."""
    png = sample_images()["rgb45x61-png"]
    t0 = time.monotonic()
    r = httpx.post(server.url + "/predict", data={"task": "a"}, files={"image": ("x.png", png, "image/png")}, timeout=30)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < within_s, f"a normal request took {time.monotonic() - t0:.2f} s"


def raw(server, payload: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send ``payload`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as s:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# ---- 1. headers ------------------------------------------------------------------------------


def test_oversized_and_too_many_headers_are_refused_fast(server):
    rss_before = server.worker_rss()["worker_rss"]
    t0 = time.monotonic()
    answer = raw(server, b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
    assert status(answer) == 431 and b"MUTASK_MAX_HEADER_BYTES" in answer and time.monotonic() - t0 < 1.0
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(20_000))
    assert status(raw(server, b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")) == 431
    assert status(raw(server, b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n")) == 431
    # a 150 MB header, streamed: refused after its first tens of KB; the worker never holds it
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, chunk = 0, b"a" * (1 << 20)
        try:
            while sent < 150 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 150 << 20, "the server kept reading a 150 MB header"
    assert server.worker_rss()["worker_rss"] - rss_before < 50 << 20
    served_promptly(server)


# ---- 2. metrics cardinality --------------------------------------------------------------------


def test_random_paths_add_no_metric_series(server):
    before = httpx.get(server.url + "/metrics").text
    rng = np.random.default_rng(0)
    for i in range(2000):
        answer = raw(server, f"GET /x{i}{rng.integers(1 << 30)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status(answer) == 404, answer[:200]
    r = httpx.post(server.url + "/nope/predict", data={"task": "a"}, timeout=10)
    assert r.status_code == 404 and "/predict" in error_of(r)
    after = httpx.get(server.url + "/metrics").text
    assert "/x1" not in after and "/nope" not in after
    assert len(after) < len(before) + 20_000, (len(before), len(after))
    assert httpx.get(server.url + "/docs.json").status_code == 200 and httpx.get(server.url + "/").status_code == 200
    served_promptly(server)


# ---- 3. decode budgets -------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_images_that_would_take_seconds_to_decode_are_refused_fast(server):
    from tests.test_serving_helpers import b64

    long_png = _png(39_000_000, 1)  # 1 x 39,000,000 pixels in a few KB
    assert len(long_png) < 100_000
    t0 = time.monotonic()
    r = httpx.post(server.url + "/predict", data={"task": "a"}, files={"image": ("x.png", long_png, "image/png")}, timeout=30)
    assert r.status_code == 400 and "MUTASK_MAX_IMAGE_PIXELS" in error_of(r) and time.monotonic() - t0 < 1.0
    medium = _png(1900, 1900)  # 3.6 M pixels each: one fits, two do not fit the request budget
    t0 = time.monotonic()
    r = httpx.post(server.url + "/predict_batch", json={"task": "a", "images": [b64(medium)] * 32}, timeout=30)
    assert r.status_code == 400 and "MUTASK_MAX_REQUEST_PIXELS" in error_of(r), r.text
    assert time.monotonic() - t0 < 3.0
    r = httpx.post(server.url + "/predict_batch", json={"task": "a", "images": [b64(medium)]}, timeout=30)
    assert r.status_code == 200
    served_promptly(server)


# ---- 4. idle, slow and too many connections ----------------------------------------------------


def test_idle_and_half_sent_connections_are_closed(server):
    idle, partial_headers, partial_body = [], [], []
    try:
        for _ in range(10):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            partial_headers.append(s)
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /predict_batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"task\"")
            partial_body.append(s)
        time.sleep(LIMITS["MUTASK_BODY_TIMEOUT_S"] + 1.5)

        def rest(s) -> bytes:  # what the server sent before closing (recv returns b"" once closed)
            s.settimeout(2)
            data = b""
            try:
                while chunk := s.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass
            return data

        for s in idle + partial_headers:  # no complete headers in time: 408, closed
            answer = rest(s)
            assert status(answer) == 408 and b"MUTASK_HEADER_TIMEOUT_S" in answer, answer[:200]
        for s in partial_body:  # a body that never completes: closed
            assert status(rest(s)) in (0, 400)
    finally:
        for s in idle + partial_headers + partial_body:
            s.close()
    served_promptly(server)


def test_connections_over_the_cap(server):
    """Idle connections make room for new ones (the oldest is closed); connections busy with
    requests do not, and a new one is answered 503 at once."""
    cap = LIMITS["MUTASK_MAX_CONNECTIONS"]
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(cap)]
    try:
        time.sleep(0.2)
        served_promptly(server, within_s=1.0)  # the oldest idle connection made room
        idle[0].settimeout(2)
        assert status(idle[0].recv(4096)) == 408
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    busy = []
    try:
        for _ in range(cap):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /predict_batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            busy.append(s)
        time.sleep(0.3)
        t0 = time.monotonic()
        answer = raw(server, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(answer) == 503 and b"MUTASK_MAX_CONNECTIONS" in answer and time.monotonic() - t0 < 1.0
    finally:
        for s in busy:
            s.close()
    time.sleep(0.3)
    served_promptly(server)


def test_a_kept_alive_connection_stays_open_for_keep_alive_s(server):
    """After a response the connection stays open for MUTASK_KEEP_ALIVE_S (here 1 s; the default
    75 s outlives clients' own idle expiry, so they close first), then the server closes it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, last = b"", time.monotonic()
        while chunk := s.recv(65536):  # the response, then b"" when the server closes
            answer, last = answer + chunk, time.monotonic()
        waited = time.monotonic() - last
    assert status(answer) == 200 and answer.count(b"HTTP/1.1 ") == 1
    assert 0.8 <= waited < 3.0, waited  # uvicorn's own default would have kept it 5 s


def test_an_idle_kept_alive_connection_makes_room_before_a_busy_one():
    """Over the connection cap, a connection between requests counts as idle: the oldest idle
    one is closed (a kept-alive one silently, as its expiry would), never one mid-request."""
    from types import SimpleNamespace

    from mutask.serving.http import GuardedHttpToolsProtocol

    class Transport:
        def __init__(self):
            self.closed, self.written = False, b""

        def write(self, data):
            self.written += data

        def close(self):
            self.closed = True

        def is_closing(self):
            return self.closed

    def conn(opened, awaiting, response_complete):
        c = GuardedHttpToolsProtocol.__new__(GuardedHttpToolsProtocol)
        c._opened, c._awaiting_headers, c._refused, c._timer = opened, awaiting, False, None
        c.cycle = None if response_complete is None else SimpleNamespace(response_complete=response_complete)
        c.transport = Transport()
        return c

    busy = conn(0.0, False, False)  # oldest, but its response is not done
    kept_alive = conn(1.0, False, True)
    waiting = conn(2.0, True, None)
    new = conn(3.0, True, None)
    new.connections = {busy, kept_alive, waiting}
    assert new._evict_idle()
    assert kept_alive.transport.closed and kept_alive.transport.written == b"" and kept_alive not in new.connections
    assert not busy.transport.closed and not waiting.transport.closed
    assert new._evict_idle()  # then the one waiting for its headers: answered 408
    assert waiting.transport.closed and status(waiting.transport.written) == 408
    assert not new._evict_idle() and not busy.transport.closed  # only busy ones left


# ---- 5. never a 500 on client input ------------------------------------------------------------


def test_deeply_nested_json_is_a_client_error(server):
    png = sample_images()["rgb45x61-png"]
    nested = "[" * 1500 + "]" * 1500
    r = httpx.post(server.url + "/predict", data={"task": nested}, files={"image": ("x.png", png)}, timeout=10)
    assert r.status_code == 404 and "valid tasks" in error_of(r)
    r = httpx.post(server.url + "/predict_batch", content=('{"task": ' + nested + "}").encode(), headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    r = httpx.post(server.url + "/predict_batch", content=("[" * 100_000).encode(), headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    served_promptly(server)
    assert "Traceback" not in server.log() and " 500 " not in server.log()


# ---- 6. manifest integrity ---------------------------------------------------------------------


def test_an_edited_manifest_is_refused_by_serve_and_verify(serving_artifact, tmp_path):
    for name, edit in {
        "preprocessing": lambda m: m["tasks"]["a"]["preprocessing"].update(mean=[0.4, 0.5, 0.5]),
        "labels": lambda m: m["tasks"]["b"]["labels"].reverse(),
        "metrics": lambda m: m["tasks"]["c"]["metrics"].update(test_accuracy=0.99),
        "image size": lambda m: m["tasks"]["a"].update(image_size=48),
    }.items():
        d = copy_artifact(serving_artifact, tmp_path / name.replace(" ", "-"))
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m, indent=1))
        for cmd in (["serve", str(d), "--port", "1"], ["export", str(d), "--verify-only", "-q"]):
            r = subprocess.run([sys.executable, "-m", "mutask.cli", *cmd], cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, (name, cmd, r.stdout, r.stderr)
            assert "manifest_sha256" in r.stderr and "edited" in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
