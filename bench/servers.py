"""The TLS servers the benchmark compares, one per process so each has its own CPU counters.

    python bench/servers.py VARIANT --port PORT --chain-dir DIR [--db URL --warm N]

Every variant serves the same HTTP/1.1 protocol that ``autocert serve`` uses (its confirmation
page), so the only difference between them is how a connection gets to its TLS context:

- ``static``: ``loop.create_server(ssl=context)`` with one context, the floor for this loop;
- ``sni``: the same, with ``Manager.ssl_context()`` choosing the context in ``sni_callback``;
- ``front``: ``autocert._front.TlsFront``, the ClientHello front ``serve`` runs;
- ``front-task``: the front's first design, kept here to measure against: ``sock_accept``,
  a task per connection, ``MSG_PEEK`` and ``connect_accepted_socket``;
- ``front-reader``: the same hand-off, but accepting in a reader callback and peeking at
  once, so only the hand-off needs a task;
- ``alert-only``: no TLS at all, a bare protocol that answers the first bytes with the 7-byte
  alert and closes: the floor for any rejection made on this loop.

Prints ``ready`` when it listens, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import UNREACHABLE_CA, name_for

from autocert._config import Listen
from autocert._manager import Manager
from autocert._policy import Route
from autocert._config import ServeOptions, listening_socket
from autocert._front import MAX_CLIENT_HELLO, NotClientHello, TlsFront, parse_client_hello
from autocert._http import HttpServer
from autocert._http.pages import confirmation_handler
from autocert._tls import build_context

class TaskFront(TlsFront):
    """The first design: Python accept loop, a task per connection, peek, connect_accepted_socket."""

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._handle(connection))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _handle(self, connection: socket.socket, hello: Any = None) -> None:
        connection.setblocking(False)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handed_off = False
        try:
            if hello is None:
                try:
                    hello = await asyncio.wait_for(self._peek_hello(connection), self._options.hello_timeout)
                except (TimeoutError, NotClientHello, ConnectionError, OSError):
                    return
            context = await self._pick(hello)
            if context is None:
                self._reject_socket(connection)
                return
            handed_off = True
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self._protocol_factory(hello.server_name or ""), connection, ssl=context, ssl_handshake_timeout=self._options.handshake_timeout
            )
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            if not handed_off:
                connection.close()

    async def _pick(self, hello: Any) -> ssl.SSLContext | None:
        route, name, context = self._manager.route(hello.server_name)
        if route is Route.LOAD:
            context = await self._manager.context_for(name, wait=self._options.first_contact_wait)
            self._manager.handshakes["served" if context is not None else "pending"] += 1
        return context

    @staticmethod
    async def _peek_hello(connection: socket.socket) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            readable = loop.create_future()
            loop.add_reader(connection.fileno(), readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(connection.fileno())
            data = connection.recv(MAX_CLIENT_HELLO + 5, socket.MSG_PEEK)
            if not data:
                raise ConnectionError("closed before ClientHello")
            hello = parse_client_hello(data)
            if hello is not None:
                return hello
            await asyncio.sleep(0.001)

    @staticmethod
    def _reject_socket(connection: socket.socket) -> None:
        from autocert._tls import UNRECOGNIZED_NAME_ALERT

        with contextlib.suppress(OSError):
            while connection.recv(MAX_CLIENT_HELLO + 5):
                pass
        with contextlib.suppress(OSError):
            connection.send(UNRECOGNIZED_NAME_ALERT)
            connection.shutdown(socket.SHUT_WR)


class ReaderFront(TaskFront):
    """Accept in a reader callback and peek at once; a task only for the TLS hand-off."""

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(listener.fileno(), self._accept, listener)
        try:
            await loop.create_future()
        finally:
            loop.remove_reader(listener.fileno())

    def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            hello = None
            with contextlib.suppress(OSError, NotClientHello):
                hello = parse_client_hello(connection.recv(MAX_CLIENT_HELLO + 5, socket.MSG_PEEK))
            task = loop.create_task(self._handle(connection, hello))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)


class AlertOnly(asyncio.Protocol):
    """What a rejection costs at the least on this loop: accept, one read, one write, close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        from autocert._tls import UNRECOGNIZED_NAME_ALERT

        self.transport.write(UNRECOGNIZED_NAME_ALERT)
        self.transport.close()


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    options = ServeOptions(https=(Listen("127.0.0.1", args.port),), http=(), admin=None)
    http = HttpServer(confirmation_handler(), tls=True, access_log=False)
    listener = listening_socket(options.https[0])
    manager: Manager | None = None
    if args.variant not in ("static", "alert-only") or args.with_manager:
        manager = Manager(db=args.db, directory=UNREACHABLE_CA, cache_size=max(args.warm, 1000),
                          poll_interval=3600, renew=False)
        await manager.start()
        for index in range(args.warm):
            assert await manager.context_for(name_for(index), wait=30) is not None
    server: Any = None
    accepting: asyncio.Task[None] | None = None
    if args.variant == "static":
        chain_dir = Path(args.chain_dir)
        context = build_context((chain_dir / "chain.pem").read_bytes(), (chain_dir / "key.pem").read_bytes())
        server = await loop.create_server(http, sock=listener, ssl=context, backlog=1024)
    elif args.variant == "alert-only":
        server = await loop.create_server(AlertOnly, sock=listener, backlog=1024)
    elif args.variant == "sni":
        assert manager is not None
        server = await loop.create_server(http, sock=listener, ssl=manager.ssl_context(), backlog=1024)
    else:
        assert manager is not None
        front_class = {"front": TlsFront, "front-task": TaskFront, "front-reader": ReaderFront}[args.variant]
        front = front_class(manager, http, options)
        accepting = loop.create_task(front.serve([listener]))
    if args.gc_freeze:
        import gc

        gc.freeze()
    print("ready", flush=True)
    await stop.wait()
    if server is not None:
        server.close()
    if accepting is not None:
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
    await http.shutdown(5)
    if manager is not None:
        await manager.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=["static", "sni", "front", "front-task", "front-reader", "alert-only"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chain-dir")
    parser.add_argument("--db")
    parser.add_argument("--warm", type=int, default=0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--with-manager", action="store_true", help="start a Manager even where the variant needs none")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once started")
    arguments = parser.parse_args()
    if arguments.loop == "uvloop":
        uvloop.run(main(arguments))
    else:
        asyncio.run(main(arguments))
