"""Export benchmark: artifact bytes against unique parameter bytes and the naive alternative.

    python -m mutask.benchmarks.export_bench STATE [--out ART] [--results DIR]

Exports STATE (parity check included, as `mutask export` always runs it), then writes
``results/export.json`` and ``results/export.md``: total artifact bytes and their ratio to
the unique parameter bytes, graph bytes, the naive alternative (one full model file per task:
the sum over tasks of the bytes of the tensors the task's path uses), export wall time, the
parity figures, and machine facts. Without --out the artifact goes to a temp dir, removed after.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mutask.benchmarks.common import machine, write


def run(state, out=None, results_dir=None, show_progress=True) -> dict:
    from mutask.evolve.state import System
    from mutask.export.artifact import artifact_stats, load_artifact
    from mutask.export.build import export_system

    tmp = None
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="mutask-export-bench-"))
        out = tmp / "art"
    try:
        t0 = time.perf_counter()
        system = System.load(state)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        export_system(system, out, force=True, show_progress=show_progress)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        art = load_artifact(out, verify=True)
        t_verify = time.perf_counter() - t0
        st = artifact_stats(out)
        m = art.manifest.model_dump(mode="json")
        tasks = {}
        for t, rec in m["tasks"].items():
            par = m["parity"]["tasks"][t]
            tasks[t] = {
                "params": rec["params"],
                "accounted_params": rec["accounted_params"],
                "param_bytes": st["task_param_bytes"][t],
                "graph_bytes": m["graphs"][rec["graph"]]["bytes"],
                "segments": rec["segments"],
                "image_size": rec["image_size"],
                "parity_inputs": par["inputs"],
                "parity_examples": par["examples"],
                "onnx_vs_torch_max_abs_diff": par["onnx_vs_torch_max_abs_diff"],
                "onnx_vs_torch_argmax_agreement": par["onnx_vs_torch_argmax_agreement"],
                "chain_vs_graph_max_abs_diff": par["chain_vs_graph_max_abs_diff"],
            }
        doc = {
            "state": str(state),
            "root": m["root"]["source"],
            "num_tasks": st["num_tasks"],
            "num_segments": st["num_segments"],
            "num_components": len(m["components"]),
            "bytes": {k: v for k, v in st.items() if k not in ("task_param_bytes", "num_tasks", "num_segments", "num_graphs")},
            "naive_over_artifact": st["naive_over_total"],
            "seconds": {"load_state": round(t_load, 2), "export_with_parity": round(t_export, 2), "load_artifact_verify": round(t_verify, 2)},
            "tasks": tasks,
            "machine": machine(),
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _write(doc, results_dir)
    return doc


def _table(doc: dict) -> str:
    b = doc["bytes"]
    mb = lambda x: f"{x / 1e6:,.2f} MB"  # noqa: E731
    lines = [
        f"# Export: {doc['num_tasks']} tasks, {doc['num_segments']} segments, {doc['num_components']} components (root {doc['root']})",
        "",
        "| quantity | bytes | |",
        "|---|---:|---|",
        f"| unique parameter bytes (tensors in weights.safetensors) | {b['unique_param_bytes']:,} | {mb(b['unique_param_bytes'])} |",
        f"| weights.safetensors | {b['weights_file_bytes']:,} | header {b['weights_file_bytes'] - b['unique_param_bytes']:,} B |",
        f"| graphs ({doc['num_tasks']} task + {doc['num_segments']} segment files) | {b['graph_bytes']:,} | tasks {b['task_graph_bytes']:,}, segments {b['segment_graph_bytes']:,} |",
        f"| manifest.json | {b['manifest_bytes']:,} | |",
        f"| **artifact total** | **{b['total_bytes']:,}** | **{b['ratio_total_to_unique']:.4f} x unique** |",
        f"| naive: one full model file per task | {b['naive_bytes']:,} | {doc['naive_over_artifact']:.2f} x the artifact |",
        "",
        f"Export wall time including parity: {doc['seconds']['export_with_parity']:.1f} s "
        f"(STATE load {doc['seconds']['load_state']:.1f} s; verifying load of the artifact {doc['seconds']['load_artifact_verify']:.2f} s).",
        "",
        "| task | size | params | accounted | path bytes | task graph | chain | parity on | max abs diff (ONNX vs torch) | arg-max agreement | chain vs graph |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for t, r in doc["tasks"].items():
        lines.append(
            f"| {t} | {r['image_size']} | {r['params']:,} | {r['accounted_params']:,.0f} | {r['param_bytes']:,} | {r['graph_bytes']:,} | "
            f"{'+'.join(r['segments'])} | {r['parity_examples']} {r['parity_inputs']} | {r['onnx_vs_torch_max_abs_diff']:.2e} | "
            f"{r['onnx_vs_torch_argmax_agreement']:.4f} | {r['chain_vs_graph_max_abs_diff']:.2e} |"
        )
    return "\n".join(lines)


def _write(doc: dict, results_dir=None) -> None:
    write("export", doc, _table(doc), results_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.export_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state", help="STATE directory to export")
    p.add_argument("--out", help="keep the artifact here (replaced if it is one); default: a temp dir, removed")
    p.add_argument("--results", help="results directory (default benchmarks/results)")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    from mutask.errors import MutaskError

    try:
        doc = run(a.state, a.out, a.results, show_progress=not a.quiet)
    except MutaskError as e:
        print(f"export_bench: error: {e}", file=sys.stderr)
        return 2
    print(_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
