"""The least a Python server can do for a TLS handshake, as floors for the peers bench.

    python bench/floor_server.py uvloop|blocking PORT CHAIN KEY

Both hold the certificate in one ``ssl.SSLContext`` (TLS 1.3 by default), complete the
handshake and close when the client has closed, with nothing else: no ClientHello read, no
routing, no HTTP.

- ``uvloop``: ``loop.create_server(ssl=context)`` on uvloop, whose TLS layer (memory BIOs)
  is the one ``serve`` uses;
- ``blocking``: one thread accepting and handshaking on the socket itself
  (``SSLContext.wrap_socket``, OpenSSL reading the file descriptor), one connection at a time.

Prints ``floor listening`` once it accepts connections.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys


class _Handshake(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def eof_received(self) -> bool:
        self.transport.close()
        return False


async def _uvloop(port: int, context: ssl.SSLContext) -> None:
    server = await asyncio.get_running_loop().create_server(_Handshake, "127.0.0.1", port, ssl=context, backlog=1024)
    print("floor listening", flush=True)
    await server.serve_forever()


def _blocking(port: int, context: ssl.SSLContext) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    print("floor listening", flush=True)
    while True:
        raw, _ = listener.accept()
        tls = None
        try:
            tls = context.wrap_socket(raw, server_side=True)
            while tls.recv(4096):
                pass
        except (ssl.SSLError, OSError):
            pass
        finally:
            (tls or raw).close()


def main() -> None:
    kind, port, chain, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    if kind == "uvloop":
        import uvloop

        uvloop.run(_uvloop(port, context))
    else:
        _blocking(port, context)


if __name__ == "__main__":
    main()
