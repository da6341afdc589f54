"""``mutask serve ART``: BentoML's HTTP server for every task of an exported system.

Imports stay inside the handler, and none of them is torch: the artifact is verified first
(a missing, truncated or tampered one exits with code 2 and a message before any server
starts), then ``MUTASK_ARTIFACT`` names it and ``bentoml.serve`` runs ``serving.service:Mutask``
(an arbiter and one worker process that holds every segment graph once).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

DESCRIPTION = """\
Serve every task of an exported system (`mutask export`) from one process with BentoML:
POST /predict (multipart: task, image), POST /predict_tasks (multipart: image, tasks: one image
for several tasks, or every task), POST /predict_batch (JSON, base64 images), POST /tasks,
/livez, /readyz, /metrics, the OpenAPI page at / and a page to try every task at /ui. CPU by default; CUDA through
onnxruntime-gpu where a GPU is present. Concurrent requests, for any tasks, are batched: each
task's graph runs once over the rows of every request for it; one image asked for several tasks
(/predict_tasks) runs every segment those tasks share once.

ART may be a directory of numbered versions (ART/1, ART/2, ...; `mutask export --into ART`): the
newest is served, and a new one is verified, warmed up and swapped in without a restart.
The same service runs under `bentoml serve mutask.serving.service:Mutask` with MUTASK_ARTIFACT=ART
(or MUTASK_BENTOML_MODEL=TAG)."""


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "serve", help="serve an exported system over HTTP (BentoML)", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("artifact", metavar="ART", help="artifact directory written by `mutask export`, or a directory of numbered versions (ART/1, ART/2, ...: `mutask export --into ART`), served newest first and swapped live")
    s.add_argument("--version", type=int, metavar="N", help="with a directory of versions: serve version N only (pinned; default: the newest, following new ones)")
    s.add_argument("--poll-s", type=float, metavar="S", help="with a directory of versions: look for a new (or removed) version every S seconds (default 2)")
    s.add_argument("--port", type=int, default=3000, help="TCP port (default 3000)")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1, loopback only)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="execution device (default auto: CUDA if onnxruntime-gpu finds a GPU, else CPU)")
    s.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores but one, left to HTTP and decoding)")
    s.add_argument("--max-batch", type=int, help="most image rows per engine batch (default 32)")
    s.add_argument("--max-wait-ms", type=float, help="how long a batch waits for requests being decoded (default 2 ms)")
    s.add_argument("--max-image-bytes", type=int, help="upload size limit in bytes (default 10 MB, or MUTASK_MAX_IMAGE_BYTES)")
    s.set_defaults(func=_cmd_serve)


def _check_port(host: str, port: int) -> None:
    from .repository import ServingError

    if not 0 < port < 65536:
        raise ServingError(f"--port {port} is not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServingError(f"--host {host!r} cannot be resolved ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ServingError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port") from None


_METRICS_DIR: dict = {}


def _own_prometheus_dir() -> str:
    """A Prometheus multiprocess directory for this server alone (removed when it stops).

    BentoML's server takes ``$BENTOML_HOME/prometheus_multiproc_dir`` and empties it at start,
    so a second server on the machine wiped the first's files, and the first's /metrics then
    reported the second's counters. BentoML has no setting for it (it overrides
    ``PROMETHEUS_MULTIPROC_DIR`` for its workers), and a per-server ``BENTOML_HOME`` would hide
    the model store; the smallest patch: its serve function looks up the public
    ``bentoml.serving.ensure_prometheus_dir`` when it starts, and this points that lookup at a
    fresh directory, in the ``mutask serve`` process only (``tests/test_serving_http.py``
    checks two servers stay apart). ``bentoml serve`` users give each server its own
    ``BENTOML_HOME``."""
    import tempfile

    import bentoml.serving

    _METRICS_DIR["path"] = tempfile.mkdtemp(prefix="mutask-prometheus-")
    ensure = bentoml.serving.ensure_prometheus_dir
    if not getattr(ensure, "mutask", False):
        def own_dir(*args, **kwargs):
            kwargs.pop("directory", None)
            return ensure(_METRICS_DIR["path"], *args[1:], **kwargs)

        own_dir.mutask = True
        bentoml.serving.ensure_prometheus_dir = own_dir
    return _METRICS_DIR["path"]


def _cmd_serve(a) -> None:
    from .repository import ENV_ARTIFACT, ENV_MODEL, ServingError
    from .settings import Settings

    for name, value in (("--threads", a.threads), ("--max-batch", a.max_batch), ("--max-image-bytes", a.max_image_bytes)):
        if value is not None and value <= 0:
            raise ServingError(f"{name} must be positive, got {value}")
    settings = Settings.from_env(device=a.device, ort_threads=a.threads, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_image_bytes=a.max_image_bytes,
                                 version=a.version, poll_s=a.poll_s)
    path = Path(a.artifact).expanduser().resolve()
    from .repository import open_served

    number, art = open_served(path, settings.version)  # ServingError (exit 2): missing, truncated or tampered; no such version
    _check_port(a.host, a.port)

    os.environ[ENV_ARTIFACT] = str(path)
    os.environ.pop(ENV_MODEL, None)
    os.environ.update(settings_env(settings))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

    import tempfile

    import bentoml

    fd, error_file = tempfile.mkstemp(prefix="mutask-serve-", suffix=".err")
    os.close(fd)
    os.environ["MUTASK_STARTUP_ERROR_FILE"] = error_file  # a worker that cannot start writes why, and stops the server

    host = f"[{a.host}]" if ":" in a.host else a.host
    url = f"http://{host}:{a.port}"
    print(f"mutask serve: {len(art.tasks)} tasks ({', '.join(art.tasks)}) from {art.path}" + (f" (version {number})" if number else ""), flush=True)
    print(f"mutask serve: listening on {url} (POST {url}/predict, POST {url}/tasks, the page {url}/ui, GET {url}/metrics; Ctrl+C stops)", flush=True)
    import mutask

    working_dir = str(Path(mutask.__file__).resolve().parent.parent)  # where `import mutask` finds this one
    metrics_dir = _own_prometheus_dir()
    try:
        bentoml.serve("mutask.serving.service:Mutask", working_dir=working_dir, host=a.host, port=a.port, blocking=True)
    except KeyboardInterrupt:
        pass
    except ServingError:
        raise
    except Exception as e:  # BentoML failing to start: say so, exit 2
        raise ServingError(f"the server failed to start: {type(e).__name__}: {e}") from None
    finally:
        import shutil

        shutil.rmtree(metrics_dir, ignore_errors=True)
        try:
            failure = Path(error_file).read_text().strip()
            os.unlink(error_file)
        except OSError:
            failure = ""
    if failure:
        raise ServingError(f"the service could not start, the server stopped: {failure}")
    print("mutask serve: stopped", file=sys.stderr)


def settings_env(settings) -> dict[str, str]:
    """The ``MUTASK_*`` environment that makes :meth:`Settings.from_env` return ``settings``
    (how ``mutask serve`` hands its flags to the BentoML worker)."""
    return {f"MUTASK_{k.upper()}": "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.model_dump().items()}
