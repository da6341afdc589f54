"""``mutask export``: an evolved system to a deployable artifact (see ``export/FORMAT.md``).

:func:`export_system` builds the artifact in a temp directory next to ART and renames it into
place at the end (an existing ART is replaced only with ``force``), in these steps:

1. :mod:`export.weights`: ``weights.safetensors``, every unique tensor of the components the
   tasks' best paths use, once;
2. :mod:`export.segments` cuts the paths into segments; :mod:`export.graphs` writes one ONNX
   graph per segment and one per task (its segment chain composed), all reading their
   weights from ``weights.safetensors`` as external data;
3. :mod:`export.parity`: ONNX Runtime against PyTorch per task, and every segment chain
   against its task graph; a failure writes nothing;
4. ``manifest.json``: a :class:`export.manifest.Manifest` (entries from
   :mod:`export.entries`), which the artifact reader must accept before the commit.

With ``bentoml_model`` the finished artifact is also copied into BentoML's model store.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile

import torch

from mutask.errors import MutaskError

from .artifact import load_artifact, sha256_file
from .entries import component_entries, created, graph_files, root_record, segment_entries, task_entries
from .graphs import graph_file_names, write_segment_graphs, write_task_graph
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, Manifest, Parity, content_digest
from .parity import check_parity, load_task_data
from .segments import plan_segments
from .chain import ATOL, MIN_ARGMAX_AGREEMENT
from .verify import DEFAULT_SAMPLES
from .weights import write_weights

log = logging.getLogger("mutask")

__all__ = ["export_system"]


def _cpu_module(m: torch.nn.Module) -> torch.nn.Module:
    if any(p.device.type != "cpu" for p in list(m.parameters()) + list(m.buffers())):
        m = copy.deepcopy(m).to("cpu")
    return m.eval()


def _check_out(out: pathlib.Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        raise MutaskError(f"ART {str(out)!r} exists; mutask never writes over it without --force. Choose a new --out, or add --force to replace it.")
    if not out.is_dir() or not (out / MANIFEST).is_file():
        raise MutaskError(f"ART {str(out)!r} exists and is not a mutask artifact (no {MANIFEST}); refusing to replace it even with --force. Choose a new --out.")


def _commit(tmp: pathlib.Path, out: pathlib.Path, force: bool) -> None:
    """Rename the finished temp dir into place; an old ART (with --force) is moved aside
    first and removed only once the new one is in place."""
    _check_out(out, force)
    backup = None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        backup = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        backup.rmdir()
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _seal(tmp: pathlib.Path) -> None:
    """Give the artifact's files the permissions the umask asks for and flush them to disk."""
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.chmod(tmp, 0o777 & ~umask)


def sealed_json(manifest: Manifest) -> str:
    """The manifest as written: ``manifest_sha256`` set to the digest of everything else in it,
    as a reader parses it back (:meth:`Manifest.load` refuses a manifest edited after export)."""
    doc = json.loads(manifest.model_copy(update={"manifest_sha256": ""}).model_dump_json(indent=1))
    return manifest.model_copy(update={"manifest_sha256": content_digest(doc)}).model_dump_json(indent=1)


def export_system(
    system, out, *, data=None, force: bool = False, bentoml_model: str | None = None, parity_samples: int = DEFAULT_SAMPLES, show_progress: bool = True,
) -> pathlib.Path:
    """Export ``system`` (an :class:`evolve.state.System`) to the artifact directory ``out``.

    ``data``: optional task -> :class:`evolve.data.TaskData` for the parity check (default:
    each task loaded from the spec and seed its STATE records). Raises :class:`MutaskError`
    (and writes nothing at ``out``) on an existing ``out`` without ``force``, or on a
    parity failure. Returns the artifact path."""
    out = pathlib.Path(out)
    tasks = list(system.best)
    if not tasks:
        raise MutaskError("the STATE has no finished task: evolve at least one task (`mutask evolve --task ...`) before exporting.")
    _check_out(out, force)
    if bentoml_model is not None:
        _check_bento_name(bentoml_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        paths = {t: system.best_path(t) for t in tasks}
        used = list(dict.fromkeys(c for t in tasks for c in paths[t].components))
        modules = {cid: _cpu_module(system.store[cid].module) for cid in used}
        weights = write_weights(modules, tmp / WEIGHTS)

        segments, chains = plan_segments({t: [(cid, paths[t].image_size) for cid in paths[t].components] for t in tasks})
        task_files, segment_files = graph_file_names(tasks, list(segments))
        seg_graphs = write_segment_graphs(segments, paths, modules, weights.byte_ranges, tmp, segment_files, show_progress=show_progress)
        for t in tasks:
            write_task_graph(t, chains[t], seg_graphs, tmp / task_files[t])

        task_data = load_task_data(system, tasks, data)
        parity = check_parity(
            system, paths, modules, chains, {t: tmp / f for t, f in task_files.items()}, {s: tmp / f for s, f in segment_files.items()},
            task_data, out=out, samples=parity_samples, show_progress=show_progress,
        )

        manifest = Manifest(
            weights_sha256=sha256_file(weights.path),
            weights_bytes=weights.path.stat().st_size,
            unique_param_bytes=weights.unique_bytes,
            graphs=graph_files(tmp, [*task_files.values(), *segment_files.values()]),
            root=root_record(system),
            tasks=task_entries(system, paths, modules, chains, seg_graphs, task_files, task_data),
            components=component_entries(system, paths, weights),
            segments=segment_entries(segments, seg_graphs, segment_files),
            parity=Parity(atol=ATOL, min_argmax_agreement=MIN_ARGMAX_AGREEMENT, provider="CPUExecutionProvider", tasks=parity),
            created=created(started),
        )
        (tmp / MANIFEST).write_text(sealed_json(manifest))
        load_artifact(tmp, verify=True)  # the reader accepts what we wrote

        _seal(tmp)
        if bentoml_model is not None:
            _store_bento(tmp, bentoml_model, manifest)
        _commit(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- BentoML


def _check_bento_name(name: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?", name.split(":", 1)[0]):
        raise MutaskError(f"--bentoml-model {name!r} is not a valid BentoML model name: lowercase letters, digits, '.', '_' and '-' (at most 63 characters).")


def _store_bento(art_dir: pathlib.Path, name: str, manifest: Manifest):
    """Copy the artifact's files into a new BentoML model ``name`` (BENTOML_HOME's store)."""
    try:
        import bentoml
    except ImportError as e:
        raise MutaskError(f"--bentoml-model needs BentoML installed ({e}). `pip install bentoml`, or drop --bentoml-model.") from e
    labels = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    metadata = {
        "format_version": FORMAT_VERSION,
        "tasks": {t: {"labels": entry.labels, "image_size": entry.image_size} for t, entry in manifest.tasks.items()},
        "weights_sha256": manifest.weights_sha256,
    }
    try:
        with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
            dest = pathlib.Path(model.path)
            for f in art_dir.iterdir():
                shutil.copy2(f, dest / f.name)
    except MutaskError:
        raise
    except Exception as e:
        raise MutaskError(f"BentoML could not store model {name!r} ({e}); nothing was written. Check --bentoml-model and BENTOML_HOME.") from e
    log.info("stored in BentoML's model store as %s", model.tag)
    return model.tag
