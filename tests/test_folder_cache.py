"""ImageFolder indexing by headers and the on-disk image cache: built once, reused, exact,
bounded, masked, interrupted cleanly."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mutask.evolve.folder import image_size_for, load_folder
from mutask.errors import MutaskError
from tests.folder_helpers import flat, img


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MUTASK_CACHE", str(tmp_path_factory.mktemp("cache")))


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
        img(root / "a" / f"{i}.jpg", size=size, value=i)
        img(root / "b" / f"{i}.png", size=size, value=10 + i)
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

    root = flat(tmp_path / "reuse", per_class=8, size=(30, 20))
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
        img(root / "a" / f"{i}.jpg", size=(40 + i, 30), value=i)
        img(root / "b" / f"{i}.png", size=(25, 60 - i), mode="L" if i % 2 else "RGBA", value=50 + i)
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

    root = flat(tmp_path / "cut", classes=("a", "b"), per_class=6, size=(48, 40))
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

    root = flat(tmp_path / "big", classes=("a", "b"), per_class=5)
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

    root = flat(tmp_path / "stop", classes=("a", "b"), per_class=8)
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

    root = flat(tmp_path / "oom", classes=("a", "b"), per_class=12)
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
