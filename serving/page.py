"""The page at ``/ui``: try every task from a browser (``serving/ui/``: plain HTML and JavaScript
that call the public HTTP API only). These routes hand out its two files; :data:`PATHS` is what
the service adds to the paths its HTTP guard lets through (the guard strips a trailing slash)."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.routing import Route

UI_DIR = Path(__file__).resolve().parent / "ui"
HTML, JS = ("index.html", "text/html; charset=utf-8"), ("app.js", "text/javascript; charset=utf-8")
FILES = {"/ui": HTML, "/ui/": HTML, "/ui/index.html": HTML, "/ui/app.js": JS}
PATHS = frozenset(path.rstrip("/") for path in FILES)


def _file(name: str, media: str):
    async def serve(request):
        return FileResponse(UI_DIR / name, media_type=media, headers={"cache-control": "no-cache"})

    return serve


ROUTES = [Route(path, _file(*spec), methods=["GET"]) for path, spec in FILES.items()]
