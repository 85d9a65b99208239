"""autocert's own answers on the lean path: the confirmation page and the port-80 redirect."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Final

from .exchange import Exchange, Handler
from .heads import unmapped

log = logging.getLogger("autocert.server")

CHALLENGE_PREFIX: Final = b"/.well-known/acme-challenge/"

#: A Host header that may be put in a Location: a name, an IPv4 address or a bracketed IPv6
#: address, and an optional port.
_HOST: Final = re.compile(rb"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def host_of(exchange: Exchange) -> bytes:
    """The request's ``Host``, else the address the client connected to."""
    for name, value in exchange.headers:
        if len(name) == 4 and name.lower() == b"host":
            return value
    local = exchange.connection.transport.get_extra_info("sockname")
    if isinstance(local, tuple):
        host = unmapped(str(local[0]))
        return (f"[{host}]" if ":" in host else host).encode()
    return b""


def confirmation_handler() -> Handler:
    """What TLS clients reach when no upstream is configured: a one-line confirmation page."""

    def hello(exchange: Exchange) -> None:
        exchange.respond(200, b"autocert is serving " + host_of(exchange) + b" over HTTPS\n")

    return hello


ChallengeLookup = Callable[[str], Awaitable["str | None"]]


class _Lookup:
    """A pending http-01 answer: the task, cancelled if the client leaves first."""

    __slots__ = ("task",)

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def client_gone(self) -> None:
        self.task.cancel()


def redirect_handler(https_port: int, challenge: ChallengeLookup) -> Handler:
    """Port 80: http-01 answers (looked up with ``challenge``), everything else 308 to https."""

    async def answer(exchange: Exchange, token: str) -> None:
        try:
            key_authorization = await challenge(token) if token else None
        except Exception:
            log.exception("could not look up http-01 token %r", token)
            exchange.respond(500, b"500 could not look up the challenge\n")
            return
        finally:
            exchange.source = None
        if key_authorization is None:
            exchange.respond(404, b"no such ACME challenge\n")
        else:
            exchange.respond(200, key_authorization.encode(), content_type=b"application/octet-stream")

    def redirect(exchange: Exchange) -> None:
        target = exchange.target
        if target[:1] != b"/":  # absolute form: keep the path and query only
            target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
        if exchange.method in (b"GET", b"HEAD") and target.startswith(CHALLENGE_PREFIX):
            token = target[len(CHALLENGE_PREFIX):].partition(b"?")[0].decode("latin-1")
            task = asyncio.get_running_loop().create_task(answer(exchange, token))
            exchange.source = _Lookup(task)
            return
        host = host_of(exchange)
        if not _HOST.fullmatch(host):
            exchange.close = True
            exchange.respond(400, b"400 bad Host header\n")
            return
        if not host.endswith(b"]"):
            host = host.rsplit(b":", 1)[0]
        authority = host if https_port == 443 else host + b":%d" % https_port
        exchange.respond(308, b"", headers=[(b"Location", b"https://" + authority + target)])

    return redirect
