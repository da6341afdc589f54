"""``mutask bench ART``: the serving, baseline, load and artifact-size benchmarks on an exported system.

Each writes JSON + a markdown table to the results directory (default benchmarks/results/)
with machine info and repeats; ``--json`` prints the combined document.
"""

from __future__ import annotations

import json
from pathlib import Path

DESCRIPTION = """\
Benchmark an exported system (ART): per-task HTTP latency at batch 1 against a bare
onnxruntime session, mixed-task throughput over concurrency with shared-segment batching
against one session per task graph, resident memory against the unique weight bytes; the
server against a minimal BentoML service with one plain onnxruntime session per task graph
(latency per task, throughput at 8 and 32 clients, mutask / minimal ratios); a bounded load
test (concurrent clients over mixed tasks, every answer checked); and artifact bytes against
unique parameter bytes and one full model per task. Servers run on free
loopback ports and are always stopped."""

NAMES = ("serving", "baseline", "load", "artifact")  # the results it writes, in order


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("bench", help="benchmark an exported system", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", metavar="ART", help="artifact directory written by `mutask export`")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--repeats", type=int, default=3, help="repeats per throughput point (default 3)")
    p.add_argument("--requests", type=int, default=100, help="requests per latency series / throughput point (default 100)")
    p.add_argument("--concurrency", default="1,4,16,32", help="concurrency curve (default 1,4,16,32)")
    p.add_argument("--load-clients", type=int, default=16, help="clients of the load test (default 16)")
    p.add_argument("--load-seconds", type=float, default=20.0, help="duration of the load test (default 20)")
    p.add_argument("--results", help="results directory (default benchmarks/results)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(a) -> None:
    from mutask.export.artifact import artifact_stats, load_artifact

    from . import baseline_bench, harness, load_bench, serving_bench

    load_artifact(a.artifact)  # a bad ART stops here with a clear message (exit 2)
    results = Path(a.results or harness.RESULTS)
    serving_bench.main([a.artifact, "--part", "latency,profile", "--requests", str(a.requests), "--out", str(results)])
    baseline_bench.main([a.artifact, "--repeats", str(a.repeats), "--requests", str(a.requests), "--results", str(results)])
    load_bench.main([a.artifact, "--clients", str(a.load_clients), "--seconds", str(a.load_seconds), "--results", str(results)])
    stats = artifact_stats(a.artifact)
    md = (
        "| artifact bytes | unique parameter bytes | ratio | graph bytes | one full model per task | artifact / naive |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
        f"| {stats['total_bytes']:,} | {stats['unique_param_bytes']:,} | {stats['ratio_total_to_unique']:.4f} | {stats['graph_bytes']:,} | "
        f"{stats['naive_bytes']:,} | {stats['total_bytes'] / stats['naive_bytes']:.3f} |"
    )
    harness.write_record("artifact", {"benchmark": "artifact", **stats, "repeats": 1}, md, results)
    combined = {name: json.loads((results / f"{name}.json").read_text()) for name in NAMES}
    if a.json:
        print(json.dumps(combined, indent=2))
    else:
        for name in NAMES:
            print(f"\n## {name}\n")
            print((results / f"{name}.md").read_text())
