"""Swapping versions live (serving/repository.py): how long a swap takes, what it does to
latency, and whether memory returns to one version's size.

``python -m mutask.benchmarks.swap_bench [--art ART] [--swaps 20] [--pairs 10]`` serves a
directory of versions (copies of ART: each copy a new version to load, verify, warm up and swap
in; without ``--art`` a small system is built and exported first), with 4 clients posting
/predict all along. For each of the first ``--pairs`` swaps it measures a steady window, then a
window from the new version's rename to 0.5 s after the swap is seen in /tasks (paired and
interleaved: steady, swap, steady, swap, ...), and reports the median of the paired p50 and p99
ratios with a bootstrap interval. Time to swap: rename to /tasks showing the new version
(includes waiting for the next poll), and the server's own load time (verify + engine + warm-up,
``mutask_version_load_seconds``). Memory: the worker's RSS/PSS with version 1, after swap 1 and
after swap N (clients stopped, settled), against the version's weights bytes. Writes
``benchmarks/results/swap.{json,md}``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .harness import SHARED, fmt_ratio, paired_ratio, write_record
from .measure import noise_pngs, pct, post_predict

POLL_S = 0.5
CLIENTS = 4


def build_artifact(out: Path) -> Path:
    """A small system without evolution: a ViT root (dim 192, depth 6), four tasks over its
    blocks (two with their own patch_embed), exported with a small parity check."""
    import torch

    from mutask.evolve.data import Split, TaskData
    from mutask.evolve.model import Component, TaskPath
    from mutask.evolve.roots import build_model, root_for
    from mutask.evolve.roots.vit import new_head
    from mutask.evolve.state import System
    from mutask.export.build import export_system

    spec = {"timm_model": "VisionTransformer", "kwargs": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10)}
    torch.manual_seed(0)
    s = System.new(root_for(spec, build_model(spec), "swap-bench-root"), seed=0)
    rp = s.root_path
    data = {}
    for k, task in enumerate("abcd"):
        rng = np.random.default_rng(k)
        y = rng.integers(0, 5, 16)
        split = Split((rng.random((16, 32, 32, 3)) * 255).astype(np.uint8), y.astype(np.int64))
        data[task] = TaskData(task, [f"{task}{i}" for i in range(5)], split, split, split, 32)
        comps = list(rp.components[:-1])
        if k % 2:
            clone = s.store.adopt(s.store.clone(comps[0]))
            comps[0] = clone.id
        head = s.store.adopt(Component(s.store.new_id(), "head", new_head(s.root.embed_dim, 5)))
        p = TaskPath(s.new_path_id(), task, comps + [head.id], dict(rp.hparams), metrics={"val_accuracy": 0.2, "test_accuracy": 0.2})
        s.paths[p.id], s.best[task] = p, p.id
        s.tasks[task] = {"spec": task, "seed": 0, "num_classes": 5, "class_names": data[task].class_names}
        for cid in p.components:
            s.store[cid].locks.add(task)
    return export_system(s, out, data=data, parity_samples=8, show_progress=False)


class Clients:
    """``CLIENTS`` threads posting /predict round-robin over tasks; (start, seconds, status) per request."""

    def __init__(self, url: str, pngs: dict):
        self.url, self.jobs = url, [(t, p) for t, ps in pngs.items() for p in ps]
        self.records: list = []
        self.stop = threading.Event()
        self.threads: list = []

    def _run(self, k: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=60) as c:
            i = k
            while not self.stop.is_set():
                task, png = self.jobs[i % len(self.jobs)]
                t0 = time.perf_counter()
                try:
                    status = post_predict(c, task, png).status_code
                except Exception:
                    status = -1
                self.records.append((t0, time.perf_counter() - t0, status))
                i += 1

    def pause(self) -> None:
        """Stop the clients and let the server settle (a memory reading)."""
        self.stop.set()
        for t in self.threads:
            t.join()
        time.sleep(1.5)

    def resume(self) -> None:
        self.stop.clear()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def window(self, t0: float, t1: float) -> list[float]:
        return [dt for s, dt, _ in list(self.records) if t0 <= s < t1]


def served_version(client) -> int:
    return next(iter(client.post("/tasks").json().values()))["version"]


def run(art: Path | None, swaps: int, pairs: int, results: Path | None, idle: bool = False) -> dict:
    import httpx

    from mutask.export.artifact import load_artifact
    from mutask.export.sizes import artifact_stats
    from mutask.server_process import ServerProcess, metric_value

    work = Path(tempfile.mkdtemp(prefix="mutask-swap-bench-"))
    try:
        art = art or build_artifact(work / "art")
        repo = work / "repo"
        repo.mkdir()
        shutil.copytree(art, repo / "1")
        pngs = noise_pngs(load_artifact(art, verify=False), per_task=2)
        srv = ServerProcess(repo, log_path=work / "server.log", args=["--poll-s", str(POLL_S)])
        rows, mem = [], {}
        with srv, httpx.Client(base_url=srv.url, timeout=60) as client:
            time.sleep(1.0)
            mem["version 1 only"] = srv.worker_rss()
            clients = Clients(srv.url, pngs)
            clients.resume()
            time.sleep(2.0)  # clients warmed up
            clients.pause()
            mem["version 1 after traffic"] = srv.worker_rss()
            clients.resume()
            for n in range(2, swaps + 2):
                measured = n - 2 < pairs
                if measured:
                    steady0 = time.perf_counter()
                    time.sleep(2.0)
                    steady1 = time.perf_counter()
                load_before = metric_value(client.get("/metrics").text, "mutask_version_load_seconds_sum")
                shutil.copytree(art, repo / f".{n}.copy")
                t0 = time.perf_counter()
                (repo / f".{n}.copy").rename(repo / str(n))
                while served_version(client) != n:
                    if time.perf_counter() - t0 > 120:
                        raise RuntimeError(f"version {n} not served within 120 s:\n{srv.log()}")
                    time.sleep(0.02)
                seen = time.perf_counter() - t0
                time.sleep(0.5)
                t1 = time.perf_counter()
                load_s = metric_value(client.get("/metrics").text, "mutask_version_load_seconds_sum") - load_before
                row = {"version": n, "rename_to_served_s": seen, "server_load_s": load_s}
                if measured:
                    steady, during = clients.window(steady0, steady1), clients.window(t0, t1)
                    row.update(steady_p50_ms=pct(steady, 50) * 1e3, steady_p99_ms=pct(steady, 99) * 1e3, swap_p50_ms=pct(during, 50) * 1e3,
                               swap_p99_ms=pct(during, 99) * 1e3, steady_n=len(steady), swap_n=len(during))
                rows.append(row)
                shutil.rmtree(repo / str(n - 1))  # keep the disk small; the server has moved on
                if n == 2:
                    clients.pause()
                    mem["after swap 1"] = srv.worker_rss()
                    clients.resume()
            clients.pause()
            mem[f"after swap {swaps}"] = srv.worker_rss()
            metrics = client.get("/metrics").text
            counts = {"swaps": metric_value(metrics, "mutask_version_swaps_total"), "refusals": metric_value(metrics, "mutask_version_refusals_total")}
        failed = sum(1 for _, _, st in clients.records if st != 200)
        doc = summarize(rows, mem, counts, failed, len(clients.records), artifact_stats(art), swaps, pairs, idle)
        write_record("swap", doc, markdown(doc), results, shared_machine=None if idle else SHARED)
        return doc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarize(rows, mem, counts, failed, total, stats, swaps, pairs, idle) -> dict:
    paired = [r for r in rows if "swap_p50_ms" in r]

    def ratio(key: str) -> dict:  # during a swap / the steady window just before it, per pair
        return paired_ratio([x[f"swap_{key}_ms"] for x in paired], [x[f"steady_{key}_ms"] for x in paired])

    return {
        "benchmark": "swap",
        "settings": {"swaps": swaps, "pairs": pairs, "poll_s": POLL_S, "clients": CLIENTS, "steady_window_s": 2.0, "idle_machine": idle,
                     "swap_window": "from the rename to 0.5 s after /tasks shows the new version"},
        "artifact": {"weights_bytes": stats["weights_file_bytes"], "total_bytes": stats["total_bytes"], "tasks": stats["num_tasks"]},
        "swaps": rows,
        "rename_to_served_s": {"median": float(np.median([r["rename_to_served_s"] for r in rows])), "max": max(r["rename_to_served_s"] for r in rows)},
        "server_load_s": {"median": float(np.median([r["server_load_s"] for r in rows])), "max": max(r["server_load_s"] for r in rows)},
        "p50_ratio": ratio("p50"),
        "p99_ratio": ratio("p99"),
        "memory": mem,
        "counts": dict(counts, failed_requests=failed, requests=total),
    }


def markdown(doc: dict) -> str:
    s, a, m = doc["settings"], doc["artifact"], doc["memory"]
    mb = lambda b: f"{b / 2**20:.1f}" if b else "?"  # noqa: E731
    last = f"after swap {s['swaps']}"
    lines = [
        "# Swapping versions live",
        "",
        f"{s['swaps']} swaps of a {a['tasks']}-task artifact ({mb(a['total_bytes'])} MiB, weights {mb(a['weights_bytes'])} MiB), "
        f"polled every {s['poll_s']} s, {s['clients']} clients posting /predict throughout: "
        f"{doc['counts']['failed_requests']} of {doc['counts']['requests']} requests failed; {doc['counts']['swaps']:.0f} swaps, "
        f"{doc['counts']['refusals']:.0f} refusals counted by the server.",
        "",
        "| measure | median | max |",
        "|---|---:|---:|",
        f"| rename to served (s; includes waiting for the poll) | {doc['rename_to_served_s']['median']:.2f} | {doc['rename_to_served_s']['max']:.2f} |",
        f"| server load: verify + engine + warm-up (s) | {doc['server_load_s']['median']:.2f} | {doc['server_load_s']['max']:.2f} |",
        "",
        f"Latency during a swap against a steady window just before it ({s['pairs']} pairs, interleaved; median of paired ratios, 95 % bootstrap interval):",
        "",
        "| | ratio swap / steady [95 % interval] |",
        "|---|---:|",
        f"| p50 | {fmt_ratio(doc['p50_ratio'])} |",
        f"| p99 | {fmt_ratio(doc['p99_ratio'])} |",
        "",
        "| worker memory (MiB) | RSS | PSS |",
        "|---|---:|---:|",
    ]
    for k, v in m.items():
        lines.append(f"| {k} | {mb(v['worker_rss'])} | {mb(v['worker_pss'])} |")
    grow = (m[last]["worker_rss"] - m["after swap 1"]["worker_rss"]) / 2**20
    lines += ["", "Each reading with the clients stopped for 1.5 s; \"version 1 only\" before any request, \"after traffic\" "
              "once 4 clients have run 2 s (buffers and allocator arenas that requests grow).",
              "", f"RSS after swap {s['swaps']} minus after swap 1: {grow:+.1f} MiB (a version kept alive would add about its "
              f"engine, at least the {mb(a['weights_bytes'])} MiB of weights, per swap).",
              "The rise from \"after traffic\" to \"after swap 1\" does not repeat with later swaps: it is the allocator's high-water "
              "mark from holding two versions while the new one loads (and the loader thread's own malloc arena); the old "
              "engine itself is freed (tests/test_live.py::test_swapped_out_engine_is_freed checks that nothing refers to it).",
              "", "The machine was idle (nothing else ran)." if s.get("idle_machine") else "The machine was shared with other work while measuring."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--art", type=Path, help="an exported artifact to swap copies of (default: build a small one)")
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--results", type=Path, help="results directory (default benchmarks/results)")
    p.add_argument("--idle", action="store_true", help="the record says the machine was idle (default: shared with other work)")
    a = p.parse_args(argv)
    doc = run(a.art, a.swaps, min(a.pairs, a.swaps), a.results, a.idle)
    print(markdown(doc))


if __name__ == "__main__":
    main()
