"""Handing the listening sockets of a running ``serve`` to a new ``serve`` on the same listeners.

A second ``serve`` started with the same listeners as a running one (an upgrade, a blue/green
deploy, systemd starting the new unit before stopping the old) does not bind ports of its own:
it asks the running one for its listening sockets and serves them too. Both then accept from
the same kernel queues, so when the first is stopped, every connection it had not accepted yet
is still there for the second: nothing is refused or reset. (Two sockets joined by
``SO_REUSEPORT`` would not do: closing one resets the connections waiting in its queue.)

The running one answers on a Unix socket in Linux's abstract namespace, named after the user
and the listener addresses, so only a ``serve`` with the same listeners finds it and nothing is
left on disk. Both ends check the other's user (``SO_PEERCRED``): only the same user, or root,
gets the sockets. A ``serve`` that is stopping stops answering at once; the one that took over
answers from then on (it keeps trying to take the name until the old one has let it go).

Standard library only: the supervisor of ``serve --workers`` uses it before anything heavy
is imported.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._config import LISTENER_LABELS, bind_listeners, bind_worker_listeners, configured_listeners

if TYPE_CHECKING:
    import asyncio

    from ._config import ServeOptions

__all__ = ["RETRY_LISTEN", "Handed", "ListenerOffer", "acquire_listeners", "offer_name", "offer_while_serving", "take_over"]

log = logging.getLogger("autocert.handover")

#: Sockets per message: the kernel passes at most 253 descriptors in one.
_BATCH = 200
#: Seconds a running ``serve`` may take to answer before the new one binds its own ports.
_ANSWER_TIMEOUT = 10.0
#: Seconds between tries to take the name while the ``serve`` taken over from still holds it.
RETRY_LISTEN = 0.25

Sets = list[dict[str, list[socket.socket]]]


def offer_name(options: ServeOptions) -> bytes | None:
    """The abstract socket name a ``serve`` with ``options``' listeners answers on (None when
    a listener has port 0: no two ``serve`` share such a listener)."""
    listeners = [(label, listen) for label in LISTENER_LABELS for listen in configured_listeners(options, label)]
    if not listeners or any(listen.port == 0 for _, listen in listeners):
        return None
    key = "\n".join(f"{label} {listen}" for label, listen in listeners)
    return b"\0autocert-listeners-%d-%s" % (os.getuid(), hashlib.sha256(key.encode()).hexdigest()[:24].encode())


def _peer(sock: socket.socket) -> tuple[int, int]:
    """The process id and user id of the process at the other end of ``sock``."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _trusted(uid: int) -> bool:
    return uid in (os.getuid(), 0)


@dataclass
class Handed:
    """The listening sockets taken over from the ``serve`` with process id ``pid``, as that
    process held them: one set per worker (a single ``serve`` has one)."""

    pid: int
    sets: Sets

    @property
    def count(self) -> int:
        return sum(len(socks) for each in self.sets for socks in each.values())

    def regroup(self, workers: int) -> Sets:
        """The sockets as ``workers`` sets: each socket is served by at least one set (a socket
        nobody accepts from would hold its connections forever) and the admin listener by the
        first set only."""
        grouped: Sets = [{} for _ in range(workers)]
        have = len(self.sets)
        for index, each in enumerate(self.sets):
            for label, socks in each.items():
                if label == "admin":
                    targets = [0]
                elif have >= workers:
                    targets = [index % workers]
                else:
                    targets = [target for target in range(workers) if target % have == index]
                for target in targets:
                    grouped[target].setdefault(label, []).extend(socks)
        return grouped


def acquire_listeners(options: ServeOptions, workers: int) -> tuple[Sets, ListenerOffer | None]:
    """The listening sockets of a ``serve`` with ``workers`` workers (one set each; a single
    process has one): taken over from a running ``serve`` on the same listeners, else bound
    here (:func:`autocert._config.bind_listeners`, or ``bind_worker_listeners`` for several);
    with the offer that hands them on to the next ``serve`` (None for a port 0 listener)."""
    name = offer_name(options)
    handed = None if name is None else take_over(name)
    if handed is not None:
        sets = handed.regroup(workers)
    else:
        sets = [bind_listeners(options)] if workers == 1 else bind_worker_listeners(options, workers)
    return sets, None if name is None else ListenerOffer(name, sets)


def take_over(name: bytes) -> Handed | None:
    """The listening sockets of the running ``serve`` that answers on ``name`` (see
    :func:`offer_name`), or None when none does (then the caller binds its own)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as control:
        try:
            control.connect(name)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        control.settimeout(_ANSWER_TIMEOUT)
        if not _trusted(_peer(control)[1]):
            log.warning("a process of another user answers for these listeners; binding them here")
            return None
        try:
            handed = _receive(control)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("the running serve did not hand over its listeners (%s); binding them here", exc)
            return None
    log.info("took over %d listening socket(s) from the running serve (pid %d); stop it when this one is ready", handed.count, handed.pid)
    return handed


def _receive(control: socket.socket) -> Handed:
    header = json.loads(control.recv(65536) or b"null")
    if not isinstance(header, dict):
        raise ValueError("no answer")
    shape: list[dict[str, list[int]]] = header["sets"]  # per set: label -> [family, ...]
    wanted = sum(len(families) for each in shape for families in each.values())
    fds: list[int] = []
    try:
        while len(fds) < wanted:
            _data, received, _flags, _address = socket.recv_fds(control, 16, _BATCH)
            if not received:
                raise ValueError(f"{len(fds)} of {wanted} sockets arrived")
            fds.extend(received)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    it = iter(fds)
    sets: Sets = [{label: [socket.socket(family, socket.SOCK_STREAM, fileno=next(it)) for family in families]
                   for label, families in each.items()} for each in shape]
    return Handed(int(header["pid"]), sets)


class ListenerOffer:
    """The answering end: holds this process's listening sockets (as sets, see :class:`Handed`)
    and sends them to each ``serve`` of the same user that asks."""

    def __init__(self, name: bytes, sets: Sequence[dict[str, list[socket.socket]]]) -> None:
        self.name = name
        self.sets = [{label: list(socks) for label, socks in each.items() if socks} for each in sets]
        self.listener: socket.socket | None = None

    def try_listen(self) -> bool:
        """Take the name; False while another process (the ``serve`` this one took over
        from, still draining) holds it."""
        if self.listener is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(self.name)
        except OSError:
            sock.close()
            return False
        sock.listen(8)
        sock.setblocking(False)
        self.listener = sock
        return True

    def answer(self) -> None:
        """Serve whoever is waiting on the listener (called when it is readable)."""
        assert self.listener is not None
        try:
            peer, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with peer:
            try:
                peer.settimeout(_ANSWER_TIMEOUT)
                pid, uid = _peer(peer)
                if not _trusted(uid):
                    log.warning("refused the listeners to a process of user %d", uid)
                    return
                self._send(peer)
                log.info("handed the listeners to a new serve (pid %d)", pid)
            except OSError as exc:
                log.warning("could not hand the listeners over: %s", exc)

    def _send(self, peer: socket.socket) -> None:
        shape = [{label: [sock.family for sock in socks] for label, socks in each.items()} for each in self.sets]
        peer.send(json.dumps({"pid": os.getpid(), "sets": shape}).encode())
        fds = array.array("i", [sock.fileno() for each in self.sets for socks in each.values() for sock in socks])
        for start in range(0, len(fds), _BATCH):
            socket.send_fds(peer, [b"s"], fds[start:start + _BATCH])

    def close(self) -> None:
        """Stop answering: the next ``serve`` takes the name (this one is stopping)."""
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.close()
            self.listener = None


async def offer_while_serving(offer: ListenerOffer, stop: asyncio.Event) -> None:
    """Answer on the event loop until ``stop`` is set, taking the name as soon as it is free."""
    import asyncio  # the supervisor has no event loop and does not load it

    loop = asyncio.get_running_loop()
    try:
        while not offer.try_listen():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_LISTEN)
            if stop.is_set():
                return
        assert offer.listener is not None
        loop.add_reader(offer.listener, offer.answer)
        try:
            await stop.wait()
        finally:
            loop.remove_reader(offer.listener)
    finally:
        offer.close()
