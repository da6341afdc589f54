"""Connection limits BentoML has no setting for (``docs/serving.md``): uvicorn's httptools
protocol with them added (:class:`GuardedHttpToolsProtocol`), answering as uvicorn answers a
malformed request (a short response, the connection closed), before the application:

* request line + headers over ``max_header_bytes``, or over ``max_headers`` headers: 431;
* headers not complete within ``header_timeout_s`` of their first byte (or of the connection): 408;
* a body not complete within ``body_timeout_s`` of its headers: the connection is closed;
* over ``max_connections`` connections: the oldest idle one (waiting for headers: 408; kept
  alive between requests: closed) makes room; when none is idle, the new one is answered 503;
* a kept-alive connection stays ``keep_alive_s`` (longer than clients' own expiry: they close first);
* a path the service does not serve: 404 (BentoML's metrics label requests by their raw path: a
  scan of random URLs would add series without bound).

:func:`install` makes it uvicorn's protocol (in a server worker, before uvicorn's configuration
loads); :func:`configure` gives it the settings and paths when the service starts.
"""

from __future__ import annotations

import json
import logging
import urllib.parse

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import Settings

log = logging.getLogger("mutask.serving")

_REASONS = {404: "Not Found", 408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class Limits:
    settings = Settings.model_construct()  # the defaults, until configure()
    paths: frozenset | None = None  # the paths served (None: any), and every path under prefixes
    prefixes: tuple = ()


def configure(settings: Settings, paths=None, prefixes: tuple = ()) -> None:
    Limits.settings, Limits.paths, Limits.prefixes = settings, None if paths is None else frozenset(paths), tuple(prefixes)


def request_path(url: bytes) -> str | None:
    """A request target's path as the application will see it (percent-decoded, no trailing
    slash), or None when it does not parse (uvicorn answers that itself)."""
    try:
        path = urllib.parse.unquote(httptools.parse_url(url).path.decode("latin-1"))
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError, ValueError):
        return None
    return path.rstrip("/") or "/"


def install() -> None:
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = config.HTTP_PROTOCOLS["httptools"] = f"{__name__}:GuardedHttpToolsProtocol"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, time and connection limits (see the module)."""

    def connection_made(self, transport) -> None:
        self._timer = None
        self._refused = False
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._opened = self.loop.time()
        if len(self.connections) >= Limits.settings.max_connections and not self._evict_idle():
            self.transport = transport  # for connection_lost
            self._refuse(503, f"the server has {Limits.settings.max_connections} connections busy with requests (MUTASK_MAX_CONNECTIONS); retry later")
            return
        self.timeout_keep_alive = Limits.settings.keep_alive_s  # uvicorn arms it after each response
        super().connection_made(transport)
        self._arm(Limits.settings.header_timeout_s)

    def _evict_idle(self) -> bool:
        """Close the oldest idle connection (waiting for request headers: answered 408; between
        requests: closed, as its keep-alive expiring would); False if none is idle."""
        idle = [c for c in self.connections if isinstance(c, GuardedHttpToolsProtocol) and not c._refused
                and (c._awaiting_headers or (c.cycle is not None and c.cycle.response_complete))]  # or kept alive
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._opened)
        if oldest._awaiting_headers:
            oldest._refuse(408, f"closed to make room: the server holds {Limits.settings.max_connections} connections (MUTASK_MAX_CONNECTIONS)")
        else:
            oldest._refused = True
            oldest._disarm()
            oldest.transport.close()
        self.connections.discard(oldest)
        return True

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._awaiting_headers and not self._refused:
            self._header_bytes += len(data)
            if self._header_bytes > Limits.settings.max_header_bytes:
                self._refuse(431, f"request line and headers are over {Limits.settings.max_header_bytes} bytes (MUTASK_MAX_HEADER_BYTES)")

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal stops the parser with an error: it is answered already
            super().send_400_response(msg)

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._header_bytes = self._header_count = 0
        self._arm(Limits.settings.header_timeout_s)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > Limits.settings.max_headers:
            self._refuse(431, f"more than {Limits.settings.max_headers} request headers (MUTASK_MAX_HEADERS)")
            raise ValueError("too many headers")  # stops httptools' parser
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        if Limits.paths is not None:
            path = request_path(self.url)
            if path is not None and path not in Limits.paths and not path.startswith(Limits.prefixes):
                shown = path if len(path) <= 80 else path[:80] + "..."
                self._refuse(404, f"no such path {shown!r}: this server answers POST /predict, /predict_tasks, /predict_batch, /tasks (API docs at /)")
                raise ValueError("unknown path")  # stops httptools' parser; nothing reaches the application
        self._arm(Limits.settings.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # limits
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._awaiting_headers:
            self._refuse(408, f"no complete request headers within {Limits.settings.header_timeout_s:g} s (MUTASK_HEADER_TIMEOUT_S)")
        else:  # a body still arriving: the application is waiting on it and will see a disconnect
            log.debug("closing a connection whose body took over %g s", Limits.settings.body_timeout_s)
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close the connection."""
        self._refused = True
        self._disarm()
        body = json.dumps({"error": message}).encode()
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        if not self.transport.is_closing():
            self.transport.write(head.encode("latin-1") + body)
            self.transport.close()
