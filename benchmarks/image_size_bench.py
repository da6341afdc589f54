"""Which image size the default root (ImageNet EfficientNet-Lite0) should start tasks at.

A short probe, not a training run: the root's frozen features (global-average-pooled output of
its last convolution, as timm's ``forward_head(pre_logits=True)``) at 32 / 64 / 96 px, a
ridge-classifier linear probe (standardised features) fitted on each task's train split (at most
800 images) and scored on its test split (at most 300),
and the cost of the frozen forward (images/s, all splits, batch 128). The suite's images are
32 x 32, so larger sizes upsample (bicubic, the root's own filter): what changes is how well the
ImageNet features, trained at 224 px, fit objects of that many pixels.

    python -m mutask.benchmarks.image_size_bench [--tasks latin orientation counting] [--results DIR]

Writes image-size.{json,md} in benchmarks/results.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SIZES = (32, 64, 96)
TASKS = ("latin", "orientation")


def features(model, images: np.ndarray, pre, batch: int = 128) -> tuple[np.ndarray, float]:
    import torch

    from mutask.evolve.train import model_input

    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = model_input(images[i : i + batch], pre)
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(out), time.perf_counter() - t0


def subset(split, cap: int, seed: int = 0):
    """At most ``cap`` images of ``split`` (a fixed random choice): the probe is about ranking sizes."""
    from mutask.evolve.data import Split

    if len(split) <= cap:
        return split
    idx = np.sort(np.random.default_rng(seed).choice(len(split), cap, replace=False))
    return Split(split.images[idx], np.asarray(split.labels)[idx])


def probe(task: str, model, root_spec: dict, size: int, train_cap: int, test_cap: int) -> dict:
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    from mutask.evolve.roots.base import root_preprocessing
    from mutask.evolve.tasks import load_task
    from mutask.evolve.train import split_images

    data = load_task(task)
    train, test = subset(data.train, train_cap), subset(data.test, test_cap, seed=1)
    pre = root_preprocessing(root_spec, size, "efficientnet-lite0")
    tr_x, tr_s = features(model, split_images(train, pre), pre)
    te_x, te_s = features(model, split_images(test, pre), pre)
    scaler = StandardScaler().fit(tr_x)
    t0 = time.perf_counter()
    clf = RidgeClassifier(alpha=100.0).fit(scaler.transform(tr_x), train.labels)
    fit_s = time.perf_counter() - t0
    acc = float(clf.score(scaler.transform(te_x), test.labels))
    n = len(tr_x) + len(te_x)
    return {"task": task, "size": size, "test_accuracy": acc, "chance": 1 / data.num_classes,
            "images": n, "forward_s": round(tr_s + te_s, 2), "images_per_s": round(n / (tr_s + te_s), 1), "probe_fit_s": round(fit_s, 2)}


def decision(mean: dict, sizes: list[int]) -> str:
    """The choice this probe supports, in words (the compute of a CNN grows with the pixels)."""
    lines = ["Choice: new tasks on the EfficientNet-Lite roots start at 64 px (evolve/config.py REAL_ROOT_IMAGE_SIZE)."]
    if {32, 64, 96} <= set(sizes):
        lines.append(
            f"64 px gains {mean[64] - mean[32]:+.3f} mean probe accuracy over 32 px (4x the pixels); 96 px adds only "
            f"{mean[96] - mean[64]:+.3f} more for 2.25x the pixels of 64 px, which the 15-minute demo on 2 CPU cores "
            "cannot afford. On a GPU, pass --image-size 96 or larger (docs/gpu.md); muNet's mutations also move the size per task.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    p.add_argument("--train-cap", type=int, default=800, help="train images per task at most (default 800)")
    p.add_argument("--test-cap", type=int, default=300, help="test images per task at most (default 300)")
    p.add_argument("--results", help="results directory (default benchmarks/results)")
    a = p.parse_args(argv)
    import torch

    from mutask.benchmarks.harness import write_record
    from mutask.cores import available_cores
    from mutask.evolve.roots.efficientnet_lite import load_real_root

    torch.set_num_threads(available_cores())
    spec, model = load_real_root("efficientnet-lite0")
    rows = []
    for task in a.tasks:
        for size in a.sizes:  # sizes interleaved within a task, so drifting load hits each alike
            r = probe(task, model, spec, size, a.train_cap, a.test_cap)
            print(r, flush=True)
            rows.append(r)
    table = ["| task | " + " | ".join(f"{s} px acc" for s in a.sizes) + " | " + " | ".join(f"{s} px img/s" for s in a.sizes) + " |",
             "|---|" + "---:|" * (2 * len(a.sizes))]
    for task in a.tasks:
        mine = {r["size"]: r for r in rows if r["task"] == task}
        table.append(f"| {task} (chance {mine[a.sizes[0]]['chance']:.3f}) | " + " | ".join(f"{mine[s]['test_accuracy']:.3f}" for s in a.sizes)
                     + " | " + " | ".join(f"{mine[s]['images_per_s']:.0f}" for s in a.sizes) + " |")
    mean = {s: float(np.mean([r["test_accuracy"] for r in rows if r["size"] == s])) for s in a.sizes}
    rate = {s: float(np.median([r["images_per_s"] for r in rows if r["size"] == s])) for s in a.sizes}
    table.append("| mean / median | " + " | ".join(f"{mean[s]:.3f}" for s in a.sizes) + " | " + " | ".join(f"{rate[s]:.0f}" for s in a.sizes) + " |")
    md = "\n".join([
        "# Image size for the default root (ImageNet EfficientNet-Lite0, frozen)",
        "",
        f"Linear probe (ridge classifier on the standardised pooled features of the frozen root) fitted on at most {a.train_cap} train images",
        f"per task, test accuracy on at most {a.test_cap} test images; images/s: the frozen forward over train + test (batch 128, "
        f"{torch.get_num_threads()} threads). The suite's 32 px images are upsampled (bicubic).",
        "The machine was shared with other work while measuring (other helpers' jobs on the same 2 cores), so the",
        "images/s column is noisy; the accuracies are not.",
        "",
        *table,
        "",
        decision(mean, a.sizes),
    ])
    write_record("image-size", {"rows": rows, "mean_accuracy": mean, "median_images_per_s": rate, "decision": decision(mean, a.sizes)}, md, a.results)
    print(md)


if __name__ == "__main__":
    main()
