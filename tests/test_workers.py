"""Children trained on Ray workers (evolve/workers.py): the same STATE as in one process, a
worker killed mid-child retried to the same STATE, the command's --workers, Ray only when asked.
One local Ray instance for the module (a Ray start costs seconds)."""

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

from mutask.errors import MutaskError
from mutask.evolve.evolution import Evolution, EvolveConfig
from mutask.evolve.state import System
from mutask.evolve.tasks import load_task
from tests.conftest import make_root

ray = pytest.importorskip("ray", reason="Ray is in the dev extras: pip install -e '.[dev]'")
psutil = pytest.importorskip("psutil")

TASKS = ["digits", "shapes"]
CONFIG = dict(rounds=1, children=3, generation_size=3, steps=6, validations=2, batch_size=16, mutation_prob=0.5)
TIMING = {"train_images_per_s", "visit_seconds", "train_seconds"}  # wall-clock measures, not results


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:  # the workers inherit the environment at ray.init
        mp.setenv("MUTASK_CACHE", str(base / "mutask-cache"))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
        try:
            yield
        finally:
            ray.shutdown()


def evolve(out, pool=None):
    from mutask.evolve.workers import RayPool

    torch.set_num_threads(1)  # equal threads per child: float reductions differ with the thread count
    s = System.new(make_root(), seed=0)
    torch.manual_seed(1000 + (pool or 0))  # torch's global RNG differs per run (as in a --resume'd process): nothing may draw from it
    s.config["evolve"] = asdict(EvolveConfig(**CONFIG))
    s.config["order"] = TASKS
    data = {t: load_task(t, seed=0) for t in TASKS}
    s.tasks.update({t: {"spec": t, "seed": 0, "num_classes": data[t].num_classes, "start_image_size": 32} for t in TASKS})
    if pool is None:
        return Evolution(s, data, out, show_progress=False).run(TASKS)
    with RayPool(pool, threads=1) as p:
        return Evolution(s, data, out, show_progress=False, pool=p).run(TASKS)


def saved(out):
    """A STATE's tensors (bytes by key) and its documents without wall-clock measures."""
    doc = json.loads((out / "state.json").read_text())
    tensors = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in load_file(str(out / doc["weights"])).items()}

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in TIMING}
        return [clean(v) for v in x] if isinstance(x, list) else x

    return tensors, clean({k: doc[k] for k in ("paths", "best", "history", "rng_state")})


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):
    """The run without Ray."""
    out = tmp_path_factory.mktemp("seq") / "st"
    evolve(out)
    return saved(out)


def assert_same(got, want):
    tensors, docs = got
    assert docs == want[1]  # same children, hyperparameters, metrics, acceptances, RNG state
    assert tensors.keys() == want[0].keys() and tensors == want[0]  # byte-identical tensors


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_sequential_state(reference, tmp_path, workers):
    tensors, docs = reference
    assert any(h["accepted"] for h in docs["history"]) and len(docs["history"]) == 6
    assert any(n.startswith("adapters.") for h in docs["history"] for n in h["components"])  # adapters' seeds derived too
    evolve(tmp_path / "st", pool=workers)
    assert_same(saved(tmp_path / "st"), reference)


def test_a_worker_killed_mid_child_is_retried_to_the_same_state(reference, tmp_path):
    killed = []
    stop = threading.Event()

    def killer():  # kill -9 the first worker seen training a child (Ray titles it ray::mutask_child)
        while not stop.is_set() and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "ray::mutask_child" in " ".join(p.info["cmdline"] or []):
                    p.kill()
                    killed.append(p.info["pid"])
                    break
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        evolve(tmp_path / "st", pool=2)
    finally:
        stop.set()
        t.join()
    assert killed, "no worker was seen training a child"
    assert_same(saved(tmp_path / "st"), reference)


def test_evolve_command_with_workers(local_ray, tmp_path, capsys, monkeypatch):
    from mutask.cli import main
    from mutask.evolve import roots

    monkeypatch.setattr(roots, "load_root", lambda spec, pretrained=False: make_root())  # no pretraining here
    args = ["evolve", "--task", "digits", "--root", "tiny", "--budget", "tiny", "-q", "--workers", "2", "--threads", "1"]
    assert main(args + ["--out", str(tmp_path / "st")]) == 0
    assert main(args + ["--out", str(tmp_path / "st"), "--workers", "0"]) == 2  # checked before anything starts
    assert "--workers must be at least 1" in capsys.readouterr().err
    doc = json.loads((tmp_path / "st" / "state.json").read_text())
    assert doc["progress"] is None and set(doc["best"]) == {"digits"} and len(doc["history"]) == 3


def test_plain_evolve_does_not_import_ray(tmp_path):
    code = (
        "import sys\n"
        "from mutask.cli import main\n"
        "from mutask.evolve import roots, run\n"
        "from tests.conftest import make_root, synthetic_task\n"
        "roots.load_root = lambda spec, pretrained=False: make_root()\n"
        "run.resolve_tasks = lambda specs, seed, show_progress=None: (['a'], {'a': synthetic_task('a', 3, 1)}, {'a': {'spec': 'a', 'seed': 0}})\n"
        f"assert main(['evolve', '--task', 'a', '--root', 'tiny', '--out', {str(tmp_path / 'st')!r}, '--budget', 'tiny', '-q', '--threads', '1']) == 0\n"
        "assert 'ray' not in sys.modules, 'a plain evolve imported ray'\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_pool_arguments_are_checked(monkeypatch):
    from mutask.evolve import workers
    from mutask.evolve.workers import RayPool

    with pytest.raises(MutaskError, match="--workers must be at least 1"):
        RayPool(0)
    with pytest.raises(MutaskError, match="--workers N"):
        RayPool(None, None)
    assert RayPool(2, threads=None).threads >= 1 and RayPool(None, "auto").threads == 1
    monkeypatch.setattr(workers, "ray", None)  # as where Ray is not installed
    with pytest.raises(MutaskError, match=r"pip install 'mutask\[ray\]'"):
        RayPool(2)
