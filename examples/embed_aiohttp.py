"""Embed autocert in your own aiohttp app: the app serves HTTPS with certificates issued on
demand for the names you allowed (`autocert allow NAME`).

Run:  AUTOCERT_DIRECTORY=https://acme.example/dir python examples/embed_aiohttp.py

Settings come from the same environment variables as the CLI (AUTOCERT_DB, AUTOCERT_DIRECTORY,
AUTOCERT_EMAIL, AUTOCERT_CA_BUNDLE) plus EXAMPLE_PORT for the TLS port. http-01 challenges are
answered by the middleware on this app and by any `autocert serve` sharing the database, so
port 80 can be held by either.
"""

from __future__ import annotations

import os

from aiohttp import web

import autocert
from autocert.web import setup

URL = os.environ.get("AUTOCERT_DIRECTORY", "https://acme-v02.api.letsencrypt.org/directory")


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello from {request.host} over HTTPS\n")


manager = autocert.Manager(db=os.environ.get("AUTOCERT_DB", "sqlite:///autocert.db"), directory=URL,
                           email=os.environ.get("AUTOCERT_EMAIL"), agree_tos=True,
                           ca_bundle=os.environ.get("AUTOCERT_CA_BUNDLE"))
app = web.Application()
app.router.add_get("/", hello)
setup(app, manager)                        # http-01 middleware + worker lifecycle (cleanup_ctx)
web.run_app(app, ssl_context=manager.ssl_context(), port=int(os.environ.get("EXAMPLE_PORT", "8443")))
