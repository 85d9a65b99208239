"""ClientHello fuzzing: the parser on its own (hypothesis), then a live ``autocert serve``;
and the request-smuggling defences of the HTTP layer behind it.

The front parses bytes from anyone on the internet before TLS starts, so its parser must
have exactly three outcomes whatever it is fed: a ``ClientHello``, ``None`` (need more bytes)
or ``NotClientHello``. The live test sends thousands of broken hellos over TCP and then checks
that the server still completes a good handshake and never logged a traceback.

Requests whose framing two parsers could read differently (Content-Length with
Transfer-Encoding, two lengths, folded lines, bad chunk sizes, bare LF) must get a 400 and
never reach the upstream, not even in part.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pebble import Pebble
from support import ServeProcess, handshake, run_cli, served_certificate

from autocert._http import HttpServer
from autocert._proxy import ProxyHandler
from autocert._front import (
    MAX_CLIENT_HELLO,
    MAX_HELLO_RECORDS,
    ClientHello,
    NotClientHello,
    client_hello_wanted,
    parse_client_hello,
)

# Derandomised: CI runs the same 10,000 cases every time, and a failure reproduces locally.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)


def real_client_hello(server_name: str | None, alpn: list[str] | None = None, *, tls12: bool = False) -> bytes:
    """The first flight Python's OpenSSL client sends, captured through memory BIOs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@cache
def seeds() -> tuple[bytes, ...]:
    return (
        real_client_hello("shop.example.test", ["h2", "http/1.1"]),
        real_client_hello("a.example.test", ["acme-tls/1"]),
        real_client_hello(None),
        real_client_hello("old.example.test", ["http/1.1"], tls12=True),
        real_client_hello("x" * 63 + ".example.test"),
    )


def resplit(hello: bytes, sizes: list[int]) -> bytes:
    """The same handshake message framed as several records of the given sizes (cycled)."""
    body = hello[5:5 + int.from_bytes(hello[3:5], "big")]
    out = bytearray()
    position = 0
    index = 0
    while position < len(body):
        size = sizes[index % len(sizes)]
        fragment = body[position:position + size]
        out += hello[:3] + len(fragment).to_bytes(2, "big") + fragment
        position += size
        index += 1
    return bytes(out)


def outcome(data: bytes) -> ClientHello | None | str:
    """Run the parser and insist on one of its three documented outcomes."""
    try:
        result = parse_client_hello(data)
    except NotClientHello:
        return "not a hello"
    assert result is None or isinstance(result, ClientHello), result
    if isinstance(result, ClientHello):
        assert result.server_name is None or (isinstance(result.server_name, str) and result.server_name)
        assert isinstance(result.alpn, tuple) and all(isinstance(p, str) for p in result.alpn)
    return result


# -- the reference parser -----------------------------------------------------------------------
#
# The front's first parser: slower (it copies every record and slices every field) but short
# enough to check by eye. The fast parser must agree with it on every input.


def _reference_take(body: memoryview, position: int, length_bytes: int) -> tuple[memoryview, int]:
    end = position + length_bytes
    if end > len(body):
        raise ValueError("truncated length")
    length = int.from_bytes(body[position:end], "big")
    if end + length > len(body):
        raise ValueError("truncated vector")
    return body[end : end + length], end + length


def _reference_body(body: memoryview) -> tuple[str | None, tuple[str, ...]]:
    position = 2 + 32
    _, position = _reference_take(body, position, 1)
    _, position = _reference_take(body, position, 2)
    _, position = _reference_take(body, position, 1)
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if position == len(body):
        return None, ()
    extensions, _ = _reference_take(body, position, 2)
    cursor = 0
    while cursor < len(extensions):
        if cursor + 2 > len(extensions):
            raise ValueError("truncated extension")
        extension_type = int.from_bytes(extensions[cursor : cursor + 2], "big")
        data, cursor = _reference_take(extensions, cursor + 2, 2)
        if extension_type == 0:
            names, _ = _reference_take(data, 0, 2)
            inner = 0
            while inner < len(names):
                name_type = names[inner]
                host, inner = _reference_take(names, inner + 1, 2)
                if name_type == 0:
                    try:
                        text: str | None = bytes(host).decode("ascii").rstrip(".").lower() or None
                    except UnicodeDecodeError:
                        text = None
                    server_name = text
                    break
        elif extension_type == 16:
            protocols, _ = _reference_take(data, 0, 2)
            inner = 0
            found = []
            while inner < len(protocols):
                protocol, inner = _reference_take(protocols, inner, 1)
                found.append(bytes(protocol).decode("ascii", "replace"))
            alpn = tuple(found)
    return server_name, alpn


def reference_parse(data: bytes) -> tuple[str | None, tuple[str, ...]] | None | str:
    handshake = bytearray()
    offset = 0
    records = 0
    needed: int | None = None
    while needed is None or len(handshake) < needed:
        if records == MAX_HELLO_RECORDS:
            return "not a hello"
        records += 1
        if len(data) - offset < 5:
            return None
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if data[offset] != 0x16 or data[offset + 1] != 3 or length == 0 or length > 16384 + 256:
            return "not a hello"
        if len(data) - offset - 5 < length:
            return None
        handshake += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if needed is None and len(handshake) >= 4:
            if handshake[0] != 0x01:
                return "not a hello"
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if needed > MAX_CLIENT_HELLO:
                return "not a hello"
        if offset > MAX_CLIENT_HELLO:
            return "not a hello"
    try:
        return _reference_body(memoryview(bytes(handshake[4:needed])))
    except (IndexError, ValueError):
        return "not a hello"


def agrees_with_reference(data: bytes) -> None:
    result = outcome(data)
    expected = reference_parse(data)
    if isinstance(result, ClientHello):
        assert (result.server_name, result.alpn) == expected
    else:
        assert result == expected


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    if draw(st.booleans()):
        data = bytearray(resplit(bytes(data), draw(st.lists(st.integers(1, 600), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "length"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if not data:
            break
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[position] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[position:position + draw(st.integers(1, 8))]
        else:  # rewrite a length-looking 16-bit field: the parser's favourite place to go wrong
            data[position:position + 2] = draw(st.sampled_from([b"\x00\x00", b"\xff\xff", b"\x00\x01", b"\x40\x00"]))
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(FUZZ, max_examples=2500)
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    agrees_with_reference(data)


@settings(FUZZ, max_examples=2500)
@given(st.integers(0, 3), st.integers(0, 0xFFFF), st.binary(max_size=1500))
def test_random_bodies_behind_a_valid_header(minor: int, claimed: int, body: bytes) -> None:
    """Past the record and handshake headers, so the extension walk sees the random bytes."""
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    record = bytes([0x16, 0x03, minor]) + min(claimed, len(message)).to_bytes(2, "big") + message
    agrees_with_reference(record)


@settings(FUZZ, max_examples=4000)
@given(mutated_hellos())
def test_mutated_real_hellos(data: bytes) -> None:
    agrees_with_reference(data)


@settings(FUZZ, max_examples=1000)
@given(st.sampled_from(range(5)), st.lists(st.integers(1, 700), min_size=1, max_size=5), st.data())
def test_resplit_hellos_parse_the_same_and_every_prefix_waits(seed: int, sizes: list[int], data: st.DataObject) -> None:
    original = seeds()[seed]
    expected = parse_client_hello(original)
    assert expected is not None
    split = resplit(original, sizes)
    records = _records(split)
    if records > MAX_HELLO_RECORDS:
        with pytest.raises(NotClientHello):
            parse_client_hello(split)
        return
    parsed = parse_client_hello(split)
    assert parsed is not None
    assert (parsed.server_name, parsed.alpn) == (expected.server_name, expected.alpn)
    cut = data.draw(st.integers(0, len(split) - 1))
    prefix = split[:cut]
    assert parse_client_hello(prefix) is None
    # The reader parses again only at client_hello_wanted(prefix); nothing in between may
    # complete the hello, and that point is never past the end of the whole.
    wanted = client_hello_wanted(prefix)
    assert cut < wanted <= len(split)
    for between in {cut, (cut + wanted) // 2, wanted - 1}:
        assert parse_client_hello(split[:between]) is None


def _records(data: bytes) -> int:
    count = offset = 0
    while offset < len(data):
        offset += 5 + int.from_bytes(data[offset + 3 : offset + 5], "big")
        count += 1
    return count


def _vector(data: bytes, length_bytes: int) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


@st.composite
def built_hellos(draw: st.DrawFn) -> tuple[bytes, str | None, tuple[str, ...]]:
    """ClientHellos assembled field by field, with what a correct parser must read from them."""
    host = draw(st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9-]{1,20}(\.[A-Za-z0-9-]{1,20}){0,3}\.?", fullmatch=True)))
    protocols = draw(st.lists(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12), max_size=4))
    extensions = [(kind, draw(st.binary(max_size=24))) for kind in draw(st.lists(st.integers(1, 0xFFFF).filter(lambda k: k != 16), max_size=8))]
    if host is not None:
        entry = b"\x00" + _vector(host.encode(), 2)
        extensions.insert(draw(st.integers(0, len(extensions))), (0, _vector(entry, 2)))
    if protocols:
        listed = b"".join(_vector(p.encode(), 1) for p in protocols)
        extensions.insert(draw(st.integers(0, len(extensions))), (16, _vector(listed, 2)))
    body = b"\x03\x03" + draw(st.binary(min_size=32, max_size=32)) + _vector(draw(st.binary(max_size=32)), 1)
    body += _vector(draw(st.binary(min_size=2, max_size=40)), 2) + b"\x01\x00"
    with_extensions: bool = bool(extensions) or draw(st.booleans())
    if with_extensions:
        body += _vector(b"".join(kind.to_bytes(2, "big") + _vector(data, 2) for kind, data in extensions), 2)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    hello = b"\x16\x03\x01" + _vector(message, 2)
    if draw(st.booleans()):
        hello = resplit(hello, draw(st.lists(st.integers(10, 300), min_size=1, max_size=3)))
    server_name = host.rstrip(".").lower() or None if host is not None else None
    return hello, server_name, tuple(protocols)


@settings(FUZZ, max_examples=1000)
@given(built_hellos())
def test_built_hellos_parse_exactly(case: tuple[bytes, str | None, tuple[str, ...]]) -> None:
    hello, server_name, alpn = case
    parsed = parse_client_hello(hello)
    assert parsed is not None
    assert (parsed.server_name, parsed.alpn) == (server_name, alpn)
    agrees_with_reference(hello)


def test_real_hellos_parse() -> None:
    parsed = [parse_client_hello(seed) for seed in seeds()]
    assert [(p.server_name, p.alpn) for p in parsed if p] == [
        ("shop.example.test", ("h2", "http/1.1")),
        ("a.example.test", ("acme-tls/1",)),
        (None, ()),
        ("old.example.test", ("http/1.1",)),
        ("x" * 63 + ".example.test", ()),
    ]


# -- live -------------------------------------------------------------------------------------

LIVE_CASES = 3000


def live_cases(count: int, allowed: str) -> list[bytes]:
    """Mutated hellos for names the server serves, challenges, refuses, plus garbage."""
    rng = random.Random(20261125)
    bases = [
        real_client_hello(allowed, ["h2", "http/1.1"]),
        real_client_hello(allowed, ["acme-tls/1"]),
        real_client_hello("unknown.example.test"),
        real_client_hello(None),
        resplit(real_client_hello(allowed), [7, 100]),
    ]
    cases: list[bytes] = []
    for index in range(count):
        data = bytearray(rng.choice(bases))
        if index % 10 == 0:
            cases.append(bytes(data))  # intact, so the TLS handshake itself runs on junk later
            continue
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.5:
                data[position] = rng.randrange(256)
            elif choice < 0.7:
                del data[position:position + rng.randint(1, 16)]
            elif choice < 0.9:
                data[position:position] = rng.randbytes(rng.randint(1, 16))
            else:
                data[position:position + 2] = b"\xff\xff"
        if rng.random() < 0.2:
            data = data[: rng.randrange(1, len(data) + 1)]
        if rng.random() < 0.1:
            data += rng.randbytes(rng.randint(1, 64))  # trailing junk after the hello
        cases.append(bytes(data))
    return cases


async def send_all(port: int, cases: list[bytes], *, parallel: int = 64) -> int:
    """Send each case on its own connection, half-close, read whatever comes back (bounded)."""
    limit = asyncio.Semaphore(parallel)
    answered = 0

    async def one(data: bytes) -> None:
        nonlocal answered
        async with limit:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            except (TimeoutError, OSError):
                return
            try:
                writer.write(data)
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                if await asyncio.wait_for(reader.read(65536), 10):
                    answered += 1
            except (TimeoutError, OSError):
                pass
            finally:
                writer.close()

    await asyncio.gather(*(one(data) for data in cases))
    return answered


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_live_server_survives_mutated_hellos(pebble: Pebble, tmp_path: Path, loop_name: str) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    db = f"sqlite:///{tmp_path / 'autocert.db'}"
    allowed = "fuzz.example.test"
    assert run_cli("allow", allowed, db=db).returncode == 0
    server = ServeProcess(db, pebble, tmp_path, extra=["--http", "none"], env={"AUTOCERT_EVENT_LOOP": loop_name}).start()
    try:
        served_certificate(server.https_port, allowed, str(root))  # the name has a live context now
        answered = asyncio.run(send_all(server.https_port, live_cases(LIVE_CASES, allowed)))
        assert answered > LIVE_CASES // 10, "the server answered almost nothing; the cases never reached it"
        assert server.process is not None and server.process.poll() is None, server.output()
        certificate = handshake(server.https_port, allowed, cafile=str(root), timeout=30)
        assert certificate.subject
    finally:
        server.stop()
    stderr = server.stderr_path.read_text()
    assert "Traceback" not in stderr, stderr[-6000:]
    assert "Exception in callback" not in stderr and "exception was never retrieved" not in stderr, stderr[-6000:]


# -- request smuggling ---------------------------------------------------------------------------

SMUGGLING = {
    "CL and TE": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "TE and CL": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nG",
    "two equal CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "two CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\nhello",
    "CL list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
    "signed CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n",
    "obs-fold of TE": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk size overflow": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk size with LF only": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare LF in a header": b"GET / HTTP/1.1\r\nHost: a\nTransfer-Encoding: chunked\r\n\r\n",
    "space before colon": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "TE not chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\nhello",
    "TE chunked twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "gzip, chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
}


@pytest.mark.parametrize("case", SMUGGLING, ids=list(SMUGGLING))
async def test_ambiguous_framing_gets_400_and_nothing_reaches_the_upstream(case: str, caplog: pytest.LogCaptureFixture) -> None:
    received = bytearray()
    connections = 0

    async def upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        received.extend(await reader.read(65536))
        writer.close()

    upstream = await asyncio.start_server(upstream_connection, "127.0.0.1", 0)
    handler = ProxyHandler(f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}")
    http = HttpServer(handler, tls=False, on_close=handler.close)
    proxy = await asyncio.get_running_loop().create_server(http, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
        writer.write(SMUGGLING[case])
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        await asyncio.sleep(0.2)
    finally:
        proxy.close()
        await http.shutdown(5)
        upstream.close()
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 501 ")), answer
    assert not received and not connections, f"the upstream saw {bytes(received)!r}"
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], caplog.text
