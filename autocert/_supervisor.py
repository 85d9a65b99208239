"""``serve --workers N``: one process per core, each a complete single-process ``serve``.

The supervisor binds every listener before any worker exists: for each https and http
listener (every ``--https`` and ``--http``, and both sockets of a ``[::]`` that needs two)
one ``SO_REUSEPORT`` socket per worker, so the kernel spreads connections evenly across
them, and the one admin socket for worker 0. It then starts each worker as a fresh ``python -m
autocert`` with the same command line (fork and exec: a worker imports the server stack for
itself, and the supervisor never does), passing it its sockets, its slot of the shared
figures (:mod:`autocert._board`) and a pipe on which it says it is ready.

It keeps every socket open for the whole run, so when a worker dies the connections the
kernel queued on its socket wait for its replacement, started at once (after a second when
that slot's previous worker died within a second of starting), instead of being refused.
SIGTERM or SIGINT is passed to every worker, each drains as a single ``serve`` does, and the
supervisor exits once they all have. SIGHUP starts a new worker beside each old one and
stops the old one once the new one is ready, so no connection is refused; a new worker that
fails to start leaves the old one serving. A worker that exits before it was ever ready at
start (bad input, a wrong secret) stops them all, and the supervisor exits with its status.

Standard library only, and no event loop: it sleeps in ``select`` on its signal pipe and
the workers' ready pipes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._board import Board
from ._config import WORKER_ENV
from ._handover import RETRY_LISTEN, ListenerOffer

if TYPE_CHECKING:
    import asyncio

__all__ = ["WORKER_ENV", "Supervisor", "WorkerSetup", "worker_setup"]

log = logging.getLogger("autocert.supervisor")

#: A slot whose worker dies within this many seconds of starting waits this long before
#: the next start, so a worker that cannot run does not spin the CPU.
RESTART_PAUSE = 1.0

#: How often a worker checks that its supervisor still runs.
SUPERVISOR_CHECK_INTERVAL = 1.0


@dataclass
class WorkerSetup:
    """What a worker got from its supervisor (parsed from :data:`WORKER_ENV`)."""

    index: int
    workers: int
    sockets: dict[str, list[socket.socket]]
    board: Board
    ready_fd: int
    #: The supervisor's pid, from before this process started: one that died while this
    #: worker was still starting is noticed too.
    supervisor: int

    async def watch_supervisor(self, stop: asyncio.Event) -> None:
        """Stop (gracefully) when the supervisor is gone: a worker it can no longer replace or
        stop would hold the ports against the next start."""
        import asyncio  # a worker's: the supervisor itself has no event loop

        while os.getppid() == self.supervisor:
            await asyncio.sleep(SUPERVISOR_CHECK_INTERVAL)
        log.warning("the supervisor (pid %d) is gone; stopping", self.supervisor)
        stop.set()

    def say_ready(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"r")
        os.close(self.ready_fd)


def _worker_fields() -> dict[str, str] | None:
    text = os.environ.get(WORKER_ENV)
    return dict(part.split("=", 1) for part in text.split(",")) if text else None


def worker_index() -> int | None:
    """Which worker of ``serve --workers`` this process is, if it is one (for its log lines)."""
    fields = _worker_fields()
    return None if fields is None else int(fields["index"])


def worker_setup() -> WorkerSetup | None:
    """This process's worker setup, or None when it is not a supervisor's worker."""
    fields = _worker_fields()
    os.environ.pop(WORKER_ENV, None)
    if fields is None:
        return None
    sockets: dict[str, list[socket.socket]] = {
        label: [socket.socket(fileno=int(fd)) for fd in fields[label].split(":")] for label in ("https", "http", "admin") if label in fields
    }
    for socks in sockets.values():
        for sock in socks:
            sock.setblocking(False)
    board = Board(int(fields["board"]), int(fields["slots"]), slot=int(fields["slot"]), expected=int(fields["workers"]))
    return WorkerSetup(int(fields["index"]), int(fields["workers"]), sockets, board, int(fields["ready"]), int(fields["supervisor"]))


@dataclass
class _Worker:
    pid: int
    index: int
    slot: int
    ready_pipe: int
    started: float
    ready: bool = False
    retiring: bool = False


@dataclass
class Supervisor:
    """Runs ``workers`` copies of ``argv``, worker ``i`` over ``sockets[i]`` (its sockets by
    label, as :func:`autocert._config.bind_worker_listeners` binds them)."""

    argv: Sequence[str]
    workers: int
    sockets: list[dict[str, list[socket.socket]]]
    announce: list[str] = field(default_factory=list)
    #: Hands the listeners to a new ``serve`` on the same ones (see :mod:`autocert._handover`).
    offer: ListenerOffer | None = None
    running: dict[int, _Worker] = field(default_factory=dict)
    stopping: bool = False
    exit_code: int = 0

    def __post_init__(self) -> None:
        # Twice the workers: during a SIGHUP an old and a new worker of each index overlap.
        self.board = Board.create(self.workers * 2)
        self._selector = selectors.DefaultSelector()
        self._restart_at: dict[int, float] = {}
        self._announced = False

    # -- starting and stopping workers -----------------------------------------------------

    def _free_slot(self) -> int:
        used = {worker.slot for worker in self.running.values()}
        return next(slot for slot in range(self.workers * 2) if slot not in used)

    def _spawn(self, index: int) -> None:
        read, write = os.pipe()
        slot = self._free_slot()
        fds = {label: [sock.fileno() for sock in socks] for label, socks in self.sockets[index].items() if socks}
        setup = {"index": index, "workers": self.workers, "slot": slot, "slots": self.workers * 2, "supervisor": os.getpid(),
                 "board": self.board.fd, "ready": write, **{label: ":".join(map(str, each)) for label, each in fds.items()}}
        env = {**os.environ, WORKER_ENV: ",".join(f"{key}={value}" for key, value in setup.items())}
        inherited = [self.board.fd, write, *(fd for each in fds.values() for fd in each)]
        pid = os.fork()
        if pid == 0:  # the child: only exec, nothing that could take a lock
            try:
                for fd in inherited:
                    os.set_inheritable(fd, True)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.execve(sys.executable, [sys.executable, "-m", "autocert", *self.argv], env)
            finally:
                os._exit(127)
        os.close(write)
        os.set_blocking(read, False)
        worker = _Worker(pid, index, slot, read, time.monotonic())
        self.running[pid] = worker
        self.board.started(slot, pid)
        self._selector.register(read, selectors.EVENT_READ, worker)

    def _signal_all(self, signum: int) -> None:
        for pid in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self) -> None:
        if not self.stopping:
            log.info("stopping %d worker(s)", len(self.running))
        self.stopping = True
        self._close_offer()
        self._restart_at.clear()
        self._signal_all(signal.SIGTERM)

    def replace_all(self) -> None:
        """SIGHUP: a new worker beside each old one; the old one stops when the new is ready."""
        if self.stopping:
            return
        if any(worker.retiring for worker in self.running.values()):
            log.warning("SIGHUP ignored: the previous replacement is still under way")
            return
        old = [worker for worker in self.running.values() if not worker.retiring]
        log.info("replacing %d worker(s)", len(old))
        for worker in old:
            worker.retiring = True
        for index in sorted({worker.index for worker in old}):
            self._spawn(index)

    # -- events ------------------------------------------------------------------------------

    def _on_ready(self, worker: _Worker) -> None:
        with contextlib.suppress(BlockingIOError):
            if not os.read(worker.ready_pipe, 16):
                self._selector.unregister(worker.ready_pipe)
                return
        if worker.ready:
            return
        worker.ready = True
        for other in self.running.values():  # the worker it replaces may go now
            if other.index == worker.index and other.retiring and other is not worker:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other.pid, signal.SIGTERM)
        if not self._announced and sum(1 for w in self.running.values() if w.ready) >= self.workers:
            self._announced = True
            for line in self.announce:
                print(line, flush=True)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.running.pop(pid, None)
            if worker is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.ready_pipe)
            os.close(worker.ready_pipe)
            self.board.retire(worker.slot)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping or worker.retiring:
                continue
            previous = [other for other in self.running.values() if other.index == worker.index and other.retiring]
            if not worker.ready and previous:  # a replacement (SIGHUP) that failed: keep the old worker
                log.error("the new worker %d (pid %d) exited before it was ready; the old one keeps serving", worker.index, pid)
                for other in previous:
                    other.retiring = False
                continue
            if not worker.ready:
                how = f"signal {-code}" if code < 0 else f"status {code}"
                log.error("worker %d (pid %d) exited with %s before it was ready; stopping", worker.index, pid, how)
                self.exit_code = code if code > 0 else 1
                self.stop()
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            log.warning("worker %d (pid %d) %s; starting another", worker.index, pid, how)
            quick = time.monotonic() - worker.started < RESTART_PAUSE
            self._restart_at[worker.index] = time.monotonic() + (RESTART_PAUSE if quick else 0.0)

    def _offer_due(self) -> float | None:
        """Answer new ``serve`` processes once the name is free: seconds until the next try."""
        offer = self.offer
        if offer is None or offer.listener is not None or self.stopping:
            return None
        if not offer.try_listen():
            return RETRY_LISTEN
        assert offer.listener is not None
        self._selector.register(offer.listener, selectors.EVENT_READ, offer)
        return None

    def _close_offer(self) -> None:
        if self.offer is not None and self.offer.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self.offer.listener)
            self.offer.close()

    def _restart_due(self) -> float | None:
        """Start the replacements that are due; seconds until the next one, if any."""
        now = time.monotonic()
        for index, at in list(self._restart_at.items()):
            if at <= now:
                del self._restart_at[index]
                self._spawn(index)
        return min((at - now for at in self._restart_at.values()), default=None)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, *, stop_requested: bool = False) -> int:
        wake_read, wake_write = os.pipe()
        for fd in (wake_read, wake_write):
            os.set_blocking(fd, False)
        handled = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for signum in handled:
            signal.signal(signum, lambda *_: None)  # the wake-up fd says which
        signal.set_wakeup_fd(wake_write)
        self._selector.register(wake_read, selectors.EVENT_READ, None)
        try:
            for index in range(self.workers):
                self._spawn(index)
            if stop_requested:
                self.stop()
            while self.running or (self._restart_at and not self.stopping):
                timeouts = [due for due in (self._restart_due(), self._offer_due()) if due is not None]
                for key, _ in self._selector.select(min(timeouts, default=None)):
                    if key.data is None:
                        self._on_signals(os.read(wake_read, 64))
                    elif isinstance(key.data, ListenerOffer):
                        key.data.answer()
                    else:
                        self._on_ready(key.data)
                self._reap()
        finally:
            signal.set_wakeup_fd(-1)
            for signum in handled:
                signal.signal(signum, signal.SIG_DFL)
            self._close_offer()
            self._signal_all(signal.SIGKILL)  # only if this loop itself failed
            for fd in (wake_read, wake_write):
                os.close(fd)
        return self.exit_code

    def _on_signals(self, received: bytes) -> None:
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()
            elif signum == signal.SIGHUP:
                self.replace_all()
