"""A model repository: numbered versions of an exported system, swapped while the server runs.

``mutask serve DIR`` (or ``MUTASK_ARTIFACT=DIR``) takes either one artifact directory (a
*version-less* artifact: served as it is, never swapped) or a directory of numbered versions::

    DIR/1/manifest.json ...   DIR/2/manifest.json ...   DIR/.3.export-x1y2/  (being written)

Only names made of digits are versions, ordered numerically; anything else (``mutask export
--into DIR``'s temporary ``.N.export-*`` directory, files, ``latest``) is ignored, so a version
becomes visible only when ``export`` renames it into place, complete. The server serves the
newest version (or the one pinned with ``--version N`` / ``MUTASK_VERSION``), and a thread polls
DIR every ``--poll-s`` seconds (``MUTASK_POLL_S``, default 2; both read by
:class:`mutask.serving.settings.Settings`). When the newest version changes
(a new one, or the served one removed: rollback to the one before), the new version is loaded
*off the request path*: its hashes and manifest verified
(:func:`mutask.export.artifact.load_artifact` with ``verify=True``), its graphs loaded into a
new engine, a warm-up run of every task; then one assignment swaps it in. Each request holds
the version it started on (:class:`HoldVersion`, a context variable) until its answer is sent,
so requests in flight finish on the old version while new ones go to the new; the old version
is closed when its last request is done, and nothing refers to it after that (its engine,
sessions and memory go). A version that fails any step is refused with a log line and a
``mutask_version_refusals_total`` count, and the served one stays; it is tried again only
when its directory changes (a copy that was still being written).

The service supplies what a version is made of: ``build(artifact, number)`` returns the
version's payload (engine, batcher, task records), ``close(payload)`` releases it.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mutask.export.manifest import MANIFEST
from mutask.export.versions import is_repository, version_numbers

from .loader import ServingError, clear_cache, open_artifact

log = logging.getLogger("bentoml.serve.mutask")  # shown with the server's own lines

DEFAULT_POLL_S = 2.0  # the default of Settings.poll_s (MUTASK_POLL_S)


# ---- the directory layout --------------------------------------------------------------------


def signature(path: Path) -> tuple:
    """What changes when a version directory is written into (files added, a manifest replaced)."""
    try:
        st = path.stat()
        m = (path / MANIFEST).stat().st_mtime_ns if (path / MANIFEST).exists() else None
        return (st.st_mtime_ns, st.st_ino, m)
    except OSError:
        return ()


def candidates(root: Path, pin: int | None = None) -> list[tuple[int | None, Path]]:
    """The versions to try serving, best first: a version-less artifact; the pinned version;
    else every numbered one, newest first. :class:`ServingError` when there is none."""
    root = Path(root)
    if not root.exists():
        raise ServingError(f"artifact {root} does not exist: pass a directory written by `mutask export` (or a directory of numbered versions)")
    if not is_repository(root):
        if pin is not None:
            raise ServingError(f"--version {pin}: {root} is one artifact, not a directory of numbered versions (DIR/1, DIR/2, ...); drop --version")
        return [(None, root)]
    numbers = version_numbers(root)
    if pin is not None:
        if pin not in numbers:
            raise ServingError(f"--version {pin}: {root} has no version {pin}; it has {numbers or 'none'}")
        return [(pin, root / str(pin))]
    if not numbers:
        raise ServingError(
            f"{root} holds no manifest.json and no numbered versions (DIR/1, DIR/2, ...): pass a directory written by "
            f"`mutask export --out`, or write a first version into it with `mutask export STATE --into {root}`"
        )
    return [(n, root / str(n)) for n in reversed(numbers)]


def open_served(root, pin: int | None = None, *, cache: bool = True):
    """(number, artifact) of the version a server starts on: the newest (or pinned) version that
    verifies; a newer one that does not is logged and skipped. :class:`ServingError` when none
    verifies (the message says why the best one fails)."""
    first = None
    for number, path in candidates(Path(root), pin):
        try:
            return number, open_artifact(path, cache=cache)
        except ServingError as e:
            first = first or e
            log.error("mutask: version %s refused: %s", number, e)
    raise first


# ---- versions and the repository -------------------------------------------------------------


class Version:
    """One loaded version: its number (None: version-less), directory, artifact and the
    service's payload; ``refs`` counts the requests holding it."""

    def __init__(self, number: int | None, path: Path, artifact, payload: Any):
        self.number, self.path, self.artifact, self.payload = number, path, artifact, payload
        self.refs = 0
        self.retired = False
        self.loaded_at = time.time()

    def __repr__(self) -> str:
        return f"Version({self.number}, {str(self.path)!r}, refs={self.refs}, retired={self.retired})"


_HELD: contextvars.ContextVar = contextvars.ContextVar("mutask_version", default=None)


def held() -> Version | None:
    """The version the current request holds (None outside a request)."""
    return _HELD.get()


class Repository:
    """Serves one version of ``root`` at a time and swaps in newer ones (see the module).

    ``build(artifact, number) -> payload`` and ``close(payload)`` come from the service;
    ``on_swap(old, new, seconds)`` and ``on_refuse(number, reason)`` report (metrics)."""

    def __init__(
        self, root, *, build: Callable, close: Callable, pin: int | None = None, poll_s: float = DEFAULT_POLL_S,
        on_swap: Callable | None = None, on_refuse: Callable | None = None,
    ):
        self.root = Path(root)
        self.build, self.close_payload = build, close
        self.pin, self.poll_s = pin, float(poll_s)
        self.on_swap, self.on_refuse = on_swap, on_refuse
        self.versioned = is_repository(self.root)
        self._current: Version | None = None
        self._lock = threading.Lock()
        self._refused: dict[int, tuple] = {}  # number -> the directory signature it was refused with
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._polling = threading.Lock()  # one poll at a time (the thread, or a caller of poll_once)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.swaps = 0

    @property
    def current(self) -> Version | None:
        return self._current

    # ---- starting ----

    def start(self, poll: bool = True) -> Version:
        """Load the version to serve (newest that verifies, or the pinned one); then, for a
        directory of versions, poll it in a daemon thread. :class:`ServingError` when none loads."""
        first = None
        for number, path in candidates(self.root, self.pin):
            try:
                self._current = self._load(number, path, cache=True)
                break
            except ServingError as e:
                first = first or e
                self._refuse(number, path, str(e))
        if self._current is None:
            raise first
        if poll and self.versioned:
            self._thread = threading.Thread(target=self._run, name="mutask-repository", daemon=True)
            self._thread.start()
        return self._current

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception:  # the poller never dies; the served version stays
                log.exception("mutask: polling %s failed", self.root)

    # ---- polling ----

    def target(self) -> tuple[int, Path] | None:
        """The version that should be served now, or None when the served one should stay: the
        pinned one, else the newest not refused in its present form."""
        numbers = version_numbers(self.root)
        if self.pin is not None:
            return (self.pin, self.root / str(self.pin)) if self.pin in numbers else None
        for n in reversed(numbers):
            path = self.root / str(n)
            if self._refused.get(n) != signature(path):
                return n, path
        return None

    def poll_once(self) -> str:
        """One look at the directory: "unchanged", "swapped" or "refused"."""
        if not self.versioned:
            return "unchanged"
        with self._polling:
            want = self.target()
            cur = self._current
            if want is None or (cur is not None and want[0] == cur.number and (self.root / str(cur.number)).is_dir()):
                return "unchanged"
            number, path = want
            t0 = time.perf_counter()
            try:
                new = self._load(number, path, cache=False)
            except ServingError as e:
                self._refuse(number, path, str(e))
                return "refused"
            self._swap(new, time.perf_counter() - t0)
            return "swapped"

    def _load(self, number: int | None, path: Path, cache: bool) -> Version:
        """Verify and build a version, warm-up included (the service's ``build`` runs it);
        :class:`ServingError` for anything that fails."""
        sig = signature(path)
        art = open_artifact(path, cache=cache)  # ServingError: hashes, manifest, references
        try:
            payload = self.build(art, number)
        except ServingError:
            raise
        except Exception as e:  # an engine that cannot load a graph, a failing warm-up run
            raise ServingError(f"version {number} ({path}) cannot be served: {type(e).__name__}: {e}") from None
        if signature(path) != sig:  # written into while we loaded it: not a complete version yet
            self.close_payload(payload)
            raise ServingError(f"version {number} ({path}) changed while it was loaded (still being written?); it is tried again when it stops changing")
        return Version(number, path, art, payload)

    def _refuse(self, number: int | None, path: Path, reason: str) -> None:
        if number is not None:
            self._refused[number] = signature(path)
        log.error("mutask: version %s at %s refused, the served version stays: %s", number, path, reason)
        if self.on_refuse is not None:
            self.on_refuse(number, reason)

    def _swap(self, new: Version, seconds: float) -> None:
        idle = False
        with self._lock:
            old, self._current = self._current, new
            self.swaps += 1
            if old is not None:
                old.retired = True
                idle = old.refs == 0
        log.info("mutask: now serving version %s (%s, %d tasks) after %.2f s of loading; version %s retires",
                 new.number, new.path, len(new.artifact.tasks), seconds, old.number if old else None)
        if self.on_swap is not None:
            self.on_swap(old, new, seconds)
        clear_cache()  # the loader's cache must not keep the old version's artifact
        if old is not None and idle:
            self._close_soon(old)

    # ---- requests ----

    def acquire(self) -> Version:
        """The served version, held until :meth:`release` (a request's whole life)."""
        if self.loop is None:
            try:
                self.loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        with self._lock:
            v = self._current
            v.refs += 1
            return v

    def release(self, v: Version) -> None:
        with self._lock:
            v.refs -= 1
            last = v.retired and v.refs == 0
        if last:
            self._close_soon(v)

    def _close_soon(self, v: Version) -> None:
        """Close a retired version on the event loop (its batcher lives there), or here when
        there is no running loop."""
        loop = self.loop
        if loop is not None and loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self._close, v)
                return
        self._close(v)

    def _close(self, v: Version) -> None:
        payload, v.payload, v.artifact = v.payload, None, None
        if payload is None:
            return
        try:
            self.close_payload(payload)
        except Exception:
            log.exception("mutask: closing version %s failed", v.number)
        del payload
        release_memory()


def release_memory() -> None:
    """Collect cycles and hand freed heap pages back to the system (glibc keeps them otherwise,
    and a process that swapped versions would look as big as all of them together)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HoldVersion:
    """ASGI middleware: each HTTP request holds the served version from its first byte to its
    last (see :func:`held`); the repository is the service's ``repo``, looked up per request."""

    def __init__(self, app, find_repository: Callable[[], Repository | None]):
        self.app = app
        self.find = find_repository

    async def __call__(self, scope, receive, send):
        repo = self.find() if scope["type"] == "http" else None
        if repo is None or repo.current is None:
            return await self.app(scope, receive, send)
        v = repo.acquire()
        token = _HELD.set(v)
        try:
            await self.app(scope, receive, send)
        finally:
            _HELD.reset(token)
            repo.release(v)
