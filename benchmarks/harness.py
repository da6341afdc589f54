"""The one place where benchmarks repeat, summarise and record.

- :func:`times` times ``n`` calls of one function.
- :func:`interleave` runs variants in turn, ``n`` repeats, the order reversed every other
  repeat (A B, B A, A B, ...), so that drift on a shared machine hits every variant alike and
  repeat ``i`` of each variant forms a pair.
- :func:`paired_ratio` summarises two such series: the median of the per-pair ratios and its
  95 % interval by the method in :data:`METHOD` (a percentile bootstrap of the pairs, fixed
  seed, so a record re-renders to the same figures). Under :data:`MIN_PAIRS` pairs it gives no
  interval at all: 3 pairs cannot bound a median.
- :func:`machine` and :func:`machine_line`: the facts a record needs to be read later.
- :func:`write_record`: JSON + markdown, the machine line at the foot, for every benchmark.

Why not pyperf: its runner times one function per worker process and compares two finished
benchmarks as independent samples; here the variants are servers and training loops that must
alternate inside one run, and the comparison is per pair. The bootstrap below is a few lines of numpy.
Servers are started and stopped by :mod:`mutask.server_process`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MIN_PAIRS = 10
RESAMPLES = 10_000
METHOD = f"median of paired ratios; 95 % percentile bootstrap over the pairs ({RESAMPLES:,} resamples, seed 0)"
SHARED = "other work ran on this machine while this was measured"


def times(fn: Callable[[], object], n: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn()``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleave(variants: dict[str, Callable[[int], float]], n: int, warmup: int = 0) -> dict[str, list[float]]:
    """Call every ``variants[name](i)`` for repeats ``i = 0..n-1`` in turn, the order reversed on
    odd repeats; each call returns one figure. ``warmup`` untimed rounds first (i = -1)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name](-1)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names if i % 2 == 0 else names[::-1]:
            runs[name].append(float(variants[name](i)))
    return runs


def median(xs) -> float:
    return float(statistics.median(xs)) if len(xs) else float("nan")


def paired_ratio(num: list[float], den: list[float], seed: int = 0) -> dict:
    """``num[i] / den[i]`` per pair: their median, the pair count, and a 95 % bootstrap
    interval of that median (``low``/``high`` None under :data:`MIN_PAIRS` pairs)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long, non-empty series (got {len(num)} and {len(den)})")
    r = np.asarray(num, float) / np.asarray(den, float)
    out = {"median": float(np.median(r)), "pairs": len(r), "low": None, "high": None, "method": METHOD}
    if len(r) >= MIN_PAIRS:
        idx = np.random.default_rng(seed).integers(0, len(r), (RESAMPLES, len(r)))
        meds = np.median(r[idx], axis=1)
        out["low"], out["high"] = (float(x) for x in np.percentile(meds, [2.5, 97.5]))
    return out


def fmt_ratio(r: dict, digits: int = 2) -> str:
    """``1.05x [1.01, 1.09] (12 pairs)``, or ``1.05x (3 pairs, no interval)``."""
    head = f"{r['median']:.{digits}f}x"
    if r.get("low") is None:
        return f"{head} ({r['pairs']} pairs, no interval)"
    return f"{head} [{r['low']:.{digits}f}, {r['high']:.{digits}f}] ({r['pairs']} pairs)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpu() -> str | None:
    torch = sys.modules.get("torch")  # never imported here: torch-free benchmarks stay torch-free
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def machine(shared_machine: str | None = SHARED) -> dict:
    """CPU model, cores this process may use, memory, OS, Python, the versions of the libraries
    installed (read from their metadata, nothing imported), the GPU when torch is loaded and
    sees one, the UTC time, and ``shared_machine``: a note on what else ran (None: idle)."""
    versions = {}
    for name in ("torch", "timm", "onnxruntime", "bentoml", "numpy", "ray"):
        for dist in (name, f"{name}-gpu"):  # onnxruntime-gpu installs the module onnxruntime
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(), "cores": cores, "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(),
        "platform": platform.platform(), "python": platform.python_version(), **versions,
        "gpu": _gpu(), "shared_machine": shared_machine, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def machine_line(m: dict) -> str:
    """One markdown line for a record's foot. Also reads records written before this module
    (``processor``, ``cpu_count``, ``cuda``)."""
    cpu = m.get("cpu_model") or m.get("processor") or "unknown CPU"
    cores = m.get("cores") or m.get("cpu_affinity") or m.get("cpu_count")
    parts = [f"{cpu}, {cores} cores" + (f", {m['memory_gib']} GiB" if m.get("memory_gib") else "")]
    gpu = m.get("gpu") or m.get("cuda")
    if gpu:
        parts.append(f"GPU {gpu}")
    parts.append(str(m.get("platform")))
    libs = ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "onnxruntime", "bentoml") if m.get(k))
    parts.append(libs)
    shared = m.get("shared_machine", "not recorded")
    parts.append(f"shared machine: {shared or 'no, idle'}")
    return f"Machine: {'; '.join(parts)}. Recorded {m.get('date')}."


def commit_of(checkout) -> str | None:
    """The short commit a git checkout is at (None when it is not one)."""
    import subprocess

    rev = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return rev or None


def write_record(name: str, doc: dict, body_md: str, results_dir=None, *, shared_machine: str | None = SHARED) -> tuple[Path, Path]:
    """``<results_dir>/<name>.json`` (``doc`` plus ``machine``, this one's unless ``doc`` has
    it) and ``<name>.md`` (``body_md`` and the machine line). Returns both paths."""
    d = Path(results_dir or RESULTS)
    d.mkdir(parents=True, exist_ok=True)
    doc = dict(doc, machine=doc.get("machine") or machine(shared_machine))
    (d / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (d / f"{name}.md").write_text(body_md.rstrip() + "\n\n" + machine_line(doc["machine"]) + "\n")
    return d / f"{name}.json", d / f"{name}.md"


def rerender(name: str, results_dir=None) -> Path:
    """Rewrite ``<name>.md``'s machine line from its JSON (the body kept, figures untouched)."""
    d = Path(results_dir or RESULTS)
    doc = json.loads((d / f"{name}.json").read_text())
    body = "\n".join(line for line in (d / f"{name}.md").read_text().splitlines() if not line.startswith("Machine:"))
    return write_record(name, doc, body, d)[1]


if __name__ == "__main__":  # python -m mutask.benchmarks.harness NAME...: re-render records' machine lines
    for n in sys.argv[1:]:
        print(rerender(n))
