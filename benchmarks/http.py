"""A real ``mutask serve`` process on a free loopback port, and a small HTTP client for it."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image_uint8: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_uint8).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def running_server(art, *, port: int | None = None, timeout_s: float = 180.0, log_path=None, env: dict | None = None):
    """Start ``mutask serve ART`` on 127.0.0.1, wait until /readyz answers 200, yield the
    base URL; always stop the whole process group afterwards (no server left running)."""
    import httpx

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "mutask.cli", "serve", str(art), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, BENTOML_DO_NOT_TRACK="true", **(env or {})),
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready" + (f"; see {log_path}" if log_path else ""))
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        if log_path:
            log.close()


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def predict_all(url: str, items: list[tuple[str, bytes]], concurrency: int = 8, timeout_s: float = 60.0) -> list[dict]:
    """POST every (task, png) to /predict with ``concurrency`` clients; per item: the answer,
    HTTP status and latency in seconds (order kept)."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client(base_url=url, timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(item):
            task, png = item
            t0 = time.perf_counter()
            r = client.post("/predict", data={"task": task}, files={"image": ("x.png", png, "image/png")})
            dt = time.perf_counter() - t0
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"text": r.text}
            return {"task": task, "status": r.status_code, "latency_s": dt, "answer": body}

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, items))
