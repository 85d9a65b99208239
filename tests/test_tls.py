"""TLS building blocks: ClientHello parsing, contexts from memory, the LRU cache and the
asyncio alert fix, all with real OpenSSL handshakes."""

from __future__ import annotations

import asyncio
import random
import ssl
import subprocess

import pytest
import trustme

from autocert._front import NotClientHello, parse_client_hello
from autocert._tls import (
    UNRECOGNIZED_NAME_ALERT,
    ContextCache,
    build_context,
    install_alert_flush_fix,
    new_server_context,
)


def real_client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The bytes Python's OpenSSL client sends first."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name) if server_name else None
    if client is None:
        context.check_hostname = False
        client = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def split_into_records(hello: bytes, size: int) -> bytes:
    """Re-frame one ClientHello record as several smaller handshake records."""
    body = hello[5:]
    out = bytearray()
    for start in range(0, len(body), size):
        fragment = body[start : start + size]
        out += bytes([0x16, 0x03, 0x01]) + len(fragment).to_bytes(2, "big") + fragment
    return bytes(out)


def test_parses_sni_and_alpn_from_a_real_client_hello() -> None:
    hello = parse_client_hello(real_client_hello("Shop.Example.test", ["h2", "http/1.1"]))
    assert hello is not None
    assert hello.server_name == "shop.example.test"
    assert hello.alpn == ("h2", "http/1.1")


def test_no_sni() -> None:
    hello = parse_client_hello(real_client_hello(None))
    assert hello is not None and hello.server_name is None and hello.alpn == ()


def test_every_prefix_asks_for_more_and_split_records_parse() -> None:
    raw = real_client_hello("a.example.test", ["acme-tls/1"])
    for cut in range(len(raw)):
        assert parse_client_hello(raw[:cut]) is None
    split = split_into_records(raw, 100)
    for cut in range(len(split)):
        assert parse_client_hello(split[:cut]) is None
    hello = parse_client_hello(split)
    assert hello is not None and hello.server_name == "a.example.test" and hello.alpn == ("acme-tls/1",)


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x00", b"\x15\x03\x03\x00\x02\x02\x70", b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"])
def test_rejects_what_is_not_a_client_hello(garbage: bytes) -> None:
    with pytest.raises(NotClientHello):
        parse_client_hello(garbage)


def test_mutated_client_hellos_never_crash_the_parser() -> None:
    rng = random.Random(20261125)
    seeds = [real_client_hello("x.example.test", ["h2"]), real_client_hello(None), split_into_records(real_client_hello("y.example.test"), 64)]
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(data))
            data[position] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        try:
            parse_client_hello(bytes(data))
        except NotClientHello:
            pass


def test_context_from_memory_serves_the_certificate(tmp_path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("mem.example.test")
    context = build_context(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    client = ssl.create_default_context()
    ca.configure_trust(client)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client_obj = client.wrap_bio(c_in, c_out, server_hostname="mem.example.test")
    server_obj = context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (client_obj, server_obj):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert client_obj.getpeercert()["subjectAltName"] == (("DNS", "mem.example.test"),)


def test_context_cache_is_a_bounded_lru() -> None:
    cache = ContextCache(2)
    contexts = [new_server_context() for _ in range(3)]
    cache.put("a", contexts[0], 1)
    cache.put("b", contexts[1], 2)
    assert cache.get("a") is contexts[0]  # a is now most recent
    cache.put("c", contexts[2], 3)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None
    assert (cache.hits, cache.misses) == (1, 1)
    # The certificate ids leave with their contexts: nothing grows beyond the bound.
    assert (cache.certificate_id("a"), cache.certificate_id("b"), cache.certificate_id("c")) == (1, None, 3)
    cache.discard("a")
    assert cache.certificate_id("a") is None and len(cache._certificate_ids) == 1


def test_alert_record_is_fatal_unrecognized_name() -> None:
    assert UNRECOGNIZED_NAME_ALERT == bytes.fromhex("15030300020270")


async def test_embedded_asyncio_server_delivers_alert_112_to_openssl() -> None:
    """Stock asyncio drops the alert (gh-98078); with the fix a real client receives it."""
    install_alert_flush_fix()
    ca = trustme.CA()
    context = new_server_context()
    ca.issue_cert("known.example.test").configure_cert(context)
    context.sni_callback = lambda obj, name, ctx: None if name == "known.example.test" else ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "unknown.example.test"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )
        assert "alert number 112" in result.stdout + result.stderr
    finally:
        server.close()
        await server.wait_closed()
