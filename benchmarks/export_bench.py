"""Export: artifact bytes against unique parameter bytes and one full model file per task.

    python -m mutask.benchmarks.export_bench STATE [--out ART] [--results DIR]

Exports STATE (its parity check included, as `mutask export` always runs it), loads the
artifact back with verification, and records bytes, wall times and each task's parity figures
(``export.json`` / ``export.md``). Without --out the artifact goes to a temp dir, removed after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from mutask.benchmarks import harness

PARITY = ("onnx_vs_torch_max_abs_diff", "onnx_vs_torch_argmax_agreement", "chain_vs_graph_max_abs_diff")


def run(state, out=None, results_dir=None, show_progress=True) -> dict:
    from mutask.evolve.state import System
    from mutask.export.artifact import artifact_stats, load_artifact
    from mutask.export.build import export_system

    with tempfile.TemporaryDirectory(prefix="mutask-export-bench-") as tmp:
        out = out or Path(tmp) / "art"
        seconds, t0 = {}, time.perf_counter()
        system = System.load(state)
        seconds["load_state"], t0 = round(time.perf_counter() - t0, 2), time.perf_counter()
        export_system(system, out, force=True, show_progress=show_progress)
        seconds["export_with_parity"], t0 = round(time.perf_counter() - t0, 2), time.perf_counter()
        m = load_artifact(out, verify=True).manifest.model_dump(mode="json")
        seconds["load_artifact_verify"] = round(time.perf_counter() - t0, 2)
        st = artifact_stats(out)
    tasks = {t: {**{k: rec[k] for k in ("params", "accounted_params", "segments", "image_size")},
                 "param_bytes": st["task_param_bytes"][t], "graph_bytes": m["graphs"][rec["graph"]]["bytes"],
                 "parity_inputs": m["parity"]["tasks"][t]["inputs"], "parity_examples": m["parity"]["tasks"][t]["examples"],
                 **{k: m["parity"]["tasks"][t][k] for k in PARITY}}
             for t, rec in m["tasks"].items()}
    doc = {"state": str(state), "root": m["root"]["source"], "num_tasks": st["num_tasks"], "num_segments": st["num_segments"],
           "num_components": len(m["components"]),
           "bytes": {k: v for k, v in st.items() if k not in ("task_param_bytes", "num_tasks", "num_segments", "num_graphs")},
           "naive_over_artifact": st["naive_over_total"], "seconds": seconds, "tasks": tasks}
    harness.write_record("export", doc, table(doc), results_dir)
    return doc


def table(doc: dict) -> str:
    b, s = doc["bytes"], doc["seconds"]
    lines = [
        f"# Export: {doc['num_tasks']} tasks, {doc['num_segments']} segments, {doc['num_components']} components (root {doc['root']})",
        "",
        "| quantity | bytes | |",
        "|---|---:|---|",
        f"| unique parameter bytes (tensors in weights.safetensors) | {b['unique_param_bytes']:,} | {b['unique_param_bytes'] / 1e6:,.2f} MB |",
        f"| weights.safetensors | {b['weights_file_bytes']:,} | header {b['weights_file_bytes'] - b['unique_param_bytes']:,} B |",
        f"| graphs ({doc['num_tasks']} task + {doc['num_segments']} segment files) | {b['graph_bytes']:,} | tasks {b['task_graph_bytes']:,}, segments {b['segment_graph_bytes']:,} |",
        f"| manifest.json | {b['manifest_bytes']:,} | |",
        f"| **artifact total** | **{b['total_bytes']:,}** | **{b['ratio_total_to_unique']:.4f} x unique** |",
        f"| naive: one full model file per task | {b['naive_bytes']:,} | {doc['naive_over_artifact']:.2f} x the artifact |",
        "",
        f"Export wall time including parity: {s['export_with_parity']:.1f} s (STATE load {s['load_state']:.1f} s; "
        f"verifying load of the artifact {s['load_artifact_verify']:.2f} s).",
        "",
        "| task | size | params | accounted | path bytes | task graph | chain | parity on | max abs diff (ONNX vs torch) | arg-max agreement | chain vs graph |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for t, r in doc["tasks"].items():
        lines.append(
            f"| {t} | {r['image_size']} | {r['params']:,} | {r['accounted_params']:,.0f} | {r['param_bytes']:,} | {r['graph_bytes']:,} | "
            f"{'+'.join(r['segments'])} | {r['parity_examples']} {r['parity_inputs']} | {r[PARITY[0]]:.2e} | {r[PARITY[1]]:.4f} | {r[PARITY[2]]:.2e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from mutask.errors import MutaskError

    p = argparse.ArgumentParser(prog="python -m mutask.benchmarks.export_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state", help="STATE directory to export")
    p.add_argument("--out", help="keep the artifact here (replaced if it is one); default: a temp dir, removed")
    p.add_argument("--results", help="results directory (default benchmarks/results)")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        doc = run(a.state, a.out, a.results, show_progress=not a.quiet)
    except MutaskError as e:
        print(f"export_bench: error: {e}", file=sys.stderr)
        return 2
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
