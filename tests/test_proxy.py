"""The reverse proxy behind ``autocert serve --upstream``.

The end-to-end tests run the real server against a real Pebble, with a real upstream app on
loopback and verified TLS clients. The in-process tests at the end cover what is hard to
provoke through a whole server (timeouts, an upstream breaking off mid-body, streaming).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.client
import json
import random
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from support import (
    ServeProcess,
    eventually,
    free_port,
    run_cli,
    served_certificate,
    websocket_echo,
)

from yarl import URL

from autocert._errors import ConfigError
from autocert._http import HttpServer
from autocert._http.heads import Origin, forwarded_headers, strip_hop_by_hop
from autocert._proxy import ProxyHandler

NAME = "proxy.example.test"
FIVE_MB = 5 * 1024 * 1024


def payload(size: int, seed: int) -> bytes:
    """Incompressible, reproducible bytes: a proxy that mangles or truncates them shows."""
    return random.Random(seed).randbytes(size)


# -- a real upstream app on loopback, in a thread of its own --------------------------------------


class Upstream:
    """An aiohttp app on its own event loop thread, so blocking and async clients both work.

    It records what it received, which is how tests see the proxy from the upstream's side.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self.websocket_closes: list[int | None] = []
        self.slow_started = threading.Event()
        self.slow_release = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/download", self._download)
        app.router.add_post("/upload", self._upload)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/hop", self._hop)
        app.router.add_get("/trickle", self._trickle)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    def _record(self, request: web.Request, **extra: Any) -> dict[str, Any]:
        entry = {"method": request.method, "path": request.raw_path, "headers": list(request.headers.items()), **extra}
        self.requests.append(entry)
        return entry

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(self._record(request, body=body.decode(errors="replace")))

    async def _upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        self._record(request)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        data = payload(int(request.query["size"]), int(request.query.get("seed", "1")))
        response = web.StreamResponse()
        if "length" in request.query:
            response.content_length = len(data)
        await response.prepare(request)
        for start in range(0, len(data), 64 * 1024):
            await response.write(data[start : start + 64 * 1024])
        await response.write_eof()
        return response

    async def _slow(self, request: web.Request) -> web.Response:
        self._record(request)
        self.slow_started.set()
        released = await asyncio.to_thread(self.slow_release.wait, 60)
        assert released, "the test never released the slow request"
        return web.Response(body=payload(256 * 1024, 7))

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        """``parts`` lines, ``every`` seconds apart: a stream quieter than the proxy's bounds."""
        response = web.StreamResponse()
        await response.prepare(request)
        for index in range(int(request.query.get("parts", "3"))):
            await asyncio.sleep(float(request.query.get("every", "1")))
            await response.write(b"part %d\n" % index)
        await response.write_eof()
        return response

    async def _hop(self, request: web.Request) -> web.Response:
        return web.Response(
            text="hop\n",
            headers={
                "Connection": "X-Upstream-Private",
                "X-Upstream-Private": "must not leave",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": 'Basic realm="internal"',
                "X-Kept": "yes",
            },
        )

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(f"echo:{message.data}")
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(bytes(reversed(message.data)))
        self.websocket_closes.append(ws.close_code)
        return ws

    # lifecycle

    def start(self) -> Upstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._start_site())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="upstream", daemon=True)
        self._thread.start()
        assert ready.wait(30), "the upstream app did not start"
        return self

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self.slow_release.set()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = None
        self._thread = None


@pytest.fixture()
def upstream() -> Iterator[Upstream]:
    app = Upstream().start()
    yield app
    app.stop()


@pytest.fixture(params=["uvloop", "asyncio"])
def proxy(request: pytest.FixtureRequest, pebble, upstream: Upstream, root_ca: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``autocert serve --upstream`` (extra args allowed) with a certificate for NAME, on each loop."""
    db = f"sqlite:///{tmp_path / 'autocert.db'}"
    assert run_cli("allow", NAME, db=db).returncode == 0
    started: list[ServeProcess] = []

    def start(*extra: str) -> ServeProcess:
        server = ServeProcess(db, pebble, tmp_path, extra=["--upstream", f"http://127.0.0.1:{upstream.port}", *extra],
                              env={"AUTOCERT_EVENT_LOOP": request.param})
        started.append(server)
        server.start()
        served_certificate(server.https_port, NAME, root_ca, timeout=60)
        return server

    yield start
    for server in started:
        server.stop()


class LoopbackResolver(AbstractResolver):
    """Every name is 127.0.0.1, so clients use real names (SNI, Host, verification) on loopback."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


def client_session(root_ca: str) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=root_ca), resolver=LoopbackResolver())
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120))


def header_values(entry: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in entry["headers"] if key.lower() == name.lower()]


# -- end to end: real Pebble, real serve, real upstream ---------------------------------------------


async def test_request_reaches_upstream_with_forwarding_headers_and_original_host(proxy, upstream: Upstream, root_ca: str) -> None:
    server = proxy()
    url = f"https://{NAME}:{server.https_port}/some/path%2Fencoded?q=1&q=2"
    async with client_session(root_ca) as session:
        spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example"}
        async with session.post(url, data=b"hello upstream", headers=spoofed) as response:
            assert response.status == 200
            assert "Strict-Transport-Security" not in response.headers
            seen = await response.json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/some/path%2Fencoded?q=1&q=2", "the path and query must reach the upstream unchanged"
    assert seen["body"] == "hello upstream"
    assert header_values(seen, "Host") == [f"{NAME}:{server.https_port}"], "the original Host must be kept"
    assert header_values(seen, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"], "appended to, never replaced"
    assert header_values(seen, "X-Real-IP") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["https"]
    assert header_values(seen, "X-Forwarded-Host") == [f"{NAME}:{server.https_port}"]
    assert header_values(seen, "Forwarded") == [f'for=127.0.0.1;host="{NAME}:{server.https_port}";proto=https']


async def test_hop_by_hop_headers_are_stripped_both_ways(proxy, upstream: Upstream, root_ca: str) -> None:
    server = proxy()

    def exchange() -> tuple[dict[str, Any], http.client.HTTPResponse, bytes]:
        context = ssl.create_default_context(cafile=root_ca)
        connection = http.client.HTTPSConnection("127.0.0.1", server.https_port, context=context, timeout=30)
        connection.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", server.https_port), timeout=30), server_hostname=NAME)
        connection.putrequest("GET", "/echo", skip_host=True, skip_accept_encoding=True)
        for key, value in [
            ("Host", NAME),
            ("Connection", "keep-alive, X-Client-Private"),
            ("X-Client-Private", "must not pass"),
            ("Keep-Alive", "300"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy", "http://attacker.example:8080"),  # httpoxy: would become HTTP_PROXY in a CGI app
            ("X-End-To-End", "kept"),
        ]:
            connection.putheader(key, value)
        connection.endheaders()
        first = connection.getresponse()
        seen = json.loads(first.read())
        connection.request("GET", "/hop", headers={"Host": NAME})
        second = connection.getresponse()
        body = second.read()
        connection.close()
        return seen, second, body

    seen, response, body = await asyncio.to_thread(exchange)
    received = {key.lower() for key, _ in seen["headers"]}
    for name in ("connection", "x-client-private", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection", "proxy"):
        assert name not in received, f"{name} reached the upstream"
    assert header_values(seen, "X-End-To-End") == ["kept"]
    assert body == b"hop\n"
    assert response.getheader("X-Kept") == "yes"
    for name in ("X-Upstream-Private", "Keep-Alive", "Proxy-Authenticate"):
        assert response.getheader(name) is None, f"{name} reached the client"
    assert "x-upstream-private" not in (response.getheader("Connection") or "").lower()


async def test_websocket_echo_passes_both_ways(proxy, upstream: Upstream, root_ca: str) -> None:
    server = proxy()
    async with client_session(root_ca) as session:
        async with session.ws_connect(f"wss://{NAME}:{server.https_port}/ws", protocols=("chat",)) as ws:
            assert ws.protocol == "chat", "the subprotocol the upstream chose must reach the client"
            await ws.send_str("hello")
            assert (await ws.receive(timeout=10)).data == "echo:hello"
            await ws.send_bytes(b"\x00\x01\x02binary")
            assert (await ws.receive(timeout=10)).data == b"yranib\x02\x01\x00"
            big = payload(1024 * 1024, 3)
            await ws.send_bytes(big)
            assert (await ws.receive(timeout=10)).data == big[::-1]
            await ws.close(code=4001, message=b"done")
            assert ws.close_code == 4001
    eventually(lambda: upstream.websocket_closes, timeout=10, what="the upstream to see the close")
    assert upstream.websocket_closes == [4001], "the client's close code must reach the upstream"
    (seen,) = [entry for entry in upstream.requests if entry["path"] == "/ws"]
    assert header_values(seen, "X-Forwarded-Proto") == ["https"]
    assert header_values(seen, "Host") == [f"{NAME}:{server.https_port}"]


async def test_five_megabytes_each_way_arrive_intact(proxy, upstream: Upstream, root_ca: str, tmp_path: Path) -> None:
    server = proxy()
    data = payload(FIVE_MB, 42)
    async with client_session(root_ca) as session:
        async with session.post(f"https://{NAME}:{server.https_port}/upload", data=data) as response:
            assert await response.json() == {"sha256": hashlib.sha256(data).hexdigest(), "size": FIVE_MB}
        # Chunked from the upstream, then with a Content-Length.
        for seed, extra in ((5, ""), (6, "&length=1")):
            async with session.get(f"https://{NAME}:{server.https_port}/download?size={FIVE_MB}&seed={seed}{extra}") as response:
                assert response.status == 200
                received = await response.read()
            assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload(FIVE_MB, seed)).hexdigest()

    # curl sends "Expect: 100-continue" for a body this size: the proxy must not deadlock on it.
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    result = await asyncio.to_thread(
        subprocess.run,
        ["curl", "--silent", "--show-error", "--fail", "--max-time", "60", "--cacert", root_ca,
         "--resolve", f"{NAME}:{server.https_port}:127.0.0.1", "--data-binary", f"@{upload}",
         f"https://{NAME}:{server.https_port}/upload"],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sha256"] == hashlib.sha256(data).hexdigest()


async def test_upstream_down_gives_502_and_recovers_without_restart(proxy, upstream: Upstream, root_ca: str) -> None:
    server = proxy()
    url = f"https://{NAME}:{server.https_port}/page"
    async with client_session(root_ca) as session:
        async with session.get(url) as response:
            assert response.status == 200
        await asyncio.to_thread(upstream.stop)
        async with session.get(url) as response:
            assert response.status == 502
            assert response.content_type == "text/html"
            page = await response.text()
            assert "502 Bad Gateway" in page
            assert str(upstream.port) not in page, "the error page must not reveal the upstream address"
        await asyncio.to_thread(upstream.start)
        async with session.get(url) as response:
            assert response.status == 200, "the proxy must reach the upstream again once it is back"
    assert server.process is not None and server.process.poll() is None


async def test_sigterm_lets_a_slow_request_finish(proxy, upstream: Upstream, root_ca: str) -> None:
    server = proxy()
    async with client_session(root_ca) as session:
        in_flight = asyncio.ensure_future(session.get(f"https://{NAME}:{server.https_port}/slow"))
        assert await asyncio.to_thread(upstream.slow_started.wait, 30), "the slow request never reached the upstream"
        server.signal(signal.SIGTERM)
        await asyncio.to_thread(eventually, lambda: "shutting down" in server.stderr_path.read_text(), timeout=10,
                                what="serve to start shutting down")
        # New connections are refused while the slow request drains.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.https_port), timeout=5).close()
        upstream.slow_release.set()
        response = await asyncio.wait_for(in_flight, timeout=30)
        async with response:
            assert response.status == 200
            assert await response.read() == payload(256 * 1024, 7)
    assert server.process is not None
    assert await asyncio.to_thread(server.process.wait, 30) == 0
    assert "Traceback" not in server.stderr_path.read_text()


async def test_hsts_flag_adds_the_header(proxy, upstream: Upstream, root_ca: str) -> None:
    server = proxy("--hsts")
    async with client_session(root_ca) as session:
        async with session.get(f"https://{NAME}:{server.https_port}/") as response:
            assert response.status == 200
            assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
        await asyncio.to_thread(upstream.stop)
        async with session.get(f"https://{NAME}:{server.https_port}/") as response:
            assert response.status == 502
            assert response.headers["Strict-Transport-Security"] == "max-age=31536000", "error pages need it too"


def test_silent_and_slow_clients_after_the_handshake_are_closed_at_their_bounds(proxy, root_ca: str) -> None:
    """After TLS: nothing sent, or half a head, is closed at --header-timeout; a kept-alive
    connection lives until --idle-timeout, which is longer, then is closed."""
    server = proxy("--header-timeout", "1", "--idle-timeout", "3")
    context = ssl.create_default_context(cafile=root_ca)

    def connect() -> ssl.SSLSocket:
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", server.https_port), timeout=15), server_hostname=NAME)
        tls.settimeout(15)
        return tls

    def seconds_until_closed(tls: ssl.SSLSocket) -> tuple[float, bytes]:
        started = time.monotonic()
        data = b""
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except (ssl.SSLError, ConnectionError):
            pass
        return time.monotonic() - started, data

    silent = connect()
    half = connect()
    half.sendall(b"GET /echo HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\nX-Slow: ")
    for tls in (silent, half):
        waited, data = seconds_until_closed(tls)
        tls.close()
        assert data == b"" and waited < 5, (waited, data)

    kept = connect()
    request = b"GET /echo HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n"
    for pause in (0, 1.8):  # past the header bound, within the idle bound
        time.sleep(pause)
        kept.sendall(request)
        response = http.client.HTTPResponse(kept)  # type: ignore[arg-type]
        response.begin()
        assert response.status == 200
        response.read()
    waited, data = seconds_until_closed(kept)
    kept.close()
    assert data == b"" and 2 <= waited < 7, waited


async def test_websockets_and_streams_outlive_the_header_and_idle_bounds(proxy, upstream: Upstream, root_ca: str) -> None:
    server = proxy("--header-timeout", "1", "--idle-timeout", "1")
    async with client_session(root_ca) as session, session.ws_connect(f"wss://{NAME}:{server.https_port}/ws") as ws:
        await asyncio.sleep(2.5)  # quiet for longer than either bound
        await ws.send_str("after a pause")
        assert (await ws.receive(timeout=10)).data == "echo:after a pause"
        async with session.get(f"https://{NAME}:{server.https_port}/trickle?parts=3&every=0.8") as response:
            assert await response.read() == b"part 0\npart 1\npart 2\n", "a stream quieter than the bounds is not cut"
        await ws.send_str("still open")
        assert (await ws.receive(timeout=10)).data == "echo:still open"


def test_bad_upstream_is_a_usage_error_and_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    result = run_cli("serve", "--upstream", "ftp://files.example", "--https", "127.0.0.1:0", "--http", "none",
                     "--admin", "none", db=f"sqlite:///{db}")
    assert result.returncode == 2, result.stderr
    assert "--upstream" in result.stderr and "ftp://files.example" in result.stderr
    assert not db.exists()


# -- in process: the proxy app alone in front of an aiohttp upstream ----------------------------


class LocalProxy:
    """The proxy's HTTP/1.1 server alone on plain loopback HTTP, in this test's event loop."""

    def __init__(self, http: HttpServer, server: asyncio.Server) -> None:
        self.http = http
        self.server = server
        self.port: int = server.sockets[0].getsockname()[1]

    def make_url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")

    async def close(self) -> None:
        """What serve does on SIGTERM: stop accepting, then drain."""
        self.server.close()
        await self.http.shutdown(10)


@pytest.fixture()
async def local() -> AsyncIterator[Callable[..., Any]]:
    """Serve an upstream app and a proxy in front of it, both on plain loopback HTTP."""
    upstreams: list[TestServer] = []
    proxies: list[LocalProxy] = []

    async def start(upstream_app: web.Application, **options: Any) -> tuple[LocalProxy, TestServer]:
        upstream_server = TestServer(upstream_app, host="127.0.0.1")
        await upstream_server.start_server()
        upstreams.append(upstream_server)
        handler = ProxyHandler(f"http://127.0.0.1:{upstream_server.port}{options.pop('prefix', '')}", **options)
        http = HttpServer(handler, tls=False, on_close=handler.close)
        proxy_server = LocalProxy(http, await asyncio.get_running_loop().create_server(http, "127.0.0.1", 0))
        proxies.append(proxy_server)
        return proxy_server, upstream_server

    yield start
    for proxy_server in proxies:
        await proxy_server.close()
    for server in upstreams:
        await server.close()


async def test_upstream_timeout_gives_504(local) -> None:
    release = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/", stuck)
    proxy_server, _ = await local(app, read_timeout=0.5)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_server.make_url("/")) as response:
            assert response.status == 504
            assert "504 Gateway Timeout" in await response.text()
    release.set()


async def test_responses_stream_without_buffering(local) -> None:
    """The first chunk reaches the client while the upstream is still holding back the rest."""
    more = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first chunk\n")
        await more.wait()
        await response.write(b"second chunk\n")
        return response

    app = web.Application()
    app.router.add_get("/", trickle)
    proxy_server, _ = await local(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_server.make_url("/")) as response:
            assert await asyncio.wait_for(response.content.readline(), timeout=10) == b"first chunk\n"
            more.set()
            assert await response.content.read() == b"second chunk\n"


async def test_uploads_stream_without_buffering(local) -> None:
    """The upstream sees the start of a body the client has not finished sending."""
    got_first = asyncio.Event()

    async def consume(request: web.Request) -> web.Response:
        first = await request.content.readexactly(5)
        got_first.set()
        rest = await request.content.read()
        return web.Response(body=first + rest)

    async def body() -> AsyncIterator[bytes]:
        yield b"start"
        await asyncio.wait_for(got_first.wait(), timeout=10)
        yield b" and the rest"

    app = web.Application()
    app.router.add_post("/", consume)
    proxy_server, _ = await local(app)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy_server.make_url("/"), data=body()) as response:
            assert await response.read() == b"start and the rest"


async def test_bytes_redirects_and_cookies_pass_through_untouched(local) -> None:
    compressed = gzip.compress(b"compressed body " * 100)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text=request.headers.get("Cookie", "no cookie"))
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    app = web.Application()
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/cookies", cookies)
    proxy_server, _ = await local(app)
    async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.get(proxy_server.make_url("/gzip"), headers={"Accept-Encoding": "gzip"}) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == compressed, "the proxy must not decompress or re-encode"
        async with session.get(proxy_server.make_url("/redirect"), allow_redirects=False) as response:
            assert response.status == 302 and response.headers["Location"] == "/elsewhere"
        async with session.get(proxy_server.make_url("/cookies")) as response:
            assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        # A second visitor must not get the first one's cookies from the proxy's client session.
        async with session.get(proxy_server.make_url("/cookies")) as response:
            assert await response.text() == "no cookie"


async def test_upstream_breaking_off_mid_body_is_not_a_complete_response(local, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1_000_000
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response

    app = web.Application()
    app.router.add_get("/", broken)
    proxy_server, _ = await local(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_server.make_url("/")) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    assert "upstream broke off GET /" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a broken upstream is a warning, not an error"


async def test_client_going_away_stops_the_upstream_transfer(local, caplog: pytest.LogCaptureFixture) -> None:
    stopped = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"y" * 65536)
        finally:  # a failed write or, as aiohttp does on a lost connection, cancellation
            stopped.set()

    app = web.Application()
    app.router.add_get("/", endless)
    proxy_server, _ = await local(app)
    async with aiohttp.ClientSession() as session:
        response = await session.get(proxy_server.make_url("/"))
        await response.content.readexactly(1024 * 1024)
        response.close()
    await asyncio.wait_for(stopped.wait(), timeout=10)
    assert not [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("autocert")]


async def test_head_keeps_the_length_and_sends_no_body(local) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=b"z" * 1234)

    app = web.Application()
    app.router.add_get("/", page)
    proxy_server, _ = await local(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_server.port)
    writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert b"Content-Length: 1234" in head
    assert rest.startswith(b"HTTP/1.1 200"), "HEAD must not send a body, or the next response is corrupted"
    assert rest.endswith(b"z" * 1234)


async def test_path_prefix_and_refused_websocket(local) -> None:
    async def anything(request: web.Request) -> web.Response:
        if request.headers.get("Upgrade"):
            raise web.HTTPForbidden(text="no websockets here")
        return web.Response(text=request.raw_path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    proxy_server, _ = await local(app, prefix="/base/")
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_server.make_url("/a/b?c=d")) as response:
            assert await response.text() == "/base/a/b?c=d"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(proxy_server.make_url("/ws"))
        assert refused.value.status == 403


async def test_odd_request_targets_reach_the_upstream_as_paths(local) -> None:
    """Absolute-form targets lose their scheme and authority; other paths pass unchanged."""

    async def path(request: web.Request) -> web.Response:
        return web.Response(text=request.raw_path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", path)
    proxy_server, _ = await local(app)
    for target, expected in [
        (b"http://elsewhere.example/abc?x=1", b"/abc?x=1"),
        (b"//double/slash", b"//double/slash"),
        (b"/a/../b%20c", b"/a/../b%20c"),
    ]:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_server.port)
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200"), raw
        assert raw.endswith(b"\r\n\r\n" + expected), raw


async def test_shutdown_closes_websockets_with_going_away(local) -> None:
    app = web.Application()
    app.router.add_get("/ws", websocket_echo)
    proxy_server, _ = await local(app)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy_server.make_url("/ws")) as ws:
            await ws.send_str("ping")
            assert (await ws.receive(timeout=10)).data == "ping"
            closing = asyncio.ensure_future(proxy_server.close())
            message = await ws.receive(timeout=10)
            assert message.type is WSMsgType.CLOSE and message.data == aiohttp.WSCloseCode.GOING_AWAY
            await asyncio.wait_for(closing, timeout=10)


def test_bad_upstream_urls_are_refused() -> None:
    for bad in ("", "127.0.0.1:8000", "ftp://host", "http://", "http://user:pw@host", "http://host/?q=1"):
        with pytest.raises(ConfigError, match="--upstream"):
            ProxyHandler(bad)


def test_forwarded_element_quotes_ipv6_and_ports() -> None:
    headers = forwarded_headers([(b"Host", b"shop.example:8443"), (b"Forwarded", b"for=192.0.2.1")], Origin("2001:db8::1"))
    values = dict(headers)
    assert values[b"Forwarded"] == b'for=192.0.2.1, for="[2001:db8::1]";host="shop.example:8443";proto=https'
    assert values[b"X-Forwarded-For"] == b"2001:db8::1"
    stripped = strip_hop_by_hop([(b"Connection", b"close, X-A"), (b"X-A", b"1"), (b"Proxy-Foo", b"2"), (b"X-B", b"3")])
    assert stripped == [(b"X-B", b"3")]
