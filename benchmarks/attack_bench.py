"""Hardening: the endpoint under four attacks, each measured against a normal request.

    python -m mutask.benchmarks.attack_bench ART [--label after] [--results DIR]

Starts ``mutask serve ART`` (default settings) on a free loopback port and runs, one after
another, the attacks of the hardening issue, recording what each costs the server and what a
normal /predict meanwhile costs a client:

1. four connections each streaming a 150 MB header to ``GET /readyz``: what they got back,
   the worker's RSS before and after, the latency of a /predict sent during the attack;
2. 5,000 requests for random unknown paths: ``/metrics`` size and scrape time before and after;
3. a 1 x 39,000,000 pixel PNG (75 KB) to /predict, and a /predict_batch of 8 of them: status and
   time to answer, and a /predict's latency meanwhile;
4. 2,000 connections left idle or half-sent: how many the server still holds open 15 s later,
   and whether a normal request is served.

Run it once on the code before a change and once after (``--label``); each run writes
``attacks-<label>.json`` and ``.md``. Imports no torch.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx

from mutask.benchmarks.common import RESULTS, write
from mutask.server_process import ServerProcess, child_env

HUGE_HEADER = 150 << 20


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _normal(url: str, png: bytes, task: str) -> dict:
    t0 = time.perf_counter()
    try:
        r = httpx.post(url + "/predict", data={"task": task}, files={"image": ("x.png", png, "image/png")}, timeout=120)
        status = r.status_code
    except httpx.HTTPError as e:
        status = type(e).__name__
    return {"status": status, "seconds": round(time.perf_counter() - t0, 3)}


def _during(action, url: str, png: bytes, task: str) -> tuple:
    """Run ``action`` in a thread and send one normal request 0.5 s into it."""
    out = {}
    t = threading.Thread(target=lambda: out.update(result=action()))
    t.start()
    time.sleep(0.5)
    normal = _normal(url, png, task)
    t.join()
    return out.get("result"), normal


def huge_headers(srv, png, task) -> dict:
    def stream_one() -> str:
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk, sent = b"a" * (1 << 20), 0
                try:
                    while sent < HUGE_HEADER:
                        s.sendall(chunk)
                        sent += len(chunk)
                    s.sendall(b"\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    return f"cut off after {sent >> 20} MiB"
                return s.recv(64).split(b"\r\n")[0].decode(errors="replace") or "closed"
        except OSError as e:
            return type(e).__name__

    rss0 = srv.worker_rss()["worker_rss"]

    def attack():
        results = [None] * 4
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream_one())) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    answers, normal = _during(attack, srv.url, png, task)
    return {"answers": answers, "worker_rss_mib_before": rss0 >> 20, "worker_rss_mib_after": srv.worker_rss()["worker_rss"] >> 20, "normal_during": normal}


def random_paths(srv, png, task, n=5000) -> dict:
    def scrape():
        t0 = time.perf_counter()
        text = httpx.get(srv.url + "/metrics", timeout=120).text
        return len(text), round(time.perf_counter() - t0, 3)

    size0, t0 = scrape()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        statuses = {}
        for i in range(n):
            try:
                code = c.get(f"/x{i}{time.monotonic_ns()}").status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            statuses[code] = statuses.get(code, 0) + 1
    size1, t1 = scrape()
    return {"requests": n, "statuses": statuses, "metrics_bytes_before": size0, "metrics_bytes_after": size1,
            "scrape_s_before": t0, "scrape_s_after": t1, "normal_after": _normal(srv.url, png, task)}


def long_png(srv, png, task) -> dict:
    bomb = _png(39_000_000, 1)
    one = _normal(srv.url, bomb, task)

    def batch():
        t0 = time.perf_counter()
        try:
            r = httpx.post(srv.url + "/predict_batch", json={"task": task, "images": [base64.b64encode(bomb).decode()] * 8}, timeout=180)
            status = r.status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        return {"status": status, "seconds": round(time.perf_counter() - t0, 3)}

    batch_result, normal = _during(batch, srv.url, png, task)
    return {"png_bytes": len(bomb), "single": one, "batch_of_8": batch_result, "normal_during": normal}


def idle_connections(srv, png, task, n=2000, wait_s=15.0) -> dict:
    socks = []
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            if i % 2:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        normal = _normal(srv.url, png, task)
        time.sleep(wait_s)
        open_ = 0
        for s in socks:
            s.setblocking(False)
            try:
                data = s.recv(1 << 16)
                open_ += 0 if data == b"" or data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.1 503") else 1
            except BlockingIOError:
                open_ += 1
            except OSError:
                pass
        return {"connections": n, "still_open_after_s": wait_s, "still_open": open_, "normal_while_held": normal,
                "normal_after": _normal(srv.url, png, task)}
    finally:
        for s in socks:
            s.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.attack_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ART")
    p.add_argument("--label", default="after", help="names the results file: attacks-<label>.json (default after)")
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from mutask.export.artifact import load_artifact

    art = load_artifact(a.artifact)
    task = next(iter(art.tasks))
    png = _png(48, 48)
    tmp = Path(tempfile.mkdtemp(prefix="mutask-attack-"))
    (tmp / "prom").mkdir()
    env = child_env({"BENTOML_HOME": tmp / "home", "PROMETHEUS_MULTIPROC_DIR": tmp / "prom"})
    with ServerProcess(Path(a.artifact).resolve(), log_path=tmp / "server.log", env=env) as srv:
        doc = {"benchmark": "attacks", "label": a.label, "task": task, "repeats": 1}
        for name, attack in (("huge_headers", huge_headers), ("random_paths", random_paths), ("long_png", long_png), ("idle_connections", idle_connections)):
            doc[name] = attack(srv, png, task)
            print(name, json.dumps(doc[name]), flush=True)
    h, r, l, i = doc["huge_headers"], doc["random_paths"], doc["long_png"], doc["idle_connections"]
    md = "\n".join([
        f"Attacks on `mutask serve` ({a.label}), default settings, one run each.",
        "",
        "| attack | what the attacker got | server cost | a normal /predict meanwhile |",
        "|---|---|---|---|",
        f"| 4 x 150 MB header to /readyz | {', '.join(map(str, h['answers']))} | worker RSS {h['worker_rss_mib_before']} -> {h['worker_rss_mib_after']} MiB | {h['normal_during']['status']} in {h['normal_during']['seconds']} s |",
        f"| {r['requests']} random unknown paths | {r['statuses']} | /metrics {r['metrics_bytes_before']:,} -> {r['metrics_bytes_after']:,} bytes, scrape {r['scrape_s_before']} -> {r['scrape_s_after']} s | {r['normal_after']['status']} in {r['normal_after']['seconds']} s (after) |",
        f"| 1 x 39,000,000 PNG ({l['png_bytes']:,} bytes) | {l['single']['status']} in {l['single']['seconds']} s; a batch of 8: {l['batch_of_8']['status']} in {l['batch_of_8']['seconds']} s | | {l['normal_during']['status']} in {l['normal_during']['seconds']} s (during the batch) |",
        f"| {i['connections']} idle / half-sent connections | {i['still_open']} still open after {i['still_open_after_s']:g} s | | {i['normal_while_held']['status']} in {i['normal_while_held']['seconds']} s (while held) |",
    ])
    write(f"attacks-{a.label}", doc, md, a.results)
    print(md)


if __name__ == "__main__":
    main()
