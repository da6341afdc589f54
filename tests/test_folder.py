"""ImageFolder directories: layouts, decoding of mixed formats, determinism, errors, skipped files;
indexing by headers, the on-disk image cache (built once, reused, exact, bounded, masked)."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mutask.evolve.folder import image_size_for, load_folder
from mutask.evolve.tasks import load_task
from mutask.errors import MutaskError


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path_factory.mktemp("cache")))


def _img(path, size=(20, 16), mode="RGB", value=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "P":
        im = im.quantize(16)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def _flat(root, classes=("cat", "dog", "eel"), per_class=10, size=(20, 16)):
    for c in classes:
        for i in range(per_class):
            _img(root / c / f"{i:03d}.png", size=size, value=hash((c, i)) % 1000)
    return root


def test_flat_layout_uniform_sizes(tmp_path):
    root = _flat(tmp_path / "pets")
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
            _img(root / c / f"{i}.png", value=i)
    task = load_folder(root)
    per = {s: np.bincount(task.split(s).labels, minlength=4) for s in ("train", "validation", "test")}
    assert list(per["train"] + per["validation"] + per["test"]) == [1, 2, 3, 20]
    assert (per["train"][0], per["validation"][0], per["test"][0]) == (1, 0, 0)
    assert (per["train"][1], per["validation"][1], per["test"][1]) == (1, 1, 0)
    assert (per["train"][2], per["validation"][2], per["test"][2]) == (1, 1, 1)
    assert (per["train"][3], per["validation"][3], per["test"][3]) == (14, 3, 3)


def test_mixed_formats_modes_sizes_and_corrupt_file(tmp_path, caplog):
    root = tmp_path / "mixed"
    _img(root / "a" / "rgb.png", size=(40, 30))
    _img(root / "a" / "gray.jpg", size=(33, 50), mode="L", value=1)
    _img(root / "a" / "pal.gif", size=(64, 64), mode="P", value=2)
    _img(root / "a" / "alpha.webp", size=(48, 32), mode="RGBA", value=3)
    _img(root / "b" / "cmyk.tif", size=(24, 24), mode="CMYK", value=4)
    _img(root / "b" / "rgb.bmp", size=(100, 80), value=5)
    _img(root / "b" / "la.png", size=(36, 36), mode="LA", value=6)
    _img(root / "b" / "upper.JPEG", size=(30, 60), value=7)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "a" / "truncated.jpg").write_bytes((root / "a" / "gray.jpg").read_bytes()[:40])
    (root / "a" / "notes.txt").write_text("not an image, ignored")
    _img(root / "a" / ".hidden.png")  # hidden: ignored
    _img(root / ".hidden_class" / "x.png")  # hidden class folder: ignored
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
                _img(root / split / c / f"{i}.png", value=i)
    task = load_folder(root)
    assert task.class_names == ["x", "y"]
    assert (len(task.train), len(task.validation), len(task.test)) == (20, 6, 8)

    # No test split: carved (~15% per class) from train; "validation/" spelling also accepted.
    root2 = tmp_path / "notest"
    for split, n in (("train", 20), ("validation", 3)):
        for c in ("x", "y"):
            for i in range(n):
                _img(root2 / split / c / f"{i}.png", value=i)
    task2 = load_folder(root2)
    assert (len(task2.train), len(task2.validation), len(task2.test)) == (34, 6, 6)
    assert load_folder(root2).test.labels.tolist() == task2.test.labels.tolist()


def test_deterministic_and_seeded(tmp_path):
    root = _flat(tmp_path / "det", per_class=12)
    a, b = load_folder(root, seed=0), load_folder(root, seed=0)
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(a.split(split).resized(16)[:], b.split(split).resized(16)[:])
        np.testing.assert_array_equal(a.split(split).labels, b.split(split).labels)
    c = load_folder(root, seed=1)
    assert not np.array_equal(a.test.resized(16)[:], c.test.resized(16)[:])


def test_load_task_naming(tmp_path):
    root = _flat(tmp_path / "flowers", classes=("rose", "tulip"), per_class=4)
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
    f = _img(tmp_path / "file.png")
    with pytest.raises(MutaskError, match="not a directory"):
        load_folder(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MutaskError, match="no class sub-folders"):
        load_folder(tmp_path / "empty")
    _img(tmp_path / "loose" / "x.png")
    with pytest.raises(MutaskError, match="no class sub-folders"):
        load_folder(tmp_path / "loose")
    _flat(tmp_path / "one", classes=("only",), per_class=3)
    with pytest.raises(MutaskError, match="single class"):
        load_folder(tmp_path / "one")
    for c in ("a", "b"):
        (tmp_path / "junk" / c).mkdir(parents=True)
        (tmp_path / "junk" / c / "x.png").write_bytes(b"junk")
    with pytest.raises(MutaskError, match="no readable images"):
        load_folder(tmp_path / "junk")
    _flat(tmp_path / "hole", classes=("full",), per_class=3)
    (tmp_path / "hole" / "void").mkdir()
    with pytest.raises(MutaskError, match="'void'"):
        load_folder(tmp_path / "hole")
    for split in ("train", "val"):
        _img(tmp_path / "orphan" / split / "a" / "0.png")
    _img(tmp_path / "orphan" / "train" / "b" / "0.png")
    _img(tmp_path / "orphan" / "val" / "c" / "0.png")
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
        _img(root / "a" / f"a{i}.png", value=i)
        _img(root / "b" / f"b{i}.png", value=10 + i)
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
    for c in ("x", "y"):
        for i in range(4):
            _img(root / "train" / c / f"{i}.png", value=hash((c, i)) % 1000)
        _img(root / "test" / c / "t.png", value=hash((c, "t")) % 1000)
    os.symlink(root / "train" / "x" / "0.png", root / "test" / "x" / "leak.png")
    with caplog.at_level(logging.WARNING, logger="mutask"):
        td = load_folder(root)
    train = {bytes(td.train.raw(i)) for i in range(len(td.train))}
    assert not train & {bytes(td.test.raw(i)) for i in range(len(td.test))}
    assert len(td.test) == 2


def test_a_class_too_small_to_measure_is_warned_about(tmp_path, caplog):
    root = tmp_path / "small"
    for i in range(6):
        _img(root / "many" / f"{i}.png", value=i)
    _img(root / "one" / "0.png", value=99)
    with caplog.at_level(logging.WARNING, logger="mutask"):
        td = load_folder(root)
    assert td.num_classes == 2
    assert "'one'" in caplog.text and "no validation images" in caplog.text and "no test images" in caplog.text


# -- indexing and the image cache ------------------------------------------------------------

def _count_loads(monkeypatch) -> dict:
    """Count pixel decoding: every Pillow ``load`` (whatever the format) and every cache row."""
    from PIL import ImageFile

    from mutask.evolve import imagecache

    calls = {"load": 0, "rows": 0}
    for cls in (Image.Image, ImageFile.ImageFile):
        original = cls.load

        def counted(self, _original=original):
            calls["load"] += 1
            return _original(self)

        monkeypatch.setattr(cls, "load", counted)
    decode = imagecache.decode_resized

    def counted_rows(job):
        calls["rows"] += 1
        return decode(job)

    monkeypatch.setattr(imagecache, "decode_resized", counted_rows)
    return calls


def _sidecars():
    from mutask.cache import cache_dir

    return sorted((cache_dir() / "images").glob("*/*.json"))


def test_indexing_reads_headers_only(tmp_path, monkeypatch):
    root = tmp_path / "sizes"
    for i, size in enumerate([(40, 30), (64, 80), (100, 90), (33, 50)]):
        _img(root / "a" / f"{i}.jpg", size=size, value=i)
        _img(root / "b" / f"{i}.png", size=size, value=10 + i)
    calls = _count_loads(monkeypatch)
    task = load_folder(root)
    assert calls == {"load": 0, "rows": 0}
    assert not _sidecars()
    # the typical size comes from the headers: median of min(H, W) over the train images
    sizes = [task.train.raw(i).shape[:2] for i in range(len(task.train))]
    assert task.image_size == image_size_for(sizes)
    assert calls["load"] >= len(task.train)  # raw() decodes: the counter sees decoding


def test_cache_is_built_once_and_reused_by_other_splits_and_processes(tmp_path, monkeypatch, caplog):
    import os
    import subprocess
    import sys

    root = _flat(tmp_path / "reuse", per_class=8, size=(30, 20))
    calls = _count_loads(monkeypatch)
    task = load_folder(root)
    first = task.train.resized(16)
    assert calls["rows"] == len(task.train)
    rows = first[:]
    sidecar = next(p for p in _sidecars() if "-train-" in p.parent.name and p.name == "16-bilinear.json")
    stamp = sidecar.stat().st_mtime_ns
    assert task.train.resized(16) is first and calls["rows"] == len(task.train)

    again = load_folder(root)  # a new split object: finds the cache on disk
    np.testing.assert_array_equal(again.train.resized(16)[:], rows)
    assert calls["rows"] == len(task.train)

    script = (
        "import sys, numpy as np\n"
        "from mutask.evolve import imagecache\n"
        "from mutask.evolve.folder import load_folder\n"
        "def boom(job): raise SystemExit('decoded ' + job[0])\n"
        "imagecache.decode_resized = boom\n"
        "rows = load_folder(sys.argv[1]).train.resized(16)[:]\n"
        "sys.stdout.write(rows.tobytes().hex())\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, env=dict(os.environ), timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert bytes.fromhex(done.stdout) == rows.tobytes()
    assert sidecar.stat().st_mtime_ns == stamp

    # another size or filter is another cache; a changed file makes a new key for its split
    task.train.resized(16, resize="bicubic")
    assert calls["rows"] == 2 * len(task.train)
    changed = Path(task.train.paths[0])
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    fresh = load_folder(root)
    assert fresh.train.cache_directory != task.train.cache_directory
    with caplog.at_level(logging.WARNING, logger="mutask"):
        fresh.train.resized(16)
    assert calls["rows"] == 3 * len(task.train)
    assert "earlier version" in caplog.text and str(task.train.cache_directory) in caplog.text


@pytest.mark.parametrize("resize", ["bilinear", "bicubic"])
def test_cached_rows_equal_direct_decoding(tmp_path, monkeypatch, resize):
    """Rows built by worker processes and read back (int, slice, index array with repeats,
    boolean mask) are bit-identical to steps 1-2 of the contract on the file."""
    from mutask.evolve import imagecache
    from mutask.preprocessing import resize_rgb, to_rgb_array

    root = tmp_path / "exact"
    for i in range(12):
        _img(root / "a" / f"{i}.jpg", size=(40 + i, 30), value=i)
        _img(root / "b" / f"{i}.png", size=(25, 60 - i), mode="L" if i % 2 else "RGBA", value=50 + i)
    rotated = Image.fromarray(np.random.default_rng(7).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    rotated.save(root / "a" / "rotated.jpg", exif=exif)
    monkeypatch.setattr(imagecache, "IN_PROCESS_BELOW", 0)
    monkeypatch.setattr(imagecache, "available_cores", lambda: 2)
    task = load_folder(root)
    for split in (task.train, task.validation, task.test):
        images = split.resized(24, resize=resize)
        with Image.open(split.paths[0]) as im:
            direct0 = to_rgb_array(im)
        expected = np.stack([resize_rgb(to_rgb_array(Image.open(p)), 24, resize) for p in split.paths])
        assert images.shape == expected.shape == (len(split), 24, 24, 3)
        np.testing.assert_array_equal(images[:], expected)
        np.testing.assert_array_equal(images[1:3], expected[1:3])
        np.testing.assert_array_equal(images[-1], expected[-1])
        idx = np.array([len(split) - 1, 0, 0, 1])
        np.testing.assert_array_equal(images[idx], expected[idx])
        assert isinstance(images[idx], np.ndarray) and images[idx].dtype == np.uint8
        mask = np.arange(len(split)) % 2 == 0
        np.testing.assert_array_equal(images[mask], expected[mask])
        np.testing.assert_array_equal(split.raw(0), direct0)
    other = "bicubic" if resize == "bilinear" else "bilinear"
    assert not np.array_equal(task.train.resized(24, resize=other)[:], task.train.resized(24, resize=resize)[:])
    with pytest.raises(MutaskError, match="unknown resize filter 'lanczos'"):
        task.train.resized(24, resize="lanczos")


def test_a_truncated_image_is_left_out_with_a_warning(tmp_path, caplog):
    import io

    root = _flat(tmp_path / "cut", classes=("a", "b"), per_class=6, size=(48, 40))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "a" / "999-cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact, pixels cut
    task = load_folder(root)
    where = next(s for s in ("train", "validation", "test") if any(p.endswith("999-cut.jpg") for p in task.split(s).paths))
    split = task.split(where)
    n, labels = len(split), split.labels.copy()
    row = next(i for i, p in enumerate(split.paths) if p.endswith("999-cut.jpg"))
    with caplog.at_level(logging.WARNING, logger="mutask"):
        images = split.resized(16)
    assert f"1 of {n} {where} image(s)" in caplog.text and "999-cut.jpg" in caplog.text
    assert len(split) == len(images) == n - 1
    np.testing.assert_array_equal(split.labels, np.delete(labels, row))
    assert images[:].shape == (n - 1, 16, 16, 3)
    # another process (a new split object) counts only the good rows before reading any
    later = load_folder(root).split(where)
    assert len(later) == n - 1 and later.labels.tolist() == split.labels.tolist()


def test_short_disk_stops_before_writing(tmp_path, monkeypatch):
    import collections

    from mutask.cache import cache_dir
    from mutask.evolve import imagecache

    root = _flat(tmp_path / "big", classes=("a", "b"), per_class=5)
    task = load_folder(root)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(imagecache.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    needed = len(task.train) * 64 * 64 * 3
    with pytest.raises(MutaskError, match=r"needs [\d,]+ bytes .* but 1,000 bytes are free.*MUTASK_CACHE") as e:
        task.train.resized(64)
    assert f"{needed + 4096:,}" in str(e.value) and str(cache_dir()) in str(e.value)
    assert not (cache_dir() / "images").exists() or not any((cache_dir() / "images").rglob("*"))


def test_reading_rows_does_not_grow_memory(tmp_path):
    """Reading every row of a 60 MB cache in batches leaves the resident set where it was
    (a memory map would add the pages it touched)."""
    import gc

    import psutil

    from mutask.evolve.imagecache import CachedImages

    size, n = 100, 2000
    path = tmp_path / "rows.u8"
    with open(path, "wb") as f:
        f.writelines(np.full((size, size, 3), i % 251, np.uint8).tobytes() for i in range(n))
    images = CachedImages(path, size, np.arange(n))
    gc.collect()
    before = psutil.Process().memory_info().rss
    order = np.random.default_rng(0).permutation(n)
    for i in range(0, n, 64):
        batch = images[order[i : i + 64]]
        assert batch[0, 0, 0, 0] == order[i] % 251
    for i in range(0, n, 256):
        assert images[i : i + 256].shape[0] == min(256, n - i)
    del batch
    gc.collect()
    grown = psutil.Process().memory_info().rss - before
    assert grown < 20 * 2**20, grown


def test_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    from mutask.cache import cache_dir
    from mutask.evolve import imagecache

    root = _flat(tmp_path / "stop", classes=("a", "b"), per_class=8)
    task = load_folder(root)
    decode, calls = imagecache.decode_resized, []

    def interrupted(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(job)

    monkeypatch.setattr(imagecache, "decode_resized", interrupted)
    with pytest.raises(KeyboardInterrupt):
        task.train.resized(16)
    assert [p.name for p in (cache_dir() / "images").rglob("*") if p.is_file()] == []
    monkeypatch.setattr(imagecache, "decode_resized", decode)
    assert task.train.resized(16).shape == (len(task.train), 16, 16, 3)


def test_a_worker_killed_while_decoding_stops_the_build_cleanly(tmp_path, monkeypatch):
    """A decoding worker that dies (as under the out-of-memory killer) ends the build with a
    MutaskError, nothing written, rather than a wait forever."""
    import os

    from mutask.cache import cache_dir
    from mutask.evolve import imagecache

    root = _flat(tmp_path / "oom", classes=("a", "b"), per_class=12)
    task = load_folder(root)
    victim = task.train.paths[5]
    decode = imagecache.decode_resized

    def dies_on_victim(job):
        if job[0] == victim:
            os._exit(137)
        return decode(job)

    monkeypatch.setattr(imagecache, "decode_resized", dies_on_victim)
    monkeypatch.setattr(imagecache, "IN_PROCESS_BELOW", 0)
    monkeypatch.setattr(imagecache, "available_cores", lambda: 2)
    with pytest.raises(MutaskError, match="died, most likely killed for memory"):
        task.train.resized(16)
    assert [p.name for p in (cache_dir() / "images").rglob("*") if p.is_file()] == []
