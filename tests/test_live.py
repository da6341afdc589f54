"""Live operation: a directory of numbered versions, swapped while serving (serving/repository.py).

Unit tests drive :class:`Repository` with a stand-in payload (fast); one real server then takes
a new version with one more task under 8 concurrent clients, refuses a corrupted one and rolls
back, and the CLI refuses what it cannot do."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from mutask.server_process import ServerProcess, metric_value, png_bytes
from tests.test_serving_helpers import subprocess_env

_CACHE: dict = {}


# ---- a tiny system, exported into a repository -------------------------------------------------


def tiny_system():
    """Tasks a and b over the tiny root (b with its own patch_embed, so the export has a shared
    segment), no evolution: built in a second."""
    from mutask.evolve.state import System
    from tests.conftest import add_task, make_root, synthetic_task

    s = System.new(make_root(), seed=0)
    rp = s.root_path
    data = {}
    for task, n, seed, own in (("a", 4, 1, ()), ("b", 3, 2, ("patch_embed",))):
        add_task(s, task, rp.components[:-1], rp.hparams, n, seed=seed, own=own)
        data[task] = synthetic_task(task, n, seed)
    return s, data


def add_task_c(s, data) -> None:
    from tests.conftest import add_task, synthetic_task

    rp = s.root_path
    add_task(s, "c", rp.components[:-1], rp.hparams, 5, seed=3)
    data["c"] = synthetic_task("c", 5, 3)


def export_into(s, data, repo: Path) -> Path:
    """What `mutask export STATE --into repo` does: the next version, written atomically."""
    from mutask.export.build import export_system
    from mutask.export.cli import next_version_path

    return export_system(s, next_version_path(repo), data=data, parity_samples=8, show_progress=False)


def first_version(tmp_path_factory) -> Path:
    """A finished version 1 (tasks a, b), exported once per session; copied by each test."""
    if "v1" not in _CACHE:
        s, data = tiny_system()
        _CACHE["v1"] = export_into(s, data, tmp_path_factory.mktemp("live-v1") / "repo")
    return _CACHE["v1"]


def images(n: int = 4) -> list[bytes]:
    rng = np.random.default_rng(11)
    return [png_bytes((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]


# ---- the repository alone ---------------------------------------------------------------------


class Payload:
    def __init__(self, art, number):
        self.tasks, self.number, self.closed = sorted(art.tasks), number, False

    def close(self):
        self.closed = True


def make_repo(root: Path, **kw):
    from mutask.serving.repository import Repository

    refused = []
    repo = Repository(root, build=Payload, close=Payload.close, on_refuse=lambda n, why: refused.append((n, why)), **kw)
    return repo, refused


@pytest.fixture
def repo_dir(tmp_path_factory, tmp_path) -> Path:
    v1 = first_version(tmp_path_factory)
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(v1, root / "1")
    shutil.copytree(v1, root / "2")
    return root


def test_newest_served_temp_dirs_ignored_and_rollback(repo_dir):
    shutil.copytree(repo_dir / "2", repo_dir / ".3.export-x")  # an export still writing: never a version
    (repo_dir / "latest").write_text("2")
    repo, refused = make_repo(repo_dir)
    assert repo.start(poll=False).number == 2
    assert repo.poll_once() == "unchanged"
    shutil.copytree(repo_dir / "2", repo_dir / "10")  # numeric order, not text order
    assert repo.poll_once() == "swapped" and repo.current.number == 10
    shutil.rmtree(repo_dir / "10")  # rollback: the newest removed, the one before served
    assert repo.poll_once() == "swapped" and repo.current.number == 2
    assert not refused and repo.swaps == 2


def test_pinned_version_stays(repo_dir):
    repo, _ = make_repo(repo_dir, pin=1)
    assert repo.start(poll=False).number == 1
    shutil.copytree(repo_dir / "2", repo_dir / "3")
    assert repo.poll_once() == "unchanged" and repo.current.number == 1


def test_broken_and_half_written_versions_refused(repo_dir):
    from mutask.serving.repository import Repository

    repo, refused = make_repo(repo_dir)
    repo.start(poll=False)
    bad = repo_dir / "3"
    shutil.copytree(repo_dir / "2", bad)
    with open(bad / "weights.safetensors", "r+b") as f:  # one flipped byte
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    assert repo.poll_once() == "refused" and repo.current.number == 2
    assert "sha256" in refused[-1][1]
    assert repo.poll_once() == "unchanged"  # not retried while it stays as it is
    half = repo_dir / "4"
    half.mkdir()
    shutil.copy(repo_dir / "2" / "manifest.json", half)  # a copy still in progress
    assert repo.poll_once() == "refused" and "missing" in refused[-1][1]
    for f in (repo_dir / "2").iterdir():  # the copy completes: the directory changed, tried again
        if not (half / f.name).exists():
            shutil.copy(f, half)
    time.sleep(0.01)
    assert repo.poll_once() == "swapped" and repo.current.number == 4
    # a version whose engine fails to build (or warm up) is refused the same way
    def failing(art, number):
        raise RuntimeError("onnxruntime cannot load a graph")

    r2 = Repository(repo_dir, build=failing, close=Payload.close, on_refuse=lambda n, why: refused.append((n, why)))
    with pytest.raises(Exception, match="cannot be served"):
        r2.start(poll=False)


def test_version_in_flight_finishes_then_closes(repo_dir):
    repo, _ = make_repo(repo_dir)
    old = repo.start(poll=False)
    held = repo.acquire()  # a request in flight on version 2
    shutil.copytree(repo_dir / "2", repo_dir / "3")
    assert repo.poll_once() == "swapped"
    assert held is old and held.payload is not None and not held.payload.closed  # still usable
    assert repo.acquire().number == 3  # new requests: the new version
    payload = held.payload
    repo.release(held)
    assert payload.closed and held.payload is None and held.artifact is None  # nothing keeps it


def test_swapped_out_engine_is_freed(repo_dir):
    """With real engines: after a swap, once its last request is done, nothing refers to the old
    version's engine."""
    import gc
    import weakref

    from mutask.serving.engine import Engine
    from mutask.serving.repository import Repository
    from mutask.serving.service import Payload

    def build(art, number):
        return Payload(Engine(art, threads=1), number)

    repo = Repository(repo_dir, build=build, close=Payload.close)
    first = weakref.ref(repo.start(poll=False).payload.engine)
    held = repo.acquire()
    shutil.copytree(repo_dir / "2", repo_dir / "3")
    assert repo.poll_once() == "swapped"
    gc.collect()
    assert first() is not None  # a request still holds version 2
    repo.release(held)
    del held
    gc.collect()
    assert first() is None
    assert repo.current.payload.records["a"].version == 3


def test_settings_and_candidates_refuse_clearly(repo_dir, tmp_path, monkeypatch):
    from mutask.serving.repository import ServingError
    from mutask.serving.repository import candidates
    from mutask.serving.settings import Settings, SettingsError

    monkeypatch.setenv("MUTASK_VERSION", "2")
    monkeypatch.setenv("MUTASK_POLL_S", "0.5")
    s = Settings.from_env()
    assert (s.version, s.poll_s) == (2, 0.5)
    monkeypatch.setenv("MUTASK_VERSION", "")  # empty: not pinned
    assert Settings.from_env().version is None
    for name, value, text in (("MUTASK_VERSION", "x", "--version"), ("MUTASK_VERSION", "0", "--version"), ("MUTASK_POLL_S", "0", "--poll-s")):
        monkeypatch.setenv(name, value)
        with pytest.raises(SettingsError, match=text):
            Settings.from_env()
        monkeypatch.setenv(name, "")
    with pytest.raises(ServingError, match="no version 7; it has \\[1, 2\\]"):
        candidates(repo_dir, 7)
    with pytest.raises(ServingError, match="drop --version"):
        candidates(repo_dir / "1", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServingError, match="--into"):
        candidates(tmp_path / "empty")


def test_cli_refuses_bad_combinations(repo_dir, capsys, monkeypatch):
    from mutask.cli import main

    for name in ("MUTASK_VERSION", "MUTASK_POLL_S"):  # `mutask serve` sets them for its server: restored after
        monkeypatch.setenv(name, "")  # (setenv records the variable as unset, to restore; delenv of an unset one would not)

    for argv, text in (
        (["export", "STATE", "--into", str(repo_dir), "--out", "x"], "drop --out, --force and --verify-only"),
        (["export", "STATE", "--into", str(repo_dir), "--force"], "drop --out"),
        (["export", "STATE", "--into", str(repo_dir), "--verify-only"], "drop --out"),
        (["export", "STATE", "--into", str(repo_dir / "1")], "one artifact"),
        (["serve", str(repo_dir), "--version", "9"], "no version 9"),
        (["serve", str(repo_dir), "--poll-s", "0"], "--poll-s"),
        (["serve", str(repo_dir), "--version", "0"], "--version"),
    ):
        assert main(argv) == 2, argv
        assert text in capsys.readouterr().err, argv


# ---- a real server: a version with one more task, under load ------------------------------------


def predict(client, task, png):
    return client.post("/predict", data={"task": task}, files={"image": ("x.png", png, "image/png")})


def test_live_swap_under_load(tmp_path_factory, tmp_path):
    """8 clients keep asking while version 2 (one more task) is exported into the served
    directory: no request fails, task c answers within the poll interval + the load, a and b
    answer as before; a corrupted version 3 is refused while 2 serves; removing 2 rolls back."""
    poll_s = 0.5
    s, data = tiny_system()
    repo = tmp_path / "repo"
    export_into(s, data, repo)
    pngs = images()
    srv = ServerProcess(repo, log_path=tmp_path / "server.log", env=subprocess_env(), args=["--poll-s", str(poll_s)])
    with srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        before = {(t, i): predict(client, t, png).json() for t in "ab" for i, png in enumerate(pngs)}
        stop, failures, counts = threading.Event(), [], [0] * 8

        def load(k):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while not stop.is_set():
                    task, png = "ab"[k % 2], pngs[k % len(pngs)]
                    try:
                        r = predict(c, task, png) if k % 4 else c.post("/predict_tasks", data={"tasks": "a,b"}, files={"image": ("x.png", png)})
                        if r.status_code != 200:
                            failures.append((task, r.status_code, r.text[:200]))
                    except httpx.HTTPError as e:
                        failures.append((task, type(e).__name__, str(e)))
                    counts[k] += 1

        threads = [threading.Thread(target=load, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            add_task_c(s, data)
            export_into(s, data, repo)  # the next version, renamed into place when complete
            exported = time.monotonic()
            while predict(client, "c", pngs[0]).status_code != 200:
                assert time.monotonic() - exported < 60, srv.log()
                time.sleep(0.05)
            waited = time.monotonic() - exported
            time.sleep(1.0)  # requests keep flowing on the new version
        finally:
            stop.set()
            for t in threads:
                t.join()
        metrics = client.get("/metrics").text
        load_s = metric_value(metrics, "mutask_version_load_seconds_sum")
        assert not failures, failures[:5]
        assert sum(counts) > 50, counts
        assert metric_value(metrics, "mutask_version_swaps_total") == 1
        assert waited <= poll_s + load_s + 2.0, (waited, load_s)  # 2 s: the client's own polling on a shared machine
        assert {r["version"] for r in client.post("/tasks").json().values()} == {2}
        for (t, i), old in before.items():
            new = predict(client, t, pngs[i]).json()
            assert new["label"] == old["label"] and new["scores"].keys() == old["scores"].keys()
            assert max(abs(new["scores"][k] - old["scores"][k]) for k in old["scores"]) < 1e-5

        # a corrupted version 3: refused, version 2 keeps serving
        shutil.copytree(repo / "2", repo / ".3.tmp")
        (repo / ".3.tmp" / "task.c.onnx").write_bytes(b"not a graph")
        (repo / ".3.tmp").rename(repo / "3")
        deadline = time.monotonic() + 30
        while metric_value(client.get("/metrics").text, "mutask_version_refusals_total") < 1:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        assert predict(client, "c", pngs[0]).status_code == 200
        assert "version 3" in srv.log() and "refused" in srv.log()
        # rollback: remove the newest two, version 1 serves (without task c)
        shutil.rmtree(repo / "3")
        shutil.rmtree(repo / "2")
        deadline = time.monotonic() + 30
        while {r["version"] for r in client.post("/tasks").json().values()} != {1}:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        assert predict(client, "c", pngs[0]).status_code == 404
        assert predict(client, "a", pngs[0]).json()["label"] == before[("a", 0)]["label"]
        assert client.get("/readyz").status_code == 200
