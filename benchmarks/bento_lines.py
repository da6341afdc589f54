"""The code a Bento ships: lines of every file ``bentofile.yaml`` includes, here and in a checkout.

    python -m mutask.benchmarks.bento_lines --before CHECKOUT [--later PATH ...] [--name bento-lines]

Reads each tree's own ``bentofile.yaml`` (its ``include`` globs less its ``exclude`` ones, as
``bentoml build`` applies them) and counts the lines of each file it packs. ``--later``: paths
(in this tree) of features that other work added after the ``--before`` commit, totalled apart
so the two trees can also be compared like for like. Writes ``NAME.json`` and ``NAME.md``.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

from mutask.benchmarks.harness import RESULTS, commit_of, write_record

REPO = Path(__file__).resolve().parents[1]


def shipped(tree: Path) -> dict[str, int]:
    """{path: lines} of every file the tree's bentofile.yaml includes."""
    import yaml

    spec = yaml.safe_load((tree / "bentofile.yaml").read_text())
    files = {p for pattern in spec.get("include", []) for p in tree.glob(pattern) if p.is_file()}
    rel = sorted(str(p.relative_to(tree)) for p in files)
    rel = [r for r in rel if not any(fnmatch.fnmatch(r, x) or fnmatch.fnmatch(r, x + "/*") for x in spec.get("exclude", []))]  # a file, or one under a folder
    return {r: len((tree / r).read_text().splitlines()) for r in rel}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="checkout of the earlier commit")
    p.add_argument("--later", nargs="*", default=[], help="paths here that later features added (totalled apart)")
    p.add_argument("--name", default="bento-lines")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    this, before = shipped(REPO), shipped(Path(a.before))
    later = {k: v for k, v in this.items() if k in a.later}
    rev = commit_of(a.before)
    doc = {"before": a.before, "before_commit": rev, "this": this, "before_files": before, "later_features": later,
           "total_this": sum(this.values()), "total_before": sum(before.values()),
           "total_this_without_later": sum(this.values()) - sum(later.values())}

    def ratio(n: int) -> str:
        return f"{100 * (1 - n / doc['total_before']):.1f} % smaller" if n <= doc["total_before"] else "larger"

    rows = [f"| `{f}` | {this.get(f, '')} | {before.get(f, '')} |" for f in sorted(set(this) | set(before))]
    md = "\n".join([
        f"# The code the Bento ships: this tree against {rev or a.before}", "",
        "Lines of every file each tree's `bentofile.yaml` includes (`python -m mutask.benchmarks.bento_lines`).", "",
        "| file | this | before |", "|---|---:|---:|", *rows,
        f"| **total** | **{doc['total_this']}** | **{doc['total_before']}** |", "",
        f"This tree: {doc['total_this']} lines, {ratio(doc['total_this'])} than {doc['total_before']}. "
        + (f"Without the files later features added ({', '.join(f'`{k}`' for k in later)}: {sum(later.values())} lines): "
           f"{doc['total_this_without_later']}, {ratio(doc['total_this_without_later'])}." if later else ""),
    ])
    write_record(a.name, doc, md, a.out, shared_machine=None)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
