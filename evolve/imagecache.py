"""Decoded, resized images of a list of files, cached on disk and read back row by row.

An ImageFolder split at image size S with resize filter F is decoded once (steps 1-2 of
:mod:`mutask.preprocessing`: decode, EXIF orientation, RGB, square resize) into one raw uint8
file of N x S x S x 3 bytes, row i being file i, plus a small JSON sidecar::

    <cache_dir()>/images/<folder>-<split>-<hash>/<S>-<F>.u8     the rows
    <cache_dir()>/images/<folder>-<split>-<hash>/<S>-<F>.json   size, filter, count, bad rows

The hash covers the folder's real path, the split, every file's relative path, byte size and
modification time, the Pillow version and this format's version: a changed folder gets a new
directory (old ones may be deleted by hand whenever no run uses them). Both files are written to
a temporary name and renamed (the sidecar last, so a sidecar means complete rows), which lets
later processes (``--resume``, export's parity, ``--verify-only``) reuse them.

Files are decoded in worker processes (one per available core) and written in order by this
process, with a progress bar. A file that does not decode fully (truncated, damaged) gets a row
of zeros and its index in the sidecar's ``invalid`` list. The free space is checked before
anything is written.

:class:`CachedImages` reads rows at their offsets into fresh arrays (no memory map), so the
reader's memory is one request's rows, whatever N.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from mutask.cache import cache_dir, current_umask, write_document
from mutask.cores import available_cores
from mutask.errors import MutaskError
from mutask.preprocessing import resize_rgb, to_rgb_array

log = logging.getLogger("mutask")

FORMAT = "mutask-image-cache"
VERSION = 1
RESIZES = ("bilinear", "bicubic")
IN_PROCESS_BELOW = 64  # fewer files than this are decoded in this process (no worker start-up)
STALE_SECONDS = 600  # a temporary file untouched this long belongs to a build that was killed
_BLOCK_PER_WORKER = 32  # rows per worker handed out at a time (bounds the rows in flight)


def split_directory(source: str, split: str, files: list[tuple[str, int, int]]) -> Path:
    """The cache directory of one split: ``source`` is the folder's real path, ``files`` the
    split's (relative path, byte size, mtime in ns) in row order."""
    h = hashlib.sha256(json.dumps([FORMAT, VERSION, PIL.__version__, source, split]).encode())
    for rel, size, mtime in files:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    label = re.sub(r"[^A-Za-z0-9_.+-]", "_", os.path.basename(source.rstrip("/\\")) or "folder")[:40]
    return cache_dir() / "images" / f"{label}-{split}-{h.hexdigest()[:20]}"


def _stem(size: int, resize: str) -> str:
    return f"{size}-{resize}"


def read_sidecar(directory: Path, size: int, resize: str, count: int) -> dict | None:
    """The sidecar of a complete cache of ``count`` rows at ``size``/``resize``, else None (none
    yet, another version, or rows that do not match it)."""
    stem = _stem(size, resize)
    try:
        doc = json.loads((directory / f"{stem}.json").read_text())
        rows = directory / f"{stem}.u8"
        ok = (
            doc.get("format") == FORMAT and doc.get("version") == VERSION and doc.get("size") == size
            and doc.get("resize") == resize and doc.get("count") == count
            and rows.stat().st_size == count * size * size * 3
        )
    except (OSError, ValueError, AttributeError):
        return None
    return doc if ok else None


def known_invalid(directory: Path, count: int) -> list[int] | None:
    """The invalid rows recorded by any complete cache of this split (every size and filter
    decodes the same files), else None when the split has not been cached yet."""
    for sidecar in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        m = re.fullmatch(r"(\d+)-([a-z]+)", sidecar.stem)
        if m and (doc := read_sidecar(directory, int(m.group(1)), m.group(2), count)) is not None:
            return [int(i) for i in doc["invalid"]]
    return None


def decode_resized(job: tuple[str, int, str]) -> bytes | None:
    """Steps 1-2 for one file ``(path, size, resize)``: its S x S x 3 uint8 row as bytes, or
    None when the file does not decode fully. Runs in the worker processes."""
    path, size, resize = job
    try:
        with Image.open(path) as im:
            im.load()
            arr = to_rgb_array(im)
    except Exception:  # truncated, damaged, decompression bomb...: the row is left out
        return None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        return None
    return np.ascontiguousarray(resize_rgb(arr, size, resize)).tobytes()


def _decode_chunk(jobs: list[tuple[str, int, str]]) -> list[bytes | None]:
    return [decode_resized(job) for job in jobs]


def _decoded_rows(paths: list[str], size: int, resize: str, workers: int):
    """The rows of ``paths`` in order (bytes, or None for a file that does not decode), decoded
    by ``workers`` processes (forked on Linux, as torch's DataLoader does; spawned elsewhere); at
    most two blocks of rows are in flight. A worker that dies (the out-of-memory killer) stops
    the build with a :class:`MutaskError` instead of waiting for it forever."""
    jobs = [(p, size, resize) for p in paths]
    if workers <= 1 or len(jobs) < IN_PROCESS_BELOW:
        yield from map(decode_resized, jobs)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    block, chunk = workers * _BLOCK_PER_WORKER, 8
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        pending: list = []
        for start in range(0, len(jobs) + block, block):
            submitted = [pool.submit(_decode_chunk, jobs[i : i + chunk]) for i in range(start, min(start + block, len(jobs)), chunk)]
            for future in pending:
                yield from future.result()
            pending = submitted
    except BrokenProcessPool:
        raise MutaskError(
            f"a worker process decoding images ({paths[0]} ...) died, most likely killed for memory: free memory "
            "(or run fewer jobs beside it) and run again."
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _no_space(needed: int, free: int, where: Path) -> MutaskError:
    return MutaskError(
        f"the image cache needs {needed:,} bytes in {where} but {free:,} bytes are free: free some space "
        f"there, or set MUTASK_CACHE to a directory on a larger disk."
    )


def _check_space(directory: Path, needed: int) -> None:
    """Raise before writing anything when the disk holding ``directory`` lacks ``needed`` bytes."""
    where = directory
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise _no_space(needed, free, directory)


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporaries of builds that were killed (untouched for :data:`STALE_SECONDS`)."""
    for tmp in directory.glob(".*.building"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_SECONDS:
                tmp.unlink()
        except OSError:
            pass


def _warn_superseded(directory: Path, source: str, split: str) -> None:
    """A warning naming the caches of earlier versions of the same folder split (the folder has
    changed since): they are not deleted, as a run started before the change may still read them."""
    old = []
    for other in directory.parent.glob(directory.name.rsplit("-", 1)[0] + "-*"):
        if other == directory:
            continue
        for sidecar in other.glob("*.json"):
            try:
                doc = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and doc.get("source") == source and doc.get("split") == split:
                old.append(other)
                break
    if old:
        total = sum(f.stat().st_size for d in old for f in d.iterdir() if f.is_file())
        log.warning(
            "%d cache folder(s) of an earlier version of %s (%s split) hold %s bytes: delete %s when no run uses them.",
            len(old), source, split, f"{total:,}", ", ".join(str(d) for d in sorted(old)),
        )


def build(directory: Path, paths: list[str], size: int, resize: str, *, source: str, split: str, desc: str,
          show_progress: bool | None = None, workers: int | None = None) -> dict:
    """Decode and resize ``paths`` (the files of ``split`` of the folder ``source``) into the
    cache at ``directory`` for ``size``/``resize`` and return its sidecar. Raises
    :class:`MutaskError`, with nothing written, when the disk lacks the space."""
    from mutask.progress import bar as progress_bar

    stem = _stem(size, resize)
    row_bytes = size * size * 3
    needed = len(paths) * row_bytes
    _check_space(directory, needed + 4096)
    if not directory.exists():
        _warn_superseded(directory, source, split)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    workers = available_cores() if workers is None else workers
    invalid: list[int] = []
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".building", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        zeros = bytes(row_bytes)
        disable = None if show_progress is None else not show_progress
        decoded = closing(_decoded_rows(paths, size, resize, workers))  # closing it ends its worker pool
        with os.fdopen(fd, "wb") as f, decoded as rows, progress_bar(total=len(paths), desc=desc, unit="img", disable=disable, leave=False) as bar:
            for i, row in enumerate(rows):
                if row is None:
                    invalid.append(i)
                    row = zeros
                f.write(row)
                bar.update(1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / f"{stem}.u8")
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise _no_space(needed, shutil.disk_usage(directory).free, directory) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    doc = {
        "format": FORMAT, "version": VERSION, "size": size, "resize": resize, "count": len(paths),
        "invalid": invalid, "source": source, "split": split,
    }
    write_document(directory / f"{stem}.json", doc)
    return doc


class CachedImages:
    """The valid rows of one cache as an array-like of uint8 images (n, S, S, 3).

    Supports ``len()``, ``.shape``, ``.dtype``, an integer, a slice, or an integer (or boolean)
    array as index; a slice or an array gives a fresh ``np.ndarray`` (k, S, S, 3), an integer one
    image (S, S, 3). Each index reads just its rows from the file."""

    def __init__(self, path: Path, size: int, rows: np.ndarray):
        self.path = Path(path)
        self.size = int(size)
        self.rows = np.asarray(rows, dtype=np.int64)  # file row of each exposed row

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.size, self.size, 3)

    def __repr__(self) -> str:
        return f"CachedImages({str(self.path)!r}, shape={self.shape})"

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {index} is out of range for {len(self)} images")
            return self._read(self.rows[i : i + 1])[0]
        if isinstance(index, slice):
            return self._read(self.rows[index])
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"a boolean index needs shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise IndexError(f"index images with an int, a slice or a 1-d integer array, not {type(index).__name__} {idx.dtype}")
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"an index is out of range for {len(self)} images")
        return self._read(self.rows[idx])

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of the file, in that order, into a fresh array: one read per run of
        consecutive rows."""
        out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        if not len(rows):
            return out
        row_bytes = self.size * self.size * 3
        flat = memoryview(out.reshape(-1)).cast("B")
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])
        with open(self.path, "rb", buffering=0) as f:
            for a, b in zip(starts.tolist(), ends.tolist()):
                f.seek(int(rows[a]) * row_bytes)
                view, done = flat[a * row_bytes : b * row_bytes], 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise MutaskError(
                            f"the image cache {self.path} is shorter than its sidecar says: delete its folder "
                            f"{self.path.parent} and run again."
                        )
                    done += n
        return out
