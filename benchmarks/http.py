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
from pathlib import Path

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


REPO = Path(__file__).resolve().parent.parent


class ServerProcess:
    """``mutask serve ART`` on 127.0.0.1 in its own process group (BentoML's arbiter and its
    worker), stopped with the whole group. ``env``: the child's full environment (default:
    this process's, with BentoML tracking off and the repository on PYTHONPATH)."""

    def __init__(self, art, *, log_path, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        if env is None:
            env = dict(os.environ, BENTOML_DO_NOT_TRACK="true")
            env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mutask.cli", "serve", str(art), "--port", str(self.port), "--host", "127.0.0.1"],
            cwd=str(REPO), env={k: str(v) for k, v in env.items()}, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until /readyz answers 200; raises with the server's log if it exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before it was ready:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{self.log()}")

    def worker_rss(self) -> dict:
        """RSS of the worker (the process holding the sessions) and of the whole server."""
        import psutil

        root = psutil.Process(self.proc.pid)
        rss = {}
        for p in [root] + root.children(recursive=True):
            try:
                rss[p.pid] = (p.memory_info().rss, " ".join(p.cmdline()))
            except psutil.Error:
                pass
        workers = [v[0] for v in rss.values() if "_bentoml_impl.worker" in v[1]]
        return {"worker_rss": max(workers) if workers else None, "total_rss": sum(v[0] for v in rss.values()), "processes": len(rss)}

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the group (the arbiter stops its worker), then SIGKILL whatever is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def running_server(art, *, log_path=None, env: dict | None = None, timeout_s: float = 180.0):
    """A ready server for the ``with`` block, yielding its base URL; always stopped after."""
    import tempfile

    log_path = log_path or Path(tempfile.mkdtemp(prefix="mutask-server-")) / "server.log"
    srv = ServerProcess(art, log_path=log_path, env=env)
    try:
        srv.wait_ready(timeout_s)
        yield srv.url
    finally:
        srv.stop()


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
