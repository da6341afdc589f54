"""Shared by the benchmarks: machine facts, medians, and writing JSON + a markdown table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for mod in ("torch", "timm", "onnxruntime", "bentoml", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return info


def serving_machine() -> dict:
    """Machine facts for the torch-free serving benchmarks: cores this process may use,
    ONNX Runtime and its providers, BentoML, numpy, Pillow."""
    import bentoml
    import numpy
    import onnxruntime
    import PIL

    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "bentoml": bentoml.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "torch": "not used (serving is torch-free)",
    }


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def write(name: str, doc: dict, table_md: str, results_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (the table plus machine info)."""
    d = Path(results_dir or RESULTS)
    d.mkdir(parents=True, exist_ok=True)
    doc = dict(doc, machine=doc.get("machine") or machine())
    (d / f"{name}.json").write_text(json.dumps(doc, indent=2))
    m = doc["machine"]
    footer = (
        f"\n\nMachine: {m.get('processor')} ({m.get('cpu_count')} cores), {m.get('platform')}; "
        f"python {m.get('python')}, torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}"
        + (f", GPU {m['cuda']}" if m.get("cuda") else "")
        + f". Recorded {m.get('date')}.\n"
    )
    (d / f"{name}.md").write_text(table_md.rstrip() + footer)
    return d / f"{name}.json", d / f"{name}.md"
