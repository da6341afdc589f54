"""Byte accounting of an artifact (``mutask export``, the demo and the benchmarks report it;
the server does not ship it)."""

from __future__ import annotations

from .artifact import MANIFEST, load_artifact, read_safetensors_header


def artifact_stats(path) -> dict:
    """Byte accounting of an artifact: files, unique tensor bytes, and the naive alternative
    (one full model file per task: the sum over tasks of the bytes of the tensors its path uses)."""
    art = load_artifact(path, verify=False)
    _, header = read_safetensors_header(art.weights_path)
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    unique = sum(nbytes.values())
    graphs = {n: (art.path / n).stat().st_size for n in art.manifest.graph_files()}
    manifest_bytes = (art.path / MANIFEST).stat().st_size
    weights_bytes = art.weights_path.stat().st_size
    naive = 0
    per_task = {}
    for t, rec in art.tasks.items():
        b = sum(nbytes[k] for cid in dict.fromkeys(rec.components) for k in art.components[cid].tensors)
        per_task[t] = b
        naive += b
    total = weights_bytes + sum(graphs.values()) + manifest_bytes
    return {
        "total_bytes": total,
        "weights_file_bytes": weights_bytes,
        "unique_param_bytes": unique,
        "graph_bytes": sum(graphs.values()),
        "task_graph_bytes": sum(graphs[t.graph] for t in art.tasks.values()),
        "segment_graph_bytes": sum(graphs[s.graph] for s in art.segments.values()),
        "manifest_bytes": manifest_bytes,
        "ratio_total_to_unique": total / unique if unique else float("nan"),
        "naive_bytes": naive,
        "naive_over_total": naive / total if total else float("nan"),
        "task_param_bytes": per_task,
        "num_tasks": len(art.tasks),
        "num_segments": len(art.segments),
        "num_graphs": len(graphs),
    }
