"""The page at ``/ui``: try every task from a browser (``serving/ui/``: plain HTML and
JavaScript, no build step). The page uses only the public HTTP API (``POST /tasks``,
``POST /predict_tasks``, ``POST /predict``); these routes only hand out its two files, and
:data:`PATHS` is what the service adds to the paths its HTTP guard lets through."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.routing import Route

UI_DIR = Path(__file__).resolve().parent / "ui"
FILES = {"/ui/app.js": ("app.js", "text/javascript; charset=utf-8"), "/ui/index.html": ("index.html", "text/html; charset=utf-8")}
PATHS = frozenset({"/ui", *FILES})  # what the HTTP guard lets through (it strips a trailing slash)


async def _index(request):
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})


def _file(name: str, media: str):
    async def serve(request):
        return FileResponse(UI_DIR / name, media_type=media, headers={"cache-control": "no-cache"})

    return serve


ROUTES = [Route("/ui", _index, methods=["GET"]), Route("/ui/", _index, methods=["GET"])] + [
    Route(path, _file(name, media), methods=["GET"]) for path, (name, media) in FILES.items()
]
