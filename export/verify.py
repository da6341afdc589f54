"""Checking an artifact on its own (``mutask export --verify-only ART``), without torch.

:func:`verify_artifact` runs :func:`export.artifact.load_artifact` (format version, every
file present, weights and graph sha256, every external-data reference on exactly one tensor
of the weights file), then, per task, its graph against its segment chain in ONNX Runtime on
the task's test images (loaded from the spec and seed the manifest records, preprocessed by
the task's preprocessing as the manifest records it), or on random inputs when the data cannot be loaded (and says so).
"""

from __future__ import annotations

import logging

import numpy as np

from mutask.preprocessing import Preprocessing

from .artifact import ArtifactError, load_artifact, reexport_hint
from .chain import ATOL, chain_vs_graph, ort_session

log = logging.getLogger("mutask")

BATCH = 32
DEFAULT_SAMPLES = 256  # images per task a check runs (0: the whole test split)


def sample_rows(n: int, samples: int) -> np.ndarray:
    """``samples`` row indices of ``n``, evenly spaced (all rows when ``samples`` is 0 or at
    least ``n``): the same rows every time, spread over the split."""
    if samples <= 0 or samples >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, samples).round().astype(np.int64))


class Batches:
    """A sample's input batches of at most :data:`BATCH` images: the sample is held as uint8
    pixels (a quarter of its float32 size; 38 MB for 256 images at 224 px) and each batch is
    normalised when it is read. Iterable any number of times."""

    def __init__(self, pixels: np.ndarray, pre: Preprocessing):
        self.pixels, self.pre = pixels, pre

    def __len__(self) -> int:
        return (len(self.pixels) + BATCH - 1) // BATCH

    def __iter__(self):
        for i in range(0, len(self.pixels), BATCH):
            yield self.pre.normalize(self.pixels[i : i + BATCH])


def sample_pixels(split, samples: int, size: int, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, their uint8 (len(rows), size, size, 3) pixels) of a bounded sample of ``split``
    (:func:`sample_rows`): an image folder's read from its disk cache (built first if need be;
    files that do not decode are not rows), an in-memory split's resized here, row by row, with
    the same :func:`resize_rgb` as the split's own ``resized`` (the rest is not resized)."""
    from mutask.preprocessing import resize_rgb

    if hasattr(split, "paths"):  # a FolderSplit: read through its (streaming) cache
        images = split.resized(size, resize=resize)
        rows = sample_rows(len(images), samples)
        return rows, np.asarray(images[rows]).reshape(len(rows), size, size, 3)
    rows = sample_rows(len(split), samples)
    if len(rows) == 0:
        return rows, np.zeros((0, size, size, 3), np.uint8)
    return rows, np.stack([resize_rgb(np.asarray(split.images[r], dtype=np.uint8), size, resize) for r in rows])


def split_batches(split, pre: Preprocessing, samples: int) -> tuple[Batches, np.ndarray, str]:
    """(input batches, their labels, a description) of a bounded sample of ``split``, read
    through the split's own (streaming) images and preprocessed by ``pre``."""
    rows, pixels = sample_pixels(split, samples, pre.image_size, pre.resize)
    n = len(split)
    labels = np.asarray(split.labels)[rows]
    batches = Batches(pixels, pre)
    source = "test split" if len(rows) == n else f"test split, {len(rows)} of {n} images evenly spaced"
    return batches, labels, source


def random_inputs(n: int, pre: Preprocessing, seed: int = 0) -> np.ndarray:
    """``n`` images of uniform random pixels, normalised by ``pre``: float32 (n, 3, S, S)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, pre.image_size, pre.image_size, 3), dtype=np.uint8)
    return pre.normalize(pixels)


def check_data(task: str, spec, seed: int, data: dict | None):
    """The task's TaskData: ``data[task]`` when given, else loaded from its ``spec`` and
    ``seed``; None (with a warning: the check then runs on random inputs) when it cannot be."""
    if data is not None and task in data:
        return data[task]
    try:
        from mutask.evolve.tasks import load_task

        return load_task(spec, seed=seed)
    except Exception as e:  # directory gone, unknown spec
        log.warning("task %s: its data cannot be loaded (%s); checking on random inputs", task, e)
        return None


def check_inputs(td, pre: Preprocessing, samples: int) -> tuple:
    """(batches, labels or None, description) a check runs: a bounded sample of the task's test
    split (:func:`split_batches`), or random inputs when there is none."""
    if td is not None and len(td.test):
        return split_batches(td.test, pre, samples)
    return [random_inputs(32, pre, seed=0)], None, "random inputs (test data unavailable)"


def _open(path):
    """:func:`ort_session`, with ONNX Runtime's refusal as an :class:`ArtifactError`."""
    try:
        return ort_session(path)
    except ImportError as e:
        raise ArtifactError(f"checking an artifact needs ONNX Runtime ({e}). `pip install onnxruntime`.") from None
    except Exception as e:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
        raise ArtifactError(f"{path}: ONNX Runtime cannot load this graph ({type(e).__name__}: {e}). {reexport_hint(path.parent)}") from None


def verify_artifact(path, data=None, *, samples: int = DEFAULT_SAMPLES, show_progress: bool = False, raise_on_failure: bool = True) -> dict:
    """Check an artifact's own consistency on ``samples`` test images per task (0: all); returns
    the report, raises :class:`ArtifactError` on any failure (with ``raise_on_failure``).
    One ONNX Runtime session is alive at a time."""
    from mutask.progress import bar

    art = load_artifact(path, verify=True)
    report = {"path": str(art.path), "integrity": "ok: format version, files, sha256, external-data references", "tasks": {}}
    for task in bar(iterable=list(art.tasks), desc="verify", unit="task", disable=not show_progress, leave=False):
        entry = art.tasks[task]
        batches, labels, source = check_inputs(check_data(task, entry.spec, entry.seed, data), entry.preprocessing, samples)
        try:
            got, cmp = chain_vs_graph(art.graph_path(task), [art.segment_path(sid) for sid in entry.segments], batches, _open)
        except ArtifactError:
            raise
        except Exception as e:  # onnxruntime's own exception types: a graph that loads but cannot run
            raise ArtifactError(f"task {task}: ONNX Runtime cannot run its graphs ({type(e).__name__}: {e}). {reexport_hint(art.path)}") from None
        rec = {
            "inputs": source,
            "examples": int(len(got)),
            "chain": list(entry.segments),
            "chain_vs_graph_max_abs_diff": cmp.max_abs_diff,
            "chain_vs_graph_argmax_agreement": cmp.argmax_agreement,
            "ok": cmp.ok and got.shape[1:] == (len(entry.labels),),
        }
        if labels is not None:
            rec["test_accuracy"] = float((got.argmax(1) == labels).mean())
            rec["recorded_test_accuracy"] = entry.metrics.test_accuracy
        report["tasks"][task] = rec
    bad = [t for t, r in report["tasks"].items() if not r["ok"]]
    report["ok"] = not bad
    if bad and raise_on_failure:
        lines = [
            f"  {t}: chain vs graph max |diff| {report['tasks'][t]['chain_vs_graph_max_abs_diff']:.3g}, "
            f"arg-max agreement {report['tasks'][t]['chain_vs_graph_argmax_agreement']:.4f}, outputs {len(art.tasks[t].labels)} labels"
            for t in bad
        ]
        raise ArtifactError(f"artifact {art.path} is inconsistent (segment chains must match task graphs within {ATOL:g} x the logits' scale):\n" + "\n".join(lines) + "\nRe-export it with `mutask export STATE --out ART --force`.")
    return report
