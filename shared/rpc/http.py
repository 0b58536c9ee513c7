"""The service's HTTP port: /metrics, and whatever else the composition root routes there.

The port answers only the paths routed to it: GET or HEAD of a route gets its document,
any other path is 404 and any other method on a route 405 (prometheus_client's own
server answers /metrics on every path). The auth service routes its public keys to
`/.well-known/jwks.json` here, for gateways and meshes that take a `jwksUri`.

One thread per connection (like prometheus_client's server), each bounded by a socket
timeout so that a client that stops sending cannot hold one for long. The port is meant
for the cluster (scrapers, gateways), not for the internet: the manifests' NetworkPolicy
says who may reach it.
"""

from __future__ import annotations

import gzip
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["Document", "HttpEndpoints", "Route", "metrics_route"]

_log = logging.getLogger(__name__)
SOCKET_TIMEOUT_SECONDS = 10.0
METRICS_PATH = "/metrics"


@dataclass(frozen=True, slots=True)
class Document:
    """What a route answers: the body, its media type, how long it may be cached, and the
    HTTP status (200 unless a health route says otherwise)."""

    body: bytes
    content_type: str
    max_age_seconds: int = 0
    status: HTTPStatus = HTTPStatus.OK


Route = Callable[[Mapping[str, str]], Document]
"""Builds the document for one request, given its headers (lower-cased names)."""


def metrics_route(registry: CollectorRegistry) -> Route:
    """The Prometheus exposition of `registry`, in the format the scraper accepts."""

    def render(headers: Mapping[str, str]) -> Document:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return Document(encoder(registry), content_type)

    return render


class _Handler(BaseHTTPRequestHandler):
    server_version = "agentplatform"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_SECONDS
    routes: Mapping[str, Route] = {}

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _refuse_method(self) -> None:
        path = urlsplit(self.path).path
        if path in self.routes:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", allow=True)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n")

    def do_POST(self) -> None:
        self._refuse_method()

    def do_PUT(self) -> None:
        self._refuse_method()

    def do_DELETE(self) -> None:
        self._refuse_method()

    def do_PATCH(self) -> None:
        self._refuse_method()

    def do_OPTIONS(self) -> None:
        self._refuse_method()

    def _answer(self, *, send_body: bool) -> None:
        route = self.routes.get(urlsplit(self.path).path)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", send_body=send_body)
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            document = route(headers)
        except Exception:
            _log.exception("HTTP %s failed", urlsplit(self.path).path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", send_body=send_body)
            return
        body, encoding = document.body, None
        if "gzip" in headers.get("accept-encoding", "") and len(body) > 1024:
            body, encoding = gzip.compress(body), "gzip"
        cache = f"public, max-age={document.max_age_seconds}" if document.max_age_seconds else None
        self._send(
            document.status,
            body,
            content_type=document.content_type,
            cache_control=cache or "no-store",
            send_body=send_body,
            content_encoding=encoding,
        )

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        cache_control: str = "no-store",
        send_body: bool = True,
        allow: bool = False,
        content_encoding: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache_control)
        self.send_header("X-Content-Type-Options", "nosniff")
        if allow:
            self.send_header("Allow", "GET, HEAD")
        if content_encoding:
            self.send_header("Content-Encoding", content_encoding)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (scrapes every few seconds would drown the log)."""

    def log_error(self, format: str, *args: Any) -> None:
        _log.debug("HTTP: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _server_class(host: str, port: int) -> tuple[type[_Server], tuple[Any, ...]]:
    """The server class for the host's address family (IPv4 or IPv6), and its address."""
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return type("Server", (_Server,), {"address_family": family}), address


class HttpEndpoints:
    """An HTTP server answering GET/HEAD on its routes, 404 elsewhere."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Route]) -> None:
        handler = type("Handler", (_Handler,), {"routes": dict(routes)})
        server_class, address = _server_class(host, port)
        self._server = server_class(address, handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"http-{port}", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops accepting and closes the socket (requests under way finish on their own)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
