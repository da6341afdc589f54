"""``mutask export``: the export subcommand (heavy modules are imported in the handler)."""

from __future__ import annotations

import pathlib
import time

DESCRIPTION = """\
Export an evolved STATE to a deployable artifact ART: weights.safetensors (every unique
tensor once), one ONNX graph per task (image in, logits out) and one per shared segment,
all reading their weights from weights.safetensors, and manifest.json (spec: export/FORMAT.md).
Parity with PyTorch is checked on each task's test split before ART is written (atomically).
With --verify-only, the positional argument is an ART to check on its own."""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a STATE to ONNX graphs + one weights file", description=DESCRIPTION)
    p.add_argument("path", metavar="STATE", help="STATE directory to export (with --verify-only: the artifact ART to check)")
    p.add_argument("--out", metavar="ART", help="artifact directory to write (required unless --verify-only)")
    p.add_argument("--into", metavar="DIR", help="write the next numbered version DIR/N of a model repository (N = newest + 1; a running `mutask serve DIR` swaps to it); excludes --out, --force, --verify-only")
    p.add_argument("--force", action="store_true", help="replace an existing ART")
    p.add_argument("--verify-only", action="store_true", help="check an existing ART: hashes, files, and every task graph against its segment chain")
    p.add_argument("--bentoml-model", metavar="NAME", help="also store the artifact in BentoML's model store as NAME (for `bentoml build`)")
    p.add_argument("--parity-samples", type=int, default=256, metavar="N",
                   help="test images per task the parity check (and --verify-only) runs, evenly spaced over the split; 0 for all of them (default 256)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_export)


def _cmd_export(a) -> None:
    from mutask.errors import MutaskError

    if a.parity_samples < 0:
        raise MutaskError(f"--parity-samples must be 0 (all) or positive, got {a.parity_samples}.")
    if a.into:  # a model repository's next version
        if a.out or a.force or a.verify_only:
            raise MutaskError("--into DIR writes the next numbered version of DIR, never over an existing one; drop --out, --force and --verify-only.")
        a.out = str(next_version_path(a.into))
    if a.verify_only:
        if a.out or a.force or a.bentoml_model:
            raise MutaskError("--verify-only checks an existing ART given as the positional argument; drop --out, --force and --bentoml-model.")
        from .verify import verify_artifact

        rep = verify_artifact(a.path, samples=a.parity_samples, show_progress=not a.quiet)
        print(f"artifact {a.path}: {rep['integrity']}")
        for t, r in rep["tasks"].items():
            acc = f", test accuracy {r['test_accuracy']:.3f}" if "test_accuracy" in r else ""
            print(f"  {t}: segment chain {'+'.join(r['chain'])} vs task graph on {r['examples']} {r['inputs']}: "
                  f"max |diff| {r['chain_vs_graph_max_abs_diff']:.2e}, arg-max agreement {r['chain_vs_graph_argmax_agreement']:.4f}{acc}")
        print("ok")
        return
    if not a.out:
        raise MutaskError("--out ART is required: the artifact directory to write (or --into DIR for the next version of a model repository, or --verify-only ART to check one).")
    from mutask.evolve.state import System

    from .artifact import load_artifact
    from .sizes import artifact_stats
    from .build import export_system

    t0 = time.perf_counter()
    system = System.load(a.path)
    out = export_system(system, a.out, force=a.force, bentoml_model=a.bentoml_model, parity_samples=a.parity_samples, show_progress=not a.quiet)
    st = artifact_stats(out)
    man = load_artifact(out, verify=False).manifest
    print(f"exported {st['num_tasks']} task(s), {st['num_segments']} segment(s) to {out} in {time.perf_counter() - t0:.0f} s")
    print(f"  {st['total_bytes']:,} bytes = {st['ratio_total_to_unique']:.4f} x the {st['unique_param_bytes']:,} unique parameter bytes "
          f"(graphs {st['graph_bytes']:,}); one model file per task would be {st['naive_bytes']:,}")
    for t, r in man.parity.tasks.items():
        print(f"  {t}: ONNX vs PyTorch on {r.examples} images ({r.inputs}): max |diff| {r.onnx_vs_torch_max_abs_diff:.2e}, "
              f"arg-max agreement {r.onnx_vs_torch_argmax_agreement:.4f}; chain {'+'.join(man.tasks[t].segments)} max |diff| {r.chain_vs_graph_max_abs_diff:.2e}")
    if a.bentoml_model:
        print(f"  stored in BentoML's model store as {a.bentoml_model}")


def next_version_path(root) -> pathlib.Path:
    """Where ``mutask export --into root`` writes: ``root/(newest + 1)``."""
    from mutask.errors import MutaskError

    from .manifest import MANIFEST
    from .artifact import version_numbers

    root = pathlib.Path(root)
    if root.exists() and not root.is_dir():
        raise MutaskError(f"--into {root}: it is a file; name a directory of numbered versions (it is created if missing).")
    if (root / MANIFEST).exists():
        raise MutaskError(f"--into {root}: it is one artifact (it holds {MANIFEST}), not a directory of versions; "
                          f"name a new directory, or move this artifact to {root}/1 first.")
    return root / str(max(version_numbers(root), default=0) + 1)
