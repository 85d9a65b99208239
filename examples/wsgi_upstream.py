"""A plain WSGI web app (standard library only) to run behind ``autocert serve --upstream``.

    python examples/wsgi_upstream.py --port 8000 &
    autocert allow shop.example.com
    autocert serve --upstream http://127.0.0.1:8000 --email ops@example.com --agree-tos

autocert terminates TLS and forwards each request over plain HTTP on loopback, telling the app
where the request really came from in ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and
``X-Forwarded-For`` (and RFC 7239 ``Forwarded``). ``behind_proxy`` below applies them to the
WSGI environ, the way Werkzeug's ``ProxyFix`` or Django's ``SECURE_PROXY_SSL_HEADER`` do, so
the app builds ``https://`` links and logs the visitor's address. Trust these headers only
when the app is reachable through the proxy alone (listen on 127.0.0.1, or a private network).

Any WSGI server works the same way (gunicorn, waitress, uWSGI); wsgiref keeps this example free
of dependencies. The same file is the ``app`` service of docker-compose.yml.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socketserver
import sys
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def behind_proxy(app: WSGIApp) -> WSGIApp:
    """Let the app see the client's scheme, host and address instead of the proxy's."""

    def wrapped(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        proto = environ.get("HTTP_X_FORWARDED_PROTO")
        if proto in ("http", "https"):
            environ["wsgi.url_scheme"] = proto
        host = environ.get("HTTP_X_FORWARDED_HOST")
        if host:
            environ["HTTP_HOST"] = host
        forwarded_for = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded_for:
            # The proxy appends the address it saw; earlier entries came from the client and
            # prove nothing, so only the last one is used.
            environ["REMOTE_ADDR"] = forwarded_for.split(",")[-1].strip()
        return app(environ, start_response)

    return wrapped


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    method = environ["REQUEST_METHOD"]
    if path == "/healthz":
        return respond(start_response, "200 OK", "text/plain", b"ok\n")
    if path == "/whoami":
        seen = {
            "url": f"{environ['wsgi.url_scheme']}://{environ.get('HTTP_HOST', '')}{path}",
            "scheme": environ["wsgi.url_scheme"],
            "host": environ.get("HTTP_HOST"),
            "client": environ.get("REMOTE_ADDR"),
            "forwarded": environ.get("HTTP_FORWARDED"),
        }
        return respond(start_response, "200 OK", "application/json", json.dumps(seen).encode())
    if path == "/upload" and method == "POST":
        digest, size = hashlib.sha256(), 0
        remaining = int(environ.get("CONTENT_LENGTH") or 0)
        stream = environ["wsgi.input"]
        while remaining > 0:  # in chunks: a large upload never sits in memory whole
            chunk = stream.read(min(remaining, 64 * 1024))
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            remaining -= len(chunk)
        body = json.dumps({"sha256": digest.hexdigest(), "size": size}).encode()
        return respond(start_response, "200 OK", "application/json", body)
    if path == "/":
        page = (
            "<!doctype html><title>WSGI behind autocert</title>"
            f"<h1>Hello from a WSGI app</h1><p>You reached {environ['wsgi.url_scheme']}://{environ.get('HTTP_HOST', '')}/ "
            f"from {environ.get('REMOTE_ADDR')}.</p>"
        )
        return respond(start_response, "200 OK", "text/html; charset=utf-8", page.encode())
    return respond(start_response, "404 Not Found", "text/plain", b"not found\n")


def respond(start_response: StartResponse, status: str, content_type: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per connection, so a slow request does not hold up the others."""

    daemon_threads = True


class ForwardedLogHandler(WSGIRequestHandler):
    """Log requests on stdout with the client's address as the proxy reported it."""

    def log_message(self, format: str, *args: Any) -> None:
        client = self.headers.get("X-Forwarded-For", self.client_address[0]) if self.headers else self.client_address[0]
        print(f"wsgi_upstream: {client} {format % args}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="listen port (default 8000)")
    args = parser.parse_args(argv)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with make_server(args.host, args.port, behind_proxy(app), server_class=ThreadingWSGIServer, handler_class=ForwardedLogHandler) as server:
        print(f"wsgi_upstream: listening on http://{args.host}:{server.server_port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
