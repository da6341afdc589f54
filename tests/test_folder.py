"""ImageFolder directories: layouts, decoding of mixed formats, determinism, errors, skipped
files. The on-disk image cache is tests/test_folder_cache.py."""

import logging

import numpy as np
import pytest

from mutask.evolve.folder import image_size_for, load_folder
from mutask.evolve.tasks import load_task
from mutask.errors import MutaskError
from tests.folder_helpers import flat, img


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path_factory.mktemp("cache")))


def test_flat_layout_uniform_sizes(tmp_path):
    root = flat(tmp_path / "pets")
    task = load_folder(root)
    assert task.name == "pets" and task.class_names == ["cat", "dog", "eel"]
    assert (len(task.train), len(task.validation), len(task.test)) == (18, 6, 6)
    for split in ("train", "validation", "test"):
        s = task.split(split)
        assert all(s.raw(i).shape == (16, 20, 3) and s.raw(i).dtype == np.uint8 for i in range(len(s)))
        assert s.resized(16).shape == (len(s), 16, 16, 3) and s.resized(16)[:].dtype == np.uint8
        assert s.labels.dtype == np.int64
        assert set(s.labels) == {0, 1, 2}  # every class in every split
    assert task.image_size == 16
    assert task.source.endswith("pets")


def test_split_sizes_per_class(tmp_path):
    root = tmp_path / "d"
    counts = {"a": 1, "b": 2, "c": 3, "d": 20}
    for c, n in counts.items():
        for i in range(n):
            img(root / c / f"{i}.png", value=i)
    task = load_folder(root)
    per = {s: np.bincount(task.split(s).labels, minlength=4) for s in ("train", "validation", "test")}
    assert list(per["train"] + per["validation"] + per["test"]) == [1, 2, 3, 20]
    assert (per["train"][0], per["validation"][0], per["test"][0]) == (1, 0, 0)
    assert (per["train"][1], per["validation"][1], per["test"][1]) == (1, 1, 0)
    assert (per["train"][2], per["validation"][2], per["test"][2]) == (1, 1, 1)
    assert (per["train"][3], per["validation"][3], per["test"][3]) == (14, 3, 3)


def test_mixed_formats_modes_sizes_and_corrupt_file(tmp_path, caplog):
    root = tmp_path / "mixed"
    img(root / "a" / "rgb.png", size=(40, 30))
    img(root / "a" / "gray.jpg", size=(33, 50), mode="L", value=1)
    img(root / "a" / "pal.gif", size=(64, 64), mode="P", value=2)
    img(root / "a" / "alpha.webp", size=(48, 32), mode="RGBA", value=3)
    img(root / "b" / "cmyk.tif", size=(24, 24), mode="CMYK", value=4)
    img(root / "b" / "rgb.bmp", size=(100, 80), value=5)
    img(root / "b" / "la.png", size=(36, 36), mode="LA", value=6)
    img(root / "b" / "upper.JPEG", size=(30, 60), value=7)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "a" / "truncated.jpg").write_bytes((root / "a" / "gray.jpg").read_bytes()[:40])
    (root / "a" / "notes.txt").write_text("not an image, ignored")
    img(root / "a" / ".hidden.png")  # hidden: ignored
    img(root / ".hidden_class" / "x.png")  # hidden class folder: ignored
    with caplog.at_level(logging.WARNING, logger="mutask"):
        task = load_folder(root)
    assert task.class_names == ["a", "b"]
    assert len(task.train) + len(task.validation) + len(task.test) == 8
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "2 unreadable" in warnings[0].getMessage() and str(root) in warnings[0].getMessage()
    for split in ("train", "validation", "test"):
        s = task.split(split)
        assert len(s) == len(s.labels)
        for i in range(len(s)):
            a = s.raw(i)
            assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
        assert s.resized(16).shape == (len(s), 16, 16, 3)
    assert 16 <= task.image_size <= 384 and task.image_size % 16 == 0


def test_split_layout_and_carving(tmp_path):
    root = tmp_path / "splitted"
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        for c in ("x", "y"):
            for i in range(n):
                img(root / split / c / f"{i}.png", value=i)
    task = load_folder(root)
    assert task.class_names == ["x", "y"]
    assert (len(task.train), len(task.validation), len(task.test)) == (20, 6, 8)

    # No test split: carved (~15% per class) from train; "validation/" spelling also accepted.
    root2 = tmp_path / "notest"
    for split, n in (("train", 20), ("validation", 3)):
        for c in ("x", "y"):
            for i in range(n):
                img(root2 / split / c / f"{i}.png", value=i)
    task2 = load_folder(root2)
    assert (len(task2.train), len(task2.validation), len(task2.test)) == (34, 6, 6)
    assert load_folder(root2).test.labels.tolist() == task2.test.labels.tolist()


def test_deterministic_and_seeded(tmp_path):
    root = flat(tmp_path / "det", per_class=12)
    a, b = load_folder(root, seed=0), load_folder(root, seed=0)
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(a.split(split).resized(16)[:], b.split(split).resized(16)[:])
        np.testing.assert_array_equal(a.split(split).labels, b.split(split).labels)
    c = load_folder(root, seed=1)
    assert not np.array_equal(a.test.resized(16)[:], c.test.resized(16)[:])


def test_load_task_naming(tmp_path):
    root = flat(tmp_path / "flowers", classes=("rose", "tulip"), per_class=4)
    assert load_task(str(root)).name == "flowers"
    assert load_task(str(root) + "/").name == "flowers"
    named = load_task(f"blooms={root}")
    assert named.name == "blooms" and named.class_names == ["rose", "tulip"]
    with pytest.raises(MutaskError, match="does not exist"):
        load_task(f"blooms={tmp_path / 'nope'}")
    with pytest.raises(MutaskError, match="not valid"):
        load_task(f"bad name={root}")


def test_errors(tmp_path):
    with pytest.raises(MutaskError, match="does not exist"):
        load_folder(tmp_path / "missing")
    f = img(tmp_path / "file.png")
    with pytest.raises(MutaskError, match="not a directory"):
        load_folder(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MutaskError, match="no class sub-folders"):
        load_folder(tmp_path / "empty")
    img(tmp_path / "loose" / "x.png")
    with pytest.raises(MutaskError, match="no class sub-folders"):
        load_folder(tmp_path / "loose")
    flat(tmp_path / "one", classes=("only",), per_class=3)
    with pytest.raises(MutaskError, match="single class"):
        load_folder(tmp_path / "one")
    for c in ("a", "b"):
        (tmp_path / "junk" / c).mkdir(parents=True)
        (tmp_path / "junk" / c / "x.png").write_bytes(b"junk")
    with pytest.raises(MutaskError, match="no readable images"):
        load_folder(tmp_path / "junk")
    flat(tmp_path / "hole", classes=("full",), per_class=3)
    (tmp_path / "hole" / "void").mkdir()
    with pytest.raises(MutaskError, match="'void'"):
        load_folder(tmp_path / "hole")
    for split in ("train", "val"):
        img(tmp_path / "orphan" / split / "a" / "0.png")
    img(tmp_path / "orphan" / "train" / "b" / "0.png")
    img(tmp_path / "orphan" / "val" / "c" / "0.png")
    with pytest.raises(MutaskError, match="'c'"):
        load_folder(tmp_path / "orphan")


def test_image_size_rule():
    assert image_size_for([(20, 30)] * 3) == 16
    assert image_size_for([(100, 120), (90, 200), (500, 40)]) == 96
    assert image_size_for([(1000, 1000)]) == 384
    assert image_size_for([(5, 5)]) == 16


def test_symlinks_do_not_leave_the_class_folder_or_duplicate_images(tmp_path, caplog):
    """A link loop inside a class folder, a link to another class and a link to a file of the
    same class: each image counts once, in its own class, and no image is in two splits."""
    import os

    root = tmp_path / "linked"
    for i in range(3):
        img(root / "a" / f"a{i}.png", value=i)
        img(root / "b" / f"b{i}.png", value=10 + i)
    os.symlink(root, root / "a" / "loop")  # the task's own root, from inside class a
    os.symlink(root / "b", root / "a" / "other")  # another class
    os.symlink(root / "a" / "a0.png", root / "a" / "again.png")  # a file of the same class twice
    with caplog.at_level(logging.WARNING, logger="mutask"):
        td = load_folder(root)
    assert [len(s) for s in (td.train, td.validation, td.test)] == [2, 2, 2]
    for split in (td.train, td.validation, td.test):
        assert sorted(split.labels.tolist()) == [0, 1]
    pixels = [bytes(s.raw(i)) for s in (td.train, td.validation, td.test) for i in range(len(s))]
    assert len(set(pixels)) == 6  # six different images, none twice
    assert "symbolic links" in caplog.text


def test_a_link_across_split_folders_is_kept_in_train_only(tmp_path, caplog):
    import os

    root = tmp_path / "splits"
    for k, c in enumerate(("x", "y")):  # distinct seeds: no two images alike (hash() varied per process: a flake)
        for i in range(4):
            img(root / "train" / c / f"{i}.png", value=10 * k + i)
        img(root / "test" / c / "t.png", value=10 * k + 9)
    os.symlink(root / "train" / "x" / "0.png", root / "test" / "x" / "leak.png")
    with caplog.at_level(logging.WARNING, logger="mutask"):
        td = load_folder(root)
    train = {bytes(td.train.raw(i)) for i in range(len(td.train))}
    assert not train & {bytes(td.test.raw(i)) for i in range(len(td.test))}
    assert len(td.test) == 2


def test_a_class_too_small_to_measure_is_warned_about(tmp_path, caplog):
    root = tmp_path / "small"
    for i in range(6):
        img(root / "many" / f"{i}.png", value=i)
    img(root / "one" / "0.png", value=99)
    with caplog.at_level(logging.WARNING, logger="mutask"):
        td = load_folder(root)
    assert td.num_classes == 2
    assert "'one'" in caplog.text and "no validation images" in caplog.text and "no test images" in caplog.text
