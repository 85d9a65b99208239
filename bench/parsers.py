"""HTTP/1.1 head parsers for the proxy, compared in one process: µs per request or response head.

    .venv/bin/python bench/parsers.py [--count 200000]

Each parser reads the same browser-like GET head (13 header lines) and the same response
head (7 lines) on one long-lived parser, as a keep-alive connection would, and hands over what
the proxy needs: method, target, version and the header lines as (name, value) pairs. h11 is
optional (``pip install h11``); rows for missing parsers are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

REQUEST = (
    b"GET /shop/items/42?ref=home&utm_source=newsletter HTTP/1.1\r\n"
    b"Host: shop.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: https://shop.example.com/\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=8f14e45fceea167a5a36dedd4bea2543; theme=dark\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\n"
    b"Sec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Priority: u=0, i\r\n"
    b"\r\n"
)

RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Length: 2\r\n"
    b"Date: Wed, 02 Dec 2026 10:00:00 GMT\r\n"
    b"Server: app\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Set-Cookie: seen=1; Path=/; HttpOnly\r\n"
    b"Vary: Accept-Encoding\r\n"
    b"\r\n"
    b"ok"
)


class Collector:
    """The httptools callbacks the proxy uses: header pairs into a list, the target, the body."""

    __slots__ = ("body", "done", "headers", "url")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.body = b""
        self.done = 0

    def on_message_begin(self) -> None:
        self.headers = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body = body

    def on_message_complete(self) -> None:
        self.done += 1


def httptools_request() -> Callable[[], object]:
    import httptools

    collector = Collector()
    parser = httptools.HttpRequestParser(collector)

    def parse() -> object:
        parser.feed_data(REQUEST)
        return parser.get_method(), collector.url, parser.get_http_version(), collector.headers

    return parse


def httptools_response() -> Callable[[], object]:
    import httptools

    collector = Collector()
    parser = httptools.HttpResponseParser(collector)

    def parse() -> object:
        parser.feed_data(RESPONSE)
        return parser.get_status_code(), collector.headers, collector.body

    return parse


class _AiohttpProtocol:
    """What aiohttp's parser wants from its protocol: nothing on this path."""

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def aiohttp_request() -> Callable[[], object]:
    from aiohttp._http_parser import HttpRequestParser  # type: ignore[import-not-found]

    loop = asyncio.new_event_loop()
    parser = HttpRequestParser(_AiohttpProtocol(), loop, 2**16)

    def parse() -> object:
        messages, _upgraded, _tail = parser.feed_data(REQUEST)
        message = messages[0][0]
        return message.method, message.path, message.version, message.raw_headers

    return parse


def aiohttp_response() -> Callable[[], object]:
    from aiohttp._http_parser import HttpResponseParser  # type: ignore[import-not-found]

    loop = asyncio.new_event_loop()
    parser = HttpResponseParser(_AiohttpProtocol(), loop, 2**16)

    def parse() -> object:
        messages, _upgraded, _tail = parser.feed_data(RESPONSE)
        message, payload = messages[0]
        return message.code, message.raw_headers, payload

    return parse


def h11_request() -> Callable[[], object]:
    import h11

    connection = h11.Connection(h11.SERVER)
    answer = h11.Response(status_code=200, headers=[("Content-Length", "0")])

    def parse() -> object:
        connection.receive_data(REQUEST)
        request = connection.next_event()
        connection.next_event()  # EndOfMessage
        # h11 enforces the state machine: answer, then start the next cycle.
        connection.send(answer)
        connection.send(h11.EndOfMessage())
        connection.start_next_cycle()
        return request.method, request.target, request.http_version, request.headers.raw_items()

    return parse


def h11_response() -> Callable[[], object]:
    import h11

    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target="/", headers=[("Host", "app")])

    def parse() -> object:
        connection.send(request)
        connection.send(h11.EndOfMessage())
        connection.receive_data(RESPONSE)
        response = connection.next_event()
        data = connection.next_event()
        connection.next_event()  # EndOfMessage
        connection.start_next_cycle()
        return response.status_code, response.headers.raw_items(), data

    return parse


PARSERS = {
    "httptools (llhttp)": (httptools_request, httptools_response),
    "aiohttp C parser (llhttp)": (aiohttp_request, aiohttp_response),
    "h11 (pure Python)": (h11_request, h11_response),
}


def per_call(make: Callable[[], Callable[[], object]], count: int) -> float | None:
    try:
        parse = make()
    except ImportError:
        return None
    for _ in range(min(count, 5000)):
        parse()
    best = float("inf")
    for _ in range(5):  # best of five: the least disturbed by the rest of the machine
        started = time.perf_counter()
        for _ in range(count):
            parse()
        best = min(best, (time.perf_counter() - started) / count)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200_000)
    args = parser.parse_args()
    print("| parser | request head µs | response head + 2-byte body µs |")
    print("|---|---|---|")
    for label, (request, response) in PARSERS.items():
        timings = [per_call(make, args.count) for make in (request, response)]
        if None in timings:
            print(f"| {label} | not installed | |")
            continue
        print(f"| {label} | {timings[0]:.2f} | {timings[1]:.2f} |")


if __name__ == "__main__":
    main()
