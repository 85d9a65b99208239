"""HTTP/1.1 on plain asyncio protocols: what ``serve`` answers with and proxies through.

- :mod:`.server`: the client side, one protocol per connection (requests parsed by llhttp
  through ``httptools``), exchanges run one at a time, head and idle deadlines, the drain;
- :mod:`.exchange`: one request and its response, as a handler sees them;
- :mod:`.upstream`: keep-alive connections to an upstream and their pool;
- :mod:`.relay`: raw bytes both ways after a 101, with a WebSocket close on shutdown;
- :mod:`.heads`: header sections as bytes, forwarding headers, autocert's own answers;
- :mod:`.access`: the access log, written in batches off the request path;
- :mod:`.pages`: autocert's own answers (confirmation page, port-80 redirects and http-01).
- :mod:`.hosts`: whether a request names the host its TLS connection was made for (else 421).
"""

from __future__ import annotations

from .exchange import Exchange
from .relay import WebSocketRelay
from .server import BadRequest, HttpConnection, HttpServer
from .upstream import Upstream, UpstreamPool

__all__ = ["BadRequest", "Exchange", "HttpConnection", "HttpServer", "Upstream", "UpstreamPool", "WebSocketRelay"]
