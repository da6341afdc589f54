"""Where the served artifact comes from, and its versions, swapped while serving (``docs/live.md``).

``MUTASK_ARTIFACT`` (or ``MUTASK_BENTOML_MODEL``, a BentoML model) names one artifact (served as
it is) or a directory of numbered versions, whose newest that verifies (or the pinned one) is
served; none is a :class:`ServingError` before anything starts (exit code 2). A thread polls for
a newer version (or the served one removed: rollback), builds it off the request path and swaps
it in. Each request holds the version it started on (:meth:`Repository.hold`); a retired version
closes after its last request. A version that fails is tried again only when its directory changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mutask.errors import MutaskError
from mutask.export.artifact import ArtifactError, is_repository, load_artifact, version_numbers
from mutask.export.manifest import MANIFEST

log = logging.getLogger("bentoml.serve.mutask")  # shown with the server's own lines
ENV_ARTIFACT = "MUTASK_ARTIFACT"
ENV_MODEL = "MUTASK_BENTOML_MODEL"


class ServingError(MutaskError):
    """The service cannot start: no artifact, or a bad one. The message names the fix."""


def artifact_source() -> tuple[str, str] | None:
    """("path", DIR) or ("model", TAG) from the environment, or None when neither is set."""
    for kind, name in (("path", ENV_ARTIFACT), ("model", ENV_MODEL)):
        if os.environ.get(name, "").strip():
            return kind, os.environ[name].strip()
    return None


def resolve_artifact_path(artifact: str | os.PathLike | None = None) -> Path:
    """The artifact directory: ``artifact`` if given, else from the environment (a BentoML
    model's directory, or its one sub-directory holding a manifest)."""
    if artifact is not None:
        return Path(artifact).expanduser()
    src = artifact_source()
    if src is None:
        raise ServingError(
            f"no artifact to serve: set {ENV_ARTIFACT}=DIR (a `mutask export` directory) or "
            f"{ENV_MODEL}=TAG (a BentoML model), or run `mutask serve ART`"
        )
    kind, value = src
    if kind == "path":
        return Path(value).expanduser()
    import bentoml

    try:
        root = Path(bentoml.models.get(value).path)
    except Exception as e:
        raise ServingError(f"{ENV_MODEL}={value}: no such BentoML model in the model store ({e}); `bentoml models list` shows them") from None
    return next((d for d in [root, *sorted(root.iterdir())] if (d / "manifest.json").is_file()), root)


def open_artifact(artifact: str | os.PathLike | None = None):
    """The artifact (see :func:`resolve_artifact_path`), verified
    (:func:`mutask.export.artifact.load_artifact`); :class:`ServingError` when it cannot be served."""
    path = resolve_artifact_path(artifact)
    if not path.is_dir():
        raise ServingError(f"artifact {path} {'is not a directory' if path.exists() else 'does not exist'}: pass a directory written by `mutask export`")
    try:
        return load_artifact(path, verify=True)
    except ArtifactError as e:
        raise ServingError(f"artifact {path} cannot be served: {e}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ServingError(f"artifact {path} cannot be served: {type(e).__name__}: {e}") from None


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


def first_loadable(root, pin: int | None, load: Callable, refuse: Callable):
    """``load(number, path)`` of the first candidate that loads, each failure reported to
    ``refuse(number, path, reason)``; the best one's :class:`ServingError` when none loads."""
    first = None
    for number, path in candidates(root, pin):
        try:
            return load(number, path)
        except ServingError as e:
            first = first or e
            refuse(number, path, str(e))
    raise first


def open_served(root, pin: int | None = None):
    """(number, artifact) of the version a server starts on: the newest (or pinned) that verifies."""
    return first_loadable(root, pin, lambda n, path: (n, open_artifact(path)),
                          lambda n, path, why: log.error("mutask: version %s refused: %s", n, why))


class Version:
    """One loaded version: its number (None: version-less), directory, artifact and the
    service's payload; ``refs`` counts the requests holding it."""

    def __init__(self, number: int | None, path: Path, artifact, payload: Any):
        self.number, self.path, self.artifact, self.payload = number, path, artifact, payload
        self.refs = 0
        self.retired = False


class Repository:
    """Serves one version of ``root`` at a time and swaps in newer ones. ``build(artifact,
    number) -> payload`` and ``close(payload)`` come from the service; ``on_swap(old, new,
    seconds)`` and ``on_refuse(number, reason)`` report (metrics)."""

    def __init__(self, root, *, build: Callable, close: Callable, pin: int | None = None, poll_s: float = 2.0,
                 on_swap: Callable | None = None, on_refuse: Callable | None = None):
        self.root = Path(root)
        self.build, self.close_payload = build, close
        self.pin, self.poll_s = pin, float(poll_s)
        self.on_swap, self.on_refuse = on_swap, on_refuse
        self.versioned = is_repository(self.root)
        self.current: Version | None = None
        self.swaps = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._polling = threading.Lock()  # one poll at a time (the thread, or a caller of poll_once)
        self._refused: dict[int, tuple] = {}  # number -> the directory signature it was refused with
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, poll: bool = True) -> Version:
        """Load the version to serve; then, for a directory of versions, poll it in a daemon
        thread. :class:`ServingError` when none loads."""
        self.current = first_loadable(self.root, self.pin, self._load, self._refuse)
        if poll and self.versioned:
            self._thread = threading.Thread(target=self._run, name="mutask-repository", daemon=True)
            self._thread.start()
        return self.current

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

    def poll_once(self) -> str:
        """One look at the directory: "unchanged", "swapped" or "refused"."""
        if not self.versioned:
            return "unchanged"
        with self._polling:
            numbers = version_numbers(self.root)
            if self.pin is not None:  # the pinned one, else the newest not refused in its present form
                want = self.pin if self.pin in numbers else None
            else:
                want = next((n for n in reversed(numbers) if self._refused.get(n) != signature(self.root / str(n))), None)
            cur = self.current
            if want is None or (cur is not None and want == cur.number and (self.root / str(want)).is_dir()):
                return "unchanged"
            path, t0 = self.root / str(want), time.perf_counter()
            try:
                new = self._load(want, path)
            except ServingError as e:
                self._refuse(want, path, str(e))
                return "refused"
            self._swap(new, time.perf_counter() - t0)
            return "swapped"

    def _load(self, number: int | None, path: Path) -> Version:
        """Verify and build a version; :class:`ServingError` for anything that fails."""
        sig = signature(path)
        art = open_artifact(path)
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
        with self._lock:
            old, self.current = self.current, new
            self.swaps += 1
            if old is not None:
                old.retired = True
        log.info("mutask: now serving version %s (%s, %d tasks) after %.2f s of loading; version %s retires",
                 new.number, new.path, len(new.artifact.tasks), seconds, old.number if old else None)
        if self.on_swap is not None:
            self.on_swap(old, new, seconds)
        if old is not None:
            self.release(old, hold=False)

    @contextlib.contextmanager
    def hold(self):
        """``with repo.hold() as payload:`` a request's use of the served version's payload; a
        swap meanwhile does not close it."""
        v = self.acquire()
        try:
            yield v.payload
        finally:
            self.release(v)

    def acquire(self) -> Version:
        """The served version, held until :meth:`release`."""
        if self.loop is None:
            try:
                self.loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        with self._lock:
            self.current.refs += 1
            return self.current

    def release(self, v: Version, hold: bool = True) -> None:
        """A request is done with ``v`` (``hold=False``: the swap retired it); the last one
        closes a retired version, on the event loop (its batcher lives there) when one runs."""
        with self._lock:
            if hold:
                v.refs -= 1
            if not (v.retired and v.refs == 0):
                return
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._close, v)
        else:
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
        gc.collect()  # and hand freed heap pages back (glibc keeps them: a process that swapped
        try:  # versions would look as big as all of them together)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
