"""The HTTP/1.1 layer under ``serve`` in process, on asyncio and on uvloop: deadlines for slow
and idle clients, autocert's own answers, and how a malformed request is turned away.

``tests/test_proxy.py`` runs the same layer end to end behind TLS; the smuggling cases are in
``tests/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from support import free_port, websocket_echo

from autocert._http import HttpServer
from autocert._http.server import HttpConnection
from autocert._http.pages import confirmation_handler, redirect_handler
from autocert._proxy import ProxyHandler


# The newer hook (pytest_asyncio_loop_factories) must answer for every test of the suite.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture:DeprecationWarning")


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


@pytest.fixture()
async def serve_http() -> AsyncIterator[Callable[..., Any]]:
    """Start an :class:`HttpServer` for a handler on loopback; returns its port."""
    started: list[tuple[asyncio.Server, HttpServer]] = []

    async def start(handler: Any, **options: Any) -> int:
        http = HttpServer(handler, tls=options.pop("tls", False), on_close=getattr(handler, "close", None), **options)
        server = await asyncio.get_running_loop().create_server(http, "127.0.0.1", 0)
        started.append((server, http))
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server, http in started:
        server.close()
        await http.shutdown(5)


async def exchange(port: int, request: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Send ``request`` on a new connection; the status line, headers and body that come back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}, body


async def closed_after(reader: asyncio.StreamReader, limit: float = 10) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and whatever it sent before."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout=limit)
    return time.monotonic() - started, data


# -- deadlines --------------------------------------------------------------------------------------


async def test_a_silent_client_and_a_half_sent_head_are_closed_at_the_header_bound(serve_http) -> None:
    port = await serve_http(confirmation_handler(), header_timeout=0.4, idle_timeout=30)
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
    half_reader, half_writer = await asyncio.open_connection("127.0.0.1", port)
    half_writer.write(b"GET / HTTP/1.1\r\nHost: slow.example\r\nX-Drip: 1")
    (silent_seconds, silent_data), (half_seconds, half_data) = await asyncio.gather(
        closed_after(silent_reader), closed_after(half_reader))
    for writer in (silent_writer, half_writer):
        writer.close()
    assert silent_data == b"" and half_data == b"", "nothing is answered to a head that never completed"
    assert 0.35 <= silent_seconds < 3 and 0.35 <= half_seconds < 3, (silent_seconds, half_seconds)


async def test_a_kept_alive_connection_waits_for_the_idle_bound_not_the_header_bound(serve_http) -> None:
    port = await serve_http(confirmation_handler(), header_timeout=0.3, idle_timeout=1.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nHost: idle.example\r\n\r\n"
    for pause in (0.0, 0.8):  # the second request comes well after the header bound
        await asyncio.sleep(pause)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    seconds, data = await closed_after(reader)
    writer.close()
    assert data == b""
    assert 1.3 <= seconds < 5, seconds


async def test_streams_and_websockets_outlive_both_bounds(serve_http) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for index in range(4):
            await asyncio.sleep(0.3)
            await response.write(b"part %d\n" % index)
        return response

    app = web.Application()
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/ws", websocket_echo)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    try:
        port = await serve_http(ProxyHandler(f"http://127.0.0.1:{upstream.port}"), header_timeout=0.2, idle_timeout=0.3)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/trickle") as response:
                assert await response.read() == b"part 0\npart 1\npart 2\npart 3\n"
            async with session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                await asyncio.sleep(1.0)
                await ws.send_str("still here")
                message = await ws.receive(timeout=10)
                assert message.type is WSMsgType.TEXT and message.data == "still here"
    finally:
        await upstream.close()


# -- autocert's own answers ---------------------------------------------------------------------------


async def test_own_answers_carry_no_server_banner_and_nosniff(serve_http) -> None:
    async def no_challenge(token: str) -> str | None:
        return "key-authorization" if token == "known" else None

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the request, never answers
        writer.close()

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    page = await serve_http(confirmation_handler(), tls=True, hsts=True)
    redirects = await serve_http(redirect_handler(8443, no_challenge))
    dead = await serve_http(ProxyHandler(f"http://127.0.0.1:{free_port()}"), tls=True, hsts=True)
    slow = await serve_http(ProxyHandler(f"http://127.0.0.1:{mute.sockets[0].getsockname()[1]}", read_timeout=0.3), tls=True, hsts=True)
    named = HttpServer(confirmation_handler(), tls=True, hsts=True)
    misdirected = await asyncio.get_running_loop().create_server(lambda: named("shop.example"), "127.0.0.1", 0)
    answers = {
        "page": (await exchange(page, b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"), True),
        "502": (await exchange(dead, b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"), True),
        "400": (await exchange(page, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), True),
        "308": (await exchange(redirects, b"GET /a?b HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"), False),
        "http-01": (await exchange(redirects, b"GET /.well-known/acme-challenge/known HTTP/1.1\r\nHost: shop.example\r\n"
                                              b"Connection: close\r\n\r\n"), False),
        "404": (await exchange(redirects, b"GET /.well-known/acme-challenge/nope HTTP/1.1\r\nHost: shop.example\r\n"
                                          b"Connection: close\r\n\r\n"), False),
        "504": (await exchange(slow, b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"), True),
        "421": (await exchange(misdirected.sockets[0].getsockname()[1], b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n"), True),
    }
    for server in (mute, misdirected):
        server.close()
    await named.shutdown(5)
    for label, ((status, headers, _body), tls) in answers.items():
        assert status.split(b" ")[1] == label.encode() if label.isdigit() else status.startswith(b"HTTP/1.1 "), label
        assert b"server" not in headers, f"{label}: {headers[b'server']!r}"
        assert headers[b"x-content-type-options"] == b"nosniff", label
        assert (b"strict-transport-security" in headers) == tls, label
    assert answers["page"][0][2] == b"autocert is serving shop.example over HTTPS\n"
    assert answers["308"][0][1][b"location"] == b"https://shop.example:8443/a?b"
    assert answers["http-01"][0][0].startswith(b"HTTP/1.1 200") and answers["http-01"][0][2] == b"key-authorization"
    assert b"502 Bad Gateway" in answers["502"][0][2]


async def test_a_malformed_request_logs_one_line_and_gets_400(serve_http, caplog: pytest.LogCaptureFixture) -> None:
    port = await serve_http(confirmation_handler())
    caplog.set_level(logging.DEBUG, logger="autocert")
    status, headers, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 "), status
    assert headers[b"connection"] == b"close"
    await asyncio.sleep(0.1)
    (record,) = [record for record in caplog.records if record.name.startswith("autocert")]
    assert record.levelno == logging.INFO and record.exc_info is None, record
    assert "bad request from 127.0.0.1" in record.getMessage() and "\n" not in record.getMessage()


async def test_http_1_0_and_pipelined_requests_are_answered_in_order(serve_http) -> None:
    port = await serve_http(confirmation_handler())
    status, headers, body = await exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200") and headers[b"connection"] == b"close"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: one\r\n\r\nHEAD / HTTP/1.1\r\nHost: two\r\n\r\n"
                 b"GET / HTTP/1.1\r\nHost: three\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    bodies = [part for part in raw.split(b"HTTP/1.1 200 OK\r\n") if part]
    assert len(bodies) == 3
    assert bodies[0].endswith(b"serving one over HTTPS\n") and bodies[1].endswith(b"\r\n\r\n")
    assert bodies[2].endswith(b"serving three over HTTPS\n")


async def test_the_access_log_writes_one_line_per_request_a_moment_later(serve_http, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autocert.access")
    logged = await serve_http(confirmation_handler(), access_log=True)
    quiet = await serve_http(confirmation_handler(), access_log=False)
    for port, agent in ((logged, b"logged-client"), (quiet, b"quiet-client")):
        await exchange(port, b"GET /page?x=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: " + agent + b"\r\nConnection: close\r\n\r\n")
    await asyncio.sleep(0.6)
    lines = [record.getMessage() for record in caplog.records if record.name == "autocert.access"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("127.0.0.1 [") and '"GET /page?x=1 HTTP/1.1" 200 ' in lines[0] and '"logged-client"' in lines[0]


async def test_expect_100_continue_is_answered_here_and_1xx_from_the_upstream_pass_on(serve_http) -> None:
    async def upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"expect" not in head.lower(), "Expect must not reach the upstream"
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(upstream_connection, "127.0.0.1", 0)
    try:
        port = await serve_http(ProxyHandler(f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", "the client must not have to wait to send its body"
        writer.write(b"hello")
        rest = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
    finally:
        upstream.close()
    early, _, final = rest.partition(b"\r\n\r\n")
    assert early.startswith(b"HTTP/1.1 103 Early Hints\r\n") and b"Link: </style.css>; rel=preload" in early
    assert final.startswith(b"HTTP/1.1 200 OK\r\n") and final.endswith(b"\r\n\r\nhello")


async def test_oversized_heads_get_431_and_unknown_versions_505(serve_http) -> None:
    port = await serve_http(confirmation_handler())
    huge = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 1000) for i in range(40))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for start in range(0, len(huge), 4096):  # in several reads, as a slow client sends it
        writer.write(huge[start:start + 4096])
        await writer.drain()
        await asyncio.sleep(0.01)
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    assert (await exchange(port, many))[0].startswith(b"HTTP/1.1 431 ")
    assert (await exchange(port, b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"))[0].startswith(b"HTTP/1.1 505 ")


# -- requests for another host than the TLS name ----------------------------------------------------


async def test_a_request_for_another_host_than_the_tls_name_gets_421(serve_http) -> None:
    """The check itself, through the connection the front makes for an SNI name (in process; the
    served and proxied cases run end to end in tests/test_hosts.py)."""
    http = HttpServer(confirmation_handler(), tls=True)
    server = await asyncio.get_running_loop().create_server(lambda: http("xn--bcher-kva.example"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        same = [b"xn--bcher-kva.example", b"XN--Bcher-KVA.Example.", b"xn--bcher-kva.example:8443", "bücher.example".encode(),
                "B\u00dcCHER.example.:443".encode()]
        for host in same:
            status, _, body = await exchange(port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 200 "), (host, status)
        other = [b"other.example", b"xn--bcher-kva.example.evil", b"xn--bcher-kva.example:x", b"[::1]", b"127.0.0.1", b"\xff"]
        for host in other:
            status, headers, body = await exchange(port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert status == b"HTTP/1.1 421 Misdirected Request", (host, status)
            assert headers[b"connection"] == b"close" and headers[b"x-content-type-options"] == b"nosniff"
            assert b"421 Misdirected Request" in body and b"server" not in headers
        absolute = b"GET https://other.example/ HTTP/1.1\r\nHost: xn--bcher-kva.example\r\n\r\n"
        assert (await exchange(port, absolute))[0].startswith(b"HTTP/1.1 421 "), "an absolute target names its own host"
        absolute = b"GET https://xn--bcher-kva.example:8443/ HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"
        assert (await exchange(port, absolute))[0].startswith(b"HTTP/1.1 200 "), "and then Host is ignored"
        assert (await exchange(port, b"GET / HTTP/1.0\r\n\r\n"))[0].startswith(b"HTTP/1.1 200 "), "no Host names no other host"
        two = b"GET / HTTP/1.1\r\nHost: xn--bcher-kva.example\r\nHost: other.example\r\n\r\n"
        assert (await exchange(port, two))[0].startswith(b"HTTP/1.1 400 ")
        # A kept-alive connection: the first request matches, a later one for another host does not.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: xn--bcher-kva.example:8443\r\n\r\nGET / HTTP/1.1\r\nHost: xn--bcher-kva.example:8443\r\n\r\n"
                     b"GET / HTTP/1.1\r\nHost: other.example:8443\r\n\r\nGET / HTTP/1.1\r\nHost: xn--bcher-kva.example\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        assert re.findall(rb"HTTP/1\.1 (\d+) ", raw) == [b"200", b"200", b"421"], raw
    finally:
        server.close()
        await http.shutdown(5)
    off = HttpServer(confirmation_handler(), tls=True, host_check=False)
    server = await asyncio.get_running_loop().create_server(lambda: off("xn--bcher-kva.example"), "127.0.0.1", 0)
    try:
        status, _, body = await exchange(server.sockets[0].getsockname()[1],
                                         b"GET / HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200 ") and body == b"autocert is serving other.example over HTTPS\n"
    finally:
        server.close()
        await off.shutdown(5)


async def test_a_finished_connection_is_freed_at_once_not_by_the_cyclic_collector() -> None:
    """A connection's objects (behind the front: its TLS state too) must go when it closes, by
    reference counting: left in a cycle, they wait for a collection, and a busy server then
    runs full collections that hold its loop for a tenth of a second each."""
    http = HttpServer(confirmation_handler(), tls=False)
    server = await asyncio.get_running_loop().create_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            status, _, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 200 ")
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HT")  # half a head, then gone
        await writer.drain()
        writer.close()
        deadline = time.monotonic() + 30
        while http.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not http.connections
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = sum(isinstance(thing, HttpConnection) for thing in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        server.close()
        await http.shutdown(5)
    assert left == 0, f"{left} connections were left to the cyclic collector"
