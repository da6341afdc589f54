"""Where one /predict's wall time goes, stage by stage, threads included.

    python benchmarks/request_timeline.py ART [--requests 100]     # prints one JSON document

The service runs in this process (BentoML's ASGI app, its middlewares, the batcher and decode
threads; no sockets, no uvicorn: ``httpx.ASGITransport``); sequential ``/predict`` of one task
with a noise PNG at the task's image size. The functions that bound each stage are wrapped with
a clock (a few microseconds a call), so every stage is wall time wherever it runs: the event
loop, the decode pool, the batcher's thread. Run as a script, it measures whichever tree's
``mutask`` comes first on the path: ``PYTHONPATH=CHECKOUT`` measures another commit's server
(``serving_bench --part profile`` does both). Imports no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time

import numpy as np

# (stage, the mark it starts at, the mark it ends at); a request's marks: "sent" and "received"
# by the client, "<fn>0" at the first call of fn, "<fn>1" at the return of its last call
STAGES = [
    ("client, ASGI and BentoML's routing, to the body reader", "sent", "read_form0"),
    ("body read + multipart parse", "read_form0", "read_form1"),
    ("to the decoder (admission; the decode pool's thread for a large image)", "read_form1", "open_image0"),
    ("decode + preprocess", "open_image0", "to_input1"),
    ("to ONNX Runtime (the batcher, its thread)", "to_input1", "run0"),
    ("ONNX Runtime (Engine.run)", "run0", "run1"),
    ("back to the handler (thread hand-off, batch bookkeeping, metrics)", "run1", "prediction0"),
    ("answer: softmax, top-5", "prediction0", "prediction1"),
    ("response: serialization, middlewares, the client's parse", "prediction1", "received"),
]


def timeline(art_path: str, n: int) -> dict:
    os.environ["MUTASK_ARTIFACT"] = str(art_path)
    import httpx

    from mutask.benchmarks.measure import noise_pngs
    from mutask.export.artifact import load_artifact
    from mutask.serving import api, engine, images, service

    marks: dict = {}

    def clocked(owner, name):
        fn = getattr(owner, name)

        def note(edge):
            t = time.perf_counter()
            if edge == "1" or name + "0" not in marks:
                marks[name + edge] = t

        if asyncio.iscoroutinefunction(fn):
            async def wrapper(*a, **k):
                note("0")
                try:
                    return await fn(*a, **k)
                finally:
                    note("1")
        else:
            def wrapper(*a, **k):
                note("0")
                try:
                    return fn(*a, **k)
                finally:
                    note("1")
        setattr(owner, name, functools.wraps(fn)(wrapper))

    for owner, name in ((api, "read_form"), (images, "open_image"), (images, "to_input"), (engine.Engine, "run"), (service, "prediction")):
        clocked(owner, name)
    art = load_artifact(art_path)
    task = next(iter(art.tasks))
    png = noise_pngs(art)[task][0]
    app = service.Mutask.to_asgi()
    rows = []

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mutask") as c:
                files = {"image": ("x.png", png, "image/png")}
                for i in range(n + 20):  # 20 warm-up requests
                    marks.clear()
                    marks["sent"] = time.perf_counter()
                    (await c.post("/predict", data={"task": task}, files=files)).raise_for_status()
                    marks["received"] = time.perf_counter()
                    if i >= 20:
                        rows.append(dict(marks))

    asyncio.run(run())
    stages = {name: 1e3 * float(np.median([r[b] - r[a] for r in rows])) for name, a, b in STAGES}
    total = [1e3 * (r["received"] - r["sent"]) for r in rows]
    ort = [1e3 * (r["run1"] - r["run0"]) for r in rows]
    return {
        "requests": n, "task": task, "image_bytes": len(png), "image_size": art.tasks[task].image_size,
        "serving_code": os.path.dirname(service.__file__),
        "total_ms_p50": float(np.median(total)),
        "outside_onnxruntime_ms_p50": float(np.median(np.subtract(total, ort))),
        "stages_ms_p50": stages,
        "note": "in process (httpx.ASGITransport): no sockets, no uvicorn; each stage's median over the requests, wall time on any thread",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ART")
    p.add_argument("--requests", type=int, default=100)
    a = p.parse_args(argv)
    print(json.dumps(timeline(a.artifact, a.requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
