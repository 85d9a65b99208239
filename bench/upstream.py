"""The upstream for bench/peers.py when nginx is not there: a small static HTTP/1.1 server.

    python bench/upstream.py --port PORT

``GET /small`` answers a 2-byte body, ``GET /large`` 256 KiB, anything else 404; keep-alive
unless the request says ``Connection: close`` (or is HTTP/1.0). GET only: request bodies are
not read. One uvloop protocol, no framework, so it costs the client side of the machine as
little as a Python server can. Prints ``ready`` when it listens, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

SMALL = b"ok"
LARGE = b"x" * (256 * 1024)
BODIES = {b"/small": SMALL, b"/large": LARGE}


def response(status: bytes, body: bytes, close: bool) -> bytes:
    connection = b"close" if close else b"keep-alive"
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: " + connection + b"\r\n\r\n" + body)


class Static(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            line, _, headers = head.partition(b"\r\n")
            parts = line.split()
            close = b"connection: close" in headers.lower() or parts[-1:] == [b"HTTP/1.0"]
            body = BODIES.get(parts[1]) if len(parts) == 3 and parts[0] == b"GET" else None
            self.transport.write(response(b"200 OK", body, close) if body is not None else response(b"404 Not Found", b"", close))
            if close:
                self.transport.close()
                return


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_server(Static, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
