"""The systems and artifacts the export tests share (tests/test_export*.py), each built once per
session however many test modules ask for it, and the helpers that edit artifacts."""

import hashlib
import json
import os

from mutask.evolve.evolution import Evolution
from mutask.evolve.state import System
from mutask.export.build import export_system
from tests.conftest import add_task, make_root, synthetic_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(rounds=1, children=3, generation_size=2, steps=4, validations=1, batch_size=16)
_CACHE: dict = {}


def new_system(root, names, data):
    from dataclasses import asdict

    from mutask.evolve.evolution import EvolveConfig

    s = System.new(root, seed=0)
    s.config["evolve"] = asdict(EvolveConfig(**TINY))
    s.config["order"] = names
    s.tasks.update({t: {"spec": t, "seed": 0, "num_classes": data[t].num_classes} for t in names})
    return s


def evolved_artifact(tmp_path_factory):
    """(system, data, artifact): tasks a and b evolved (b seeded from a: shared prefix); task c
    = a's path at image size 48 (position embedding resampled in the graph) with an unchanged
    clone of a's norm (the same bytes: stored once) and its own head; task d = b's path with
    its own patch_embed (it meets b's components after a different first step). Exported once."""
    if "evolved" not in _CACHE:
        base = tmp_path_factory.mktemp("evolved")
        data = {"a": synthetic_task("a", 4, 1), "b": synthetic_task("b", 3, 2), "c": synthetic_task("c", 5, 3), "d": synthetic_task("d", 3, 4)}
        s = new_system(make_root(), ["a", "b"], data)
        Evolution(s, data, base / "st", show_progress=False).run(["a", "b"])
        pa = s.best_path("a")
        comps = list(pa.components[:-1])
        i = [s.store[c].name for c in comps].index("norm")
        comps[i] = s.store.adopt(s.store.clone(comps[i])).id
        add_task(s, "c", comps, dict(pa.hparams, image_size=48), 5, seed=3)
        pb = s.best_path("b")
        add_task(s, "d", pb.components[:-1], dict(pb.hparams), 3, seed=4, own=("patch_embed",))
        art = export_system(s, base / "art", data=data, show_progress=False)
        _CACHE["evolved"] = (s, data, art)
    return _CACHE["evolved"]


def solo_system(tmp_path_factory):
    """(system, data, STATE directory): one task on the root (no evolution), the cheap system
    for the write-path tests."""
    base = tmp_path_factory.mktemp("solo")
    s = System.new(make_root(), seed=0)
    add_task(s, "solo", s.root_path.components[:-1], {"image_size": 32, "num_blocks": 3}, 3, seed=5)
    s.config["order"] = ["solo"]
    s.save(base / "st")
    data = {"solo": synthetic_task("solo", 3, 5, n_train=8, n_eval=24)}
    return s, data, base / "st"


def tree(d):
    """File name -> sha256 of every file in ``d``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def leftovers(parent, name):
    """Temp directories an export of ``parent / name`` left behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def resealed(m: dict) -> dict:
    """``m`` with its manifest_sha256 recomputed: what a writer that made this manifest would
    have written (the schema's checks are reached only past the digest)."""
    from mutask.export.manifest import content_digest

    return dict(m, manifest_sha256=content_digest(dict(m, manifest_sha256="")))


def edited_manifest(art, tmp_path, edit):
    """A directory holding ``art``'s manifest.json after ``edit(manifest dict)``, resealed
    (the schema is checked before any other file is looked at)."""
    d = tmp_path / "edited"
    d.mkdir()
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(resealed(m)))
    return d


def rehash_graph(d, g) -> None:
    """Record graph file ``g``'s new sha256 and size in ``d``'s manifest, resealed: an edited
    graph that passes the integrity checks."""
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"][g.name] = {"sha256": hashlib.sha256(g.read_bytes()).hexdigest(), "bytes": g.stat().st_size}
    (d / "manifest.json").write_text(json.dumps(resealed(m)))
