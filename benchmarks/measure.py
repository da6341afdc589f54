"""Client-side measurements shared by the serving benchmarks (torch-free).

Images per task, a task's model input by the artifact's own preprocessing contract, one
``POST /predict``, and a closed loop of concurrent clients over mixed tasks.
"""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np


def pct(xs, q) -> float:
    """The ``q``-th percentile of ``xs`` (nan for none)."""
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def noise_pngs(art, per_task: int = 1, seed: int = 0) -> dict[str, list[bytes]]:
    """``per_task`` noise PNGs per task at the task's image size (no resize: the model's own cost)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for task, rec in art.tasks.items():
        s = int(rec.image_size)
        out[task] = []
        for _ in range(per_task):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)).save(buf, "PNG")
            out[task].append(buf.getvalue())
    return out


def model_input(art, task: str, png: bytes) -> np.ndarray:
    """float32 (1, 3, S, S): ``png`` through the task's preprocessing as the manifest records it."""
    from PIL import Image

    return art.tasks[task].preprocessing.image(Image.open(io.BytesIO(png)))


def post_predict(client, task: str, png: bytes):
    """``POST /predict`` of ``png`` for ``task`` (an ``httpx`` client, sync or async)."""
    return client.post("/predict", data={"task": task}, files={"image": ("x.png", png, "image/png")})


async def _closed_loop(url: str, jobs: list, concurrency: int, n: int, max_seconds: float) -> dict:
    import httpx

    state = {"next": 0, "done": 0, "errors": 0, "transport_errors": 0}
    t_end = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        for task, png in dict(jobs).items():  # warm: every task once
            (await post_predict(c, task, png)).raise_for_status()

        async def client():
            while state["next"] < n and time.monotonic() < t_end:
                task, png = jobs[state["next"] % len(jobs)]
                state["next"] += 1
                try:
                    r = await post_predict(c, task, png)
                except httpx.TransportError:  # a reset or closed connection: counted, the client goes on
                    state["errors"] += 1
                    state["transport_errors"] += 1
                    continue
                state["done" if r.status_code == 200 else "errors"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": state["done"], "errors": state["errors"], "transport_errors": state["transport_errors"], "seconds": wall,
            "rps": state["done"] / wall if wall else 0.0}


def closed_loop(url: str, jobs: list, concurrency: int, n: int, max_seconds: float) -> dict:
    """``concurrency`` clients POST ``jobs`` (``(task, png)``, taken in order, round-robin) to
    ``url``/predict until ``n`` were sent or ``max_seconds`` passed. Requests answered 200,
    errors (of which transport errors: a connection reset or closed under the request), seconds
    and requests/s."""
    return asyncio.run(_closed_loop(url, jobs, concurrency, n, max_seconds))
