"""Scale: evolve and export on a real-size root and on large image folders.

    python -m mutask.benchmarks.scale_bench [--images 10000,20000] [--folder-root DIR] [--root timm:vit_small_patch16_224]
    python -m mutask.benchmarks.scale_bench --cache-only --images 2000 --folder-root DIR

Every run a separate ``mutask`` process under ``/usr/bin/time -v`` (wall, peak RSS), budget tiny:
1. per N in ``--images``: a generated ImageFolder of N JPEGs of 500 x 375 (4 classes, deleted
   after), evolved on ``--folder-root`` (default: the default root) and exported; bytes against
   one model file per task;
2. ``--root`` (random init) on 4 embedded tasks at 224 px, evolved and exported the same way;
3. one child's training (head only) on the first folder read from its disk cache against the
   same images in memory, :func:`harness.interleave` pairs. ``--cache-only``: just this,
   replacing that part of the existing record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from mutask.benchmarks import harness

EMBEDDED = ("digits", "latin", "shapes", "textures")
CLASSES = 4
WIDTH, HEIGHT = 500, 375


def _make_images(args) -> None:
    """A block of JPEGs: noise plus a class-dependent band, so the task is learnable."""
    from PIL import Image

    root, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        c, band = i % CLASSES, HEIGHT // CLASSES
        img = (rng.random((HEIGHT, WIDTH, 3)) * 120).astype(np.uint8)
        img[c * band : (c + 1) * band] += 100
        Image.fromarray(img).save(root / f"class{c}" / f"{i:06d}.jpg", quality=85)


def make_folder(root: Path, n: int) -> Path:
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    blocks = [(root, s, min(n, s + 500)) for s in range(0, n, 500)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_make_images, blocks))
    return root


def timed(cmd: list[str], env: dict) -> dict:
    """Run a command under /usr/bin/time -v: wall seconds, peak RSS (MiB), exit code."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(int(m.group(1)) / 1024, 1) if m else None}


def evolve_and_export(name: str, tasks: list[str], root: str, work: Path, env: dict, extra=()) -> dict:
    from mutask.export.sizes import artifact_stats

    mutask, state, art = [sys.executable, "-m", "mutask.cli"], work / f"{name}-state", work / f"{name}-art"
    ev = timed([*mutask, "evolve", *(a for t in tasks for a in ("--task", t)), "--root", root, "--budget", "tiny", "--out", str(state), "-q", *extra], env)
    ex = timed([*mutask, "export", str(state), "--out", str(art), "-q"], env)
    doc = json.loads((state / "state.json").read_text())
    rates = [h["train_images_per_s"] for h in doc["history"] if h.get("train_images_per_s")]
    rates = rates or [p["metrics"]["train_images_per_s"] for p in doc["paths"].values() if "train_images_per_s" in p.get("metrics", {})]
    st = artifact_stats(art)
    return {"tasks": tasks, "evolve": ev, "export": ex, "train_images_per_s_median": round(harness.median(rates), 1) if rates else None,
            "image_sizes": {t: doc["paths"][pid]["hparams"]["image_size"] for t, pid in doc["best"].items()},
            "artifact_bytes": st["total_bytes"], "naive_bytes": st["naive_bytes"],
            "artifact_over_naive": round(st["total_bytes"] / st["naive_bytes"], 3), "unique_param_bytes": st["unique_param_bytes"]}


def cached_vs_memory(folder: Path, root: str, repeats: int, steps: int) -> dict:
    """One child's training loop (head only) on the folder task read from its disk cache,
    against the same images held in memory (the cache's rows read into one array)."""
    from mutask.evolve import hparams as H
    from mutask.evolve.data import Split
    from mutask.evolve.model import PathModel
    from mutask.evolve.roots import load_root
    from mutask.evolve.state import System
    from mutask.evolve.tasks import load_task
    from mutask.evolve.train import train

    task = load_task(f"bench={folder}")
    r = load_root(root)
    system = System.new(r)
    pre = r.preprocessing.at(r.image_size)
    disk = task.train.resized(pre.image_size, resize=pre.resize)
    memory = Split(disk[np.arange(len(disk))], np.asarray(task.train.labels))
    tiny_val = Split(memory.images[:32], memory.labels[:32])  # the loops' one validation, kept small
    hp = dict(H.defaults(pre.image_size, r.depth), crop_area_min=1.0, flip=False, color_jitter=0.0)

    def loop(split):
        def run(i: int) -> float:
            model = PathModel.from_store(system.store, system.root_path)
            params = list(model.steps[-1].parameters())
            for p in params:
                p.requires_grad_(True)
            return train(model, params, split, tiny_val, hp, pre=pre, steps=steps, batch_size=32, validations=1, seed=max(i, 0)).images_per_s
        return run

    runs = harness.interleave({"disk cache": loop(task.train), "in memory": loop(memory)}, repeats, warmup=1)
    return {"root": root, "images": len(disk), "steps": steps, "repeats": repeats, "images_per_s": {k: round(harness.median(v), 1) for k, v in runs.items()},
            "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}, "ratio": harness.paired_ratio(runs["disk cache"], runs["in memory"])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.scale_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="10000,20000", help="folder sizes to run (default 10000,20000)")
    p.add_argument("--root", default="timm:vit_small_patch16_224", help="the real-size root of the embedded run (default timm:vit_small_patch16_224, random init)")
    p.add_argument("--folder-root", help="the root of the folder runs (default: the default root, pretrained on first use)")
    p.add_argument("--skip-embedded", action="store_true", help="skip the 4 embedded tasks at 224 px")
    p.add_argument("--throughput-steps", type=int, default=10, help="steps per training-throughput run (default 10)")
    p.add_argument("--repeats", type=int, default=harness.MIN_PAIRS, help=f"pairs of the throughput comparison (default {harness.MIN_PAIRS})")
    p.add_argument("--cache-only", action="store_true", help="only the cache comparison (3.), replacing it in the existing record")
    p.add_argument("--workdir", type=Path, help="where the folders, STATEs and artifacts go (default: a temp dir, removed)")
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    a = p.parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="mutask-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", MUTASK_CACHE=str(work / "cache"))
    os.environ["MUTASK_CACHE"] = env["MUTASK_CACHE"]
    if a.folder_root is None:
        from mutask.evolve.pretrain import toy_root, toy_root_dir

        toy_root()
        a.folder_root = str(toy_root_dir())
    sizes = [int(x) for x in a.images.split(",") if x]
    doc = json.loads((a.results / "scale.json").read_text()) if a.cache_only else \
        {"benchmark": "scale", "root": a.root, "folder_root": a.folder_root, "budget": "tiny", "repeats": 1, "folders": {}}
    try:
        for n in sizes[:1] if a.cache_only else sizes:
            folder = make_folder(work / f"photos-{n}", n)
            if not a.cache_only:
                disk = sum(f.stat().st_size for f in folder.rglob("*.jpg"))
                doc["folders"][n] = {"jpeg_bytes": disk, **evolve_and_export(f"folder{n}", [f"photos={folder}"], a.folder_root, work, env)}
                print(doc["folders"][n], flush=True)
            if n == sizes[0]:
                doc["cached_vs_memory"] = dict(cached_vs_memory(folder, a.folder_root, a.repeats, a.throughput_steps), machine=harness.machine())
                print(doc["cached_vs_memory"], flush=True)
            shutil.rmtree(folder)
        if not (a.skip_embedded or a.cache_only):
            doc["embedded_224"] = evolve_and_export("embedded", list(EMBEDDED), a.root, work, env, extra=("--image-size", "224"))
            print(doc["embedded_224"], flush=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    harness.write_record("scale", doc, table(doc), a.results)
    print(table(doc))


def table(doc: dict) -> str:
    lines = [
        f"Folders on the root {doc['folder_root']}; embedded tasks on {doc['root']}{' (random init)' if doc['root'].startswith('timm:') else ''}. "
        "Budget tiny; every run a separate `mutask` process under `/usr/bin/time -v`; one run each.",
        "",
        "| run | evolve wall (s) | evolve peak RSS (MiB) | children's train images/s (median) | export wall (s) | export peak RSS (MiB) | artifact bytes | one model file per task | artifact / naive |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = [(f"folder of {int(n):,} JPEGs 500x375 ({r['jpeg_bytes'] / 1e6:.0f} MB), at {'/'.join(map(str, set(r['image_sizes'].values())))} px", r) for n, r in doc["folders"].items()]
    if "embedded_224" in doc:
        runs.append((f"4 embedded tasks at 224 px ({', '.join(doc['embedded_224']['tasks'])})", doc["embedded_224"]))
    for label, r in runs:
        lines.append(
            f"| {label} | {r['evolve']['wall_s']} | {r['evolve']['peak_rss_mib']} | {r['train_images_per_s_median']} | {r['export']['wall_s']} | "
            f"{r['export']['peak_rss_mib']} | {r['artifact_bytes']:,} | {r['naive_bytes']:,} | {r['artifact_over_naive']} |"
        )
    if "cached_vs_memory" in doc:
        c = doc["cached_vs_memory"]
        ratio = harness.fmt_ratio(c["ratio"]) if isinstance(c["ratio"], dict) else f"{c['ratio']} (ratio of the medians)"
        where = f" ({c['images']:,} training images, root {c['root']})" if "images" in c else ""
        lines += [
            "",
            f"Training on the folder task{where}, images read from the disk cache "
            f"against the same images in memory ({c['steps']} steps of batch 32, head only, {c['repeats']} interleaved repeats, medians):",
            "",
            "| images from | images/s | paired ratio |",
            "|---|---:|---:|",
            f"| in memory | {c['images_per_s']['in memory']} | 1.00 |",
            f"| disk cache | {c['images_per_s']['disk cache']} | {ratio} |",
        ]
        if c.get("machine"):
            lines += ["", f"This comparison was measured apart from the runs above. {c.get('note', '')} {harness.machine_line(c['machine'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
