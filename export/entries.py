"""The manifest's entries for one export, built from the evolved system as the typed records of
:mod:`export.manifest` (the schema the readers validate against)."""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform

from mutask.preprocessing import Preprocessing

from .graphs import SegmentGraph
from .manifest import ComponentEntry, Created, GraphFile, RootRecord, SegmentEntry, TaskEntry, TaskMetrics
from .weights import WeightsFile

__all__ = ["component_entries", "created", "graph_files", "root_record", "segment_entries", "task_entries", "task_preprocessing"]

EXPORTER = "torch.onnx.export(dynamo=True) + onnxscript optimizer, no folding through parameters"


def _labels(system, task: str, task_data, num_classes: int) -> list[str]:
    """The class names the STATE records, else the task data's, else ``"0" .. "C-1"``."""
    labels = (system.tasks.get(task) or {}).get("class_names")
    if not labels and task_data is not None:
        labels = list(task_data.class_names)
    if not labels or len(labels) != num_classes:
        labels = [str(i) for i in range(num_classes)]
    return list(labels)


def task_preprocessing(system, path) -> Preprocessing:
    """A task's preprocessing: the root's (mean, std, resize filter) at its path's image size.
    The manifest records it and the parity check preprocesses with it."""
    return system.root.preprocessing.at(path.image_size)


def task_entries(system, paths: dict, modules: dict, chains: dict, segment_graphs: dict[str, SegmentGraph],
                 task_files: dict, task_data: dict) -> dict[str, TaskEntry]:
    """Task -> its entry. ``paths``: task -> TaskPath; ``modules``: component id -> module (the
    head's ``out_features`` is the class count); ``task_data``: task -> TaskData or None."""
    out = {}
    for t, p in paths.items():
        record = system.tasks.get(t) or {}
        num_classes = int(modules[p.components[-1]].out_features)
        out[t] = TaskEntry(
            graph=task_files[t],
            labels=_labels(system, t, task_data.get(t), num_classes),
            num_classes=num_classes,
            image_size=p.image_size,
            input_shape=segment_graphs[chains[t][0]].input_shape,
            output_shape=segment_graphs[chains[t][-1]].output_shape,
            preprocessing=task_preprocessing(system, p),
            params=system.path_params(p.components),
            accounted_params=system.accounted_params(p.components, t),
            components=list(p.components),
            segments=list(chains[t]),
            metrics=TaskMetrics(val_accuracy=p.metrics.get("val_accuracy"), test_accuracy=p.metrics.get("test_accuracy")),
            spec=record.get("spec", t),
            seed=record.get("seed", 0),
            path=p.id,
            hparams=p.hparams,
        )
    return out


def component_entries(system, paths: dict, weights: WeightsFile) -> dict[str, ComponentEntry]:
    """Component id -> its entry, for every component in ``weights`` (in its order)."""
    store = system.store
    return {
        cid: ComponentEntry(
            name=store[cid].name,
            root=bool(store[cid].root),
            tensors=list(dict.fromkeys(tensor_map.values())),
            tensor_map=tensor_map,
            num_params=store[cid].num_params,
            sha256=weights.component_sha256[cid],
            used_by=[t for t, p in paths.items() if cid in p.components],
        )
        for cid, tensor_map in weights.tensor_maps.items()
    }


def segment_entries(segments: dict, segment_graphs: dict[str, SegmentGraph], segment_files: dict) -> dict[str, SegmentEntry]:
    """Segment id -> its entry; ``segments`` as :func:`export.segments.plan_segments` returns them."""
    return {
        sid: SegmentEntry(
            graph=segment_files[sid],
            components=seg["components"],
            tasks=seg["tasks"],
            parents=seg["parents"],
            input=seg["input"],
            output=seg["output"],
            image_size=seg["image_size"],
            input_shape=segment_graphs[sid].input_shape,
            output_shape=segment_graphs[sid].output_shape,
        )
        for sid, seg in segments.items()
    }


def graph_files(directory: pathlib.Path, names: list[str]) -> dict[str, GraphFile]:
    """File name -> its sha256 and size, for the graph files in ``directory``."""
    out = {}
    for name in names:
        data = (directory / name).read_bytes()
        out[name] = GraphFile(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    return out


def root_record(system) -> RootRecord:
    spec = json.loads(json.dumps(system.root.spec, default=str))  # JSON values only
    return RootRecord(source=system.root.source, root_params=system.root_params, spec=spec)


def created(started) -> Created:
    """Provenance: when the export started (a timezone-aware datetime) and the versions it ran with."""
    import onnxruntime
    import torch

    from mutask import __version__

    return Created(
        at=started.isoformat(timespec="seconds"),
        mutask=__version__,
        torch=torch.__version__,
        onnxruntime=onnxruntime.__version__,
        python=platform.python_version(),
        exporter=EXPORTER,
    )
