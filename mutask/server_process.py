"""Run ``mutask serve`` (or any BentoML service) as a subprocess and talk to it over HTTP.

Torch-free. Used by ``mutask demo``, the benchmarks and the tests: a server on a free loopback
port in its own process group (BentoML's arbiter and its workers), always stopped with the
whole group; a small HTTP client for ``POST /predict``; and :func:`metric_value`, which reads
one series out of a ``/metrics`` page.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image_uint8: np.ndarray) -> bytes:
    """One uint8 (H, W, 3) or (H, W) array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_uint8).save(buf, format="PNG")
    return buf.getvalue()


def _import_root() -> str | None:
    """The directory to put on a child's PYTHONPATH so that it imports this ``mutask``, or
    None where ``mutask`` is installed (the child's interpreter finds it by itself)."""
    from importlib import metadata

    try:
        metadata.distribution("mutask")
        return None
    except metadata.PackageNotFoundError:
        import mutask

        return str(Path(mutask.__file__).resolve().parent.parent)


def child_env(extra: dict | None = None) -> dict:
    """This process's environment for a child that imports ``mutask``: BentoML's usage
    tracking off, the source checkout on PYTHONPATH when ``mutask`` is not installed, and
    ``extra`` on top (values turned into strings)."""
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true")
    root = _import_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


class ServiceProcess:
    """``command`` (a BentoML server listening on ``port`` of 127.0.0.1) in its own process
    group, its output in ``log_path``. ``env``: the child's full environment (default:
    :func:`child_env`)."""

    def __init__(self, command: list[str], *, port: int, log_path, env: dict | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        env = child_env() if env is None else env
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(c) for c in command], env={k: str(v) for k, v in env.items()},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log(self) -> str:
        """The last 5000 characters the server wrote."""
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
        """RSS and PSS of the worker (the process that holds the sessions) and of the whole
        server. PSS counts a page mapped n times 1/n each time; RSS counts it every time, which
        overstates a file the sessions map in many pieces (the pre-packed weight pool)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        mem = {}
        for p in [root] + root.children(recursive=True):
            try:
                info = p.memory_full_info() if hasattr(psutil.Process, "memory_full_info") else p.memory_info()
                mem[p.pid] = (info.rss, getattr(info, "pss", None), " ".join(p.cmdline()))
            except psutil.Error:
                pass
        workers = [v for v in mem.values() if "_bentoml_impl.worker" in v[2]]
        worker = max(workers, key=lambda v: v[0]) if workers else (None, None)
        pss = [v[1] for v in mem.values()]
        return {"worker_rss": worker[0], "worker_pss": worker[1], "total_rss": sum(v[0] for v in mem.values()),
                "total_pss": sum(pss) if None not in pss else None, "processes": len(mem)}

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the whole server has used so far: the arbiter and its
        workers. Differences over a measurement give the server's work per request, which a
        client sharing a small machine's cores blurs less than it blurs requests/s."""
        import psutil

        root = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [root] + root.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> "ServiceProcess":
        """``with ServerProcess(...) as srv:`` a ready server, always stopped after (also when
        it never gets ready)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the group (the arbiter stops its workers), then SIGKILL whatever is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log.close()


class ServerProcess(ServiceProcess):
    """``mutask serve ART --host 127.0.0.1 --port PORT [args]`` (``python -m mutask.cli``
    with this interpreter). ``args``: further ``mutask serve`` options."""

    def __init__(self, art, *, log_path, env: dict | None = None, port: int | None = None, args=()):
        port = port or free_port()
        command = [sys.executable, "-m", "mutask.cli", "serve", str(Path(art).resolve()), "--port", str(port), "--host", "127.0.0.1", *args]
        super().__init__(command, port=port, log_path=log_path, env=env)


@contextlib.contextmanager
def running_server(art, *, log_path=None, env: dict | None = None, timeout_s: float = 180.0):
    """A ready ``mutask serve ART`` for the ``with`` block, yielding its base URL; always stopped after."""
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
    from concurrent.futures import ThreadPoolExecutor

    import httpx

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


def metric_value(text: str, name: str, **labels) -> float:
    """The sum of the samples called ``name`` in the Prometheus exposition ``text`` whose labels
    include ``labels`` (values compared as strings); 0.0 where none matches. ``name`` is a
    sample's name: ``mutask_requests_total``, ``..._bucket``, ``..._sum``, ``..._count``."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {k: str(v) for k, v in labels.items()}
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                total += sample.value
    return total
