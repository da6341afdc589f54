"""``mutask bench ART``: the serving record's latency and profile parts on an exported system."""

from __future__ import annotations

from pathlib import Path

DESCRIPTION = """\
Measure what serving an exported system (ART) costs on this machine, as the serving record
(benchmarks/results/serving.md) does: POST /predict of one task over loopback HTTP against a
bare ONNX Runtime session of the same graph with the server's session options (interleaved
pairs of blocks, p50/p99, the per-pair difference of p50s, the floor under any model), and where
one /predict's time goes (the wall time of each stage, the service in process). The server runs
on a free loopback port and is always stopped. Writes NAME.json and NAME.md (default bench) to
--results (default: the current directory). The serving record's throughput part, and its
breakdown of an earlier commit, compare against another checkout's server:
python -m mutask.benchmarks.serving_bench ART --before CHECKOUT."""


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("bench", help="measure serving latency against bare ONNX Runtime", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", metavar="ART", help="artifact directory written by `mutask export`")
    p.add_argument("--pairs", type=int, default=10, help="interleaved pairs (>= 10 for an interval; default 10)")
    p.add_argument("--requests", type=int, default=200, help="requests per latency block, and profiled (default 200)")
    p.add_argument("--name", default="bench", help="record name (default bench)")
    p.add_argument("--results", default=".", help="results directory (default: the current directory)")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(a) -> None:
    from mutask.export.artifact import load_artifact

    from . import harness, serving_bench

    load_artifact(a.artifact)  # a bad ART stops here with a clear message (exit 2)
    doc = serving_bench.measure(Path(a.artifact), ("latency", "profile"), a.pairs, a.requests, before=None)
    j, _ = harness.write_record(a.name, doc, serving_bench.to_markdown(doc), a.results)
    print(j.read_text() if a.json else serving_bench.to_markdown(doc))
