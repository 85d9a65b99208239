"""The ``autocert`` commands: what each does with the parsed options, output and exit codes.

Exit codes: 0 success, 1 an operation failed (e.g. issuance), 2 bad usage or bad input.
Bad input is always detected before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import resource
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._config import (
    ListenError,
    ServeOptions,
    WORKER_ENV,
    bind_listeners,
    check_admin_binding,
    close_sockets,
    parse_alpn,
    parse_listen,
    parse_listeners,
    parse_on_off,
    parse_positive_float,
    parse_positive_int,
    parse_proxy_protocol,
    parse_upstream,
    parse_seconds_above_zero,
    parse_trusted_proxies,
    parse_workers,
    ready_line,
    tcp_upstream,
)
from ._handover import acquire_listeners, offer_while_serving
from ._errors import AcmeError, AutocertError, ConfigError, InvalidName, IssuanceError
from ._cli_manager import db_url, issuers_from_args, manager_from_args, primary_directory
from ._parser import REVOCATION_REASONS, env, parse_arguments
from ._names import is_pattern, normalize_entry, normalize_name
from ._policy import MAX_CAP, STATES
from ._signals import STOP_SIGNALS, expect_stop_signals, release_stop_signals, stop_requested
from ._timefmt import isoformat
from ._console import emit_json, print_status, print_table, setup_logging

if TYPE_CHECKING:  # imported where used: `serve` binds its ports before loading the server
    import asyncio  # and its `--workers` supervisor runs without an event loop

    from ._manager import Manager
    from ._store import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("autocert")


class UsageError(AutocertError):
    """Bad input from the user: reported in one line with exit code 2."""


# -- helpers -------------------------------------------------------------------------------


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def normalise_all(raw_names: Sequence[str], *, patterns: bool) -> list[str]:
    """Normalise every name before anything is written, so one bad name writes nothing."""
    normaliser = normalize_entry if patterns else normalize_name
    result: list[str] = []
    for raw in raw_names:
        name = normaliser(raw)
        if name not in result:
            result.append(name)
    return result


@contextlib.asynccontextmanager
async def open_store(args: argparse.Namespace) -> AsyncIterator[Store]:
    from ._store import Store

    store = await Store.open(db_url(args))
    try:
        yield store
    finally:
        await store.close()


# -- commands ------------------------------------------------------------------------------


async def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from ._store import Store

    store = await Store.open(db_url(args), migrate=False)
    try:
        revision = await store.upgrade()
    finally:
        await store.close()
    print(f"database is at revision {revision}")
    return EXIT_OK


async def cmd_allow(args: argparse.Namespace) -> int:
    entries = normalise_all(args.names, patterns=True)
    cap = parse_positive_int(args.cap, option="--cap", maximum=MAX_CAP) if args.cap is not None else None
    for option, given in (("--cap", cap is not None), ("--wildcard", args.wildcard)):
        if given and not all(is_pattern(entry) for entry in entries):
            raise UsageError(f"{option}: applies to *.patterns only, not {next(e for e in entries if not is_pattern(e))}")
    if args.wildcard and cap is not None:
        raise UsageError("--cap with --wildcard: a wildcard pattern has one certificate, so no cap applies")
    if args.wildcard and not args.dns:
        raise UsageError(f"--wildcard {entries[0]}: a wildcard certificate needs dns-01; set --dns (or AUTOCERT_DNS) to the provider serve will use")
    async with open_store(args) as store:
        added = await store.allow(entries, cap=cap, wildcard=args.wildcard)
    return report_allowlist_change(args, entries, added, ("allowed", "added", "already allowed"))


async def cmd_disallow(args: argparse.Namespace) -> int:
    entries = normalise_all(args.names, patterns=True)
    async with open_store(args) as store:
        removed = await store.disallow(entries)
    return report_allowlist_change(args, entries, removed, ("disallowed", "removed", "was not allowed"))


def report_allowlist_change(args: argparse.Namespace, entries: list[str], changed: list[str], words: tuple[str, str, str]) -> int:
    """One line per entry (or the JSON object): ``words`` are the verb, the JSON key of the
    entries that changed, and the note for those that did not."""
    verb, changed_key, unchanged = words
    if wants_json(args):
        emit_json({verb: entries, changed_key: changed})
    else:
        for entry in entries:
            print(f"{verb} {entry}" + ("" if entry in changed else f" ({unchanged})"))
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    async with open_store(args) as store:
        entries = await store.allowed()
    if wants_json(args):
        emit_json({"allowed": [{"name": e.entry, "added_at": isoformat(e.added_at), "cap": e.cap, "wildcard": e.wildcard} for e in entries]})
    else:
        rows = [[e.entry, isoformat(e.added_at) or "", "" if e.cap is None else str(e.cap), "wildcard" if e.wildcard else ""] for e in entries]
        print_table(rows, ["NAME", "ADDED", "CAP", "CERTIFICATE"])
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    """Named names at once; otherwise every name (or those in ``--state``), streamed in name
    order from the database a chunk at a time, so that 100,000 names start printing at once."""
    states = args.state or []
    for state in states:
        if state not in STATES:
            raise UsageError(f"--state {state}: unknown state; use one of {', '.join(STATES)}")
    limit = parse_positive_int(args.limit, option="--limit") if args.limit is not None else None
    names = normalise_all(args.names, patterns=True) if args.names else None
    directory = primary_directory(args)
    from ._listing import open_listing
    from ._status_rules import StatusQuery

    query = StatusQuery(states=frozenset(states))
    listing = await open_listing(db_url(args))
    if listing is not None:  # the common case, read without importing SQLAlchemy
        async with listing:
            await _print_report(
                args, names, states, limit, named=lambda wanted: listing.named(wanted, directory=directory),
                chunks=lambda: listing.chunks(query, directory=directory, limit=limit, chunk=STATUS_CHUNK), widths=listing.widths,
            )
        return EXIT_OK
    from ._status import status_chunks, status_report

    async with open_store(args) as store:
        await _print_report(
            args, names, states, limit, named=lambda wanted: status_report(store, directory=directory, names=wanted),
            chunks=lambda: status_chunks(store, query, directory=directory, limit=limit, chunk=STATUS_CHUNK), widths=store.status_widths,
        )
    return EXIT_OK


async def _print_report(
    args: argparse.Namespace, names: list[str] | None, states: list[str], limit: int | None, *,
    named: Callable[[list[str]], Awaitable[list[dict[str, Any]]]], chunks: Callable[[], AsyncGenerator[list[dict[str, Any]], None]],
    widths: Callable[[], Awaitable[tuple[int, int]]],
) -> None:
    """Named names at once (those in ``states``, at most ``limit``); else the listing, streamed."""
    if names is not None:
        report = [item for item in await named(names) if not states or item["state"] in states]
        await print_status(_once(report[:limit]), as_json=wants_json(args))
        return
    listed = chunks()
    async with contextlib.aclosing(listed):
        await print_status(listed, as_json=wants_json(args), widths=widths)


async def _once(items: list[dict[str, Any]]) -> AsyncIterator[list[dict[str, Any]]]:
    yield items


#: Names per chunk of ``autocert status``: the table's columns are sized from the first one
#: when it is all there is, else from the database's longest name and largest attempt count.
STATUS_CHUNK = 1000


async def cmd_issue(args: argparse.Namespace) -> int:
    import asyncio

    names = normalise_all(args.names, patterns=True)
    wait = parse_positive_float(args.wait, option="--wait") if args.wait is not None else None
    options = listener_options(args)
    manager = manager_from_args(args, challenge_types=challenge_types_for(options, args))
    async with manager:
        not_allowed = [name for name in names if not await manager.may_serve(name)]
        if not_allowed:
            raise UsageError(f"{not_allowed[0]}: not allowed; run `autocert allow {not_allowed[0]}` first")
        async with challenge_listeners(manager, options):
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(manager.issue(name, force=args.force) for name in names), return_exceptions=True), timeout=wait
                )
            except asyncio.TimeoutError:
                results = [IssuanceError(name, f"not finished within {args.wait} s") for name in names]
        # A name under a --wildcard pattern is reported as the certificate that serves it.
        outcomes = {getattr(result, "name", name): result for name, result in zip(names, results)}
        report = await manager.status(list(outcomes))
    return report_outcomes(args, report, outcomes)


def report_outcomes(args: argparse.Namespace, report: list[dict[str, Any]], results: dict[str, Any]) -> int:
    """Print what became of each name; exit 1 if any failed."""
    failures = {name: result for name, result in results.items() if isinstance(result, BaseException)}
    if wants_json(args):
        emit_json({"certificates": report})
    else:
        for item in report:
            if item["name"] in failures:
                print(f"{item['name']}: failed: {failures[item['name']]}")
            else:
                print(f"{item['name']}: {item['state']}, serial {item['serial']}, until {item['not_after']}")
    return EXIT_FAILED if failures else EXIT_OK


async def cmd_renew(args: argparse.Namespace) -> int:
    names = normalise_all(args.names, patterns=True) if args.names else None
    options = listener_options(args)
    manager = manager_from_args(args, challenge_types=challenge_types_for(options, args))
    async with manager:
        async with challenge_listeners(manager, options):
            results = await manager.renew(names, force=args.force)
        report = await manager.status(list(results)) if results else []
    if not results and not wants_json(args):
        print("nothing is due for renewal")
    return report_outcomes(args, report, results)


async def cmd_revoke(args: argparse.Namespace) -> int:
    names = normalise_all(args.names, patterns=True)
    options = listener_options(args)
    manager = manager_from_args(args, challenge_types=challenge_types_for(options, args))
    results: dict[str, Any] = {}
    async with manager:
        for name in names:
            try:
                results[name] = await manager.revoke(name, REVOCATION_REASONS[args.reason])
            except (IssuanceError, AcmeError) as exc:
                results[name] = exc
    if wants_json(args):
        emit_json({"revoked": [{"name": n, "serial": r.serial} for n, r in results.items() if not isinstance(r, BaseException)]})
    for name, result in results.items():
        if isinstance(result, BaseException):
            print(f"autocert: {name}: not revoked: {result}", file=sys.stderr)
        elif not wants_json(args):
            print(f"{name}: revoked serial {result.serial}; no longer served")
    return EXIT_FAILED if any(isinstance(r, BaseException) for r in results.values()) else EXIT_OK


def raise_open_file_limit() -> None:
    """Every connection is a descriptor: a soft limit of 1,024 (a common default) caps a busy
    server at about a thousand clients, idle ones included. The soft limit is raised to the
    hard one, which needs no privilege."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open-file limit raised from %d to %d", soft, hard)


def check_webhook(url: str | None) -> str | None:
    """A webhook must be an absolute http(s) URL; caught at start, not at the first failure."""
    if not url:
        return None
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.strip("/"):
        raise ConfigError(f"--webhook {url!r}: not an http:// or https:// URL")
    return url


def listener_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        https=parse_listeners(args.https or [env("AUTOCERT_HTTPS", "[::]:443")], option="--https"),
        http=parse_listeners(args.http or [env("AUTOCERT_HTTP", "[::]:80")], option="--http"),
        admin=parse_listen(args.admin, option="--admin") if hasattr(args, "admin") else None,
    )


def challenge_types_for(options: ServeOptions, args: argparse.Namespace) -> list[str]:
    """http-01 whenever an http listener is on; tls-alpn-01 on the https listeners otherwise;
    dns-01 when there is neither, or first with ``--prefer-dns`` (the manager adds it last
    whenever ``--dns`` is set)."""
    first = ["dns-01"] if args.prefer_dns else []
    if options.http:
        return [*first, "http-01"]
    if options.https:
        return [*first, "tls-alpn-01"]
    if args.dns:
        return ["dns-01"]
    raise ConfigError("--http none and --https none: no listener could answer ACME challenges (nor dns-01: no --dns)")


@contextlib.asynccontextmanager
async def challenge_listeners(manager: Manager, options: ServeOptions) -> AsyncIterator[None]:
    """Answer challenges while the CLI orders; defer to a running ``serve`` holding the port."""
    from ._server import listeners

    label = "http" if options.http else "https"
    if not getattr(options, label):  # dns-01 alone
        yield
        return
    try:
        sockets = bind_listeners(options, (label,))
    except ListenError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning("%s; assuming a running `autocert serve` on this database answers challenges", exc)
        yield
        return
    try:
        async with listeners(manager, options, sockets, announce=False):
            yield
    finally:
        close_sockets(sockets)  # what a start that failed did not hand on


@dataclass
class ServeSettings:
    """``serve``'s command line, checked: a supervisor checks it before any worker starts."""

    options: ServeOptions
    challenge_types: list[str]
    cache_size: int
    default_name: str | None
    workers: int


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    options = listener_options(args)
    options.admin_token = args.admin_token
    options.upstream = args.upstream
    options.first_contact_wait = parse_positive_float(args.first_contact_wait, option="--first-contact-wait")
    options.proxy_protocol = parse_proxy_protocol(args.proxy_protocol)
    options.alpn = parse_alpn(args.alpn)
    options.trusted_proxies = parse_trusted_proxies(args.trusted_proxies)
    if tcp_upstream(options) is None and options.upstream:
        parse_upstream(options.upstream)
    options.hsts = args.hsts
    options.header_timeout = parse_seconds_above_zero(args.header_timeout, option="--header-timeout")
    options.idle_timeout = parse_seconds_above_zero(args.idle_timeout, option="--idle-timeout")
    options.access_log = parse_on_off(args.access_log, option="--access-log")
    options.host_check = parse_on_off(args.host_check, option="--host-check")
    options.on_event = args.on_event
    options.webhook = check_webhook(args.webhook)
    check_admin_binding(options)
    challenge_types = challenge_types_for(options, args)
    if options.http and options.https:
        challenge_types.append("tls-alpn-01")
    cache_size = parse_positive_int(args.cache_size, option="--cache-size")
    default_name = normalize_name(args.default_name) if args.default_name else None
    issuers_from_args(args)  # a bad directory, trust-anchor file, order limit or EAB pair stops us before binding
    return ServeSettings(options, challenge_types, cache_size, default_name, parse_workers(args.workers))


def supervise_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``serve`` with several workers: check the command line, bind every listener, then
    start and watch the workers (:mod:`autocert._supervisor`), without an event loop."""
    from ._supervisor import Supervisor

    settings = serve_settings(args)
    raise_open_file_limit()
    sockets, offer = acquire_listeners(settings.options, settings.workers)
    try:
        announce = list(dict.fromkeys(ready_line(label, sock) for label, socks in sockets[0].items() for sock in socks))
        supervisor = Supervisor(argv, settings.workers, sockets, announce, offer=offer)
        log.info("serving with %d worker processes", settings.workers)
        return supervisor.run(stop_requested=release_stop_signals())
    finally:
        for each in sockets:
            close_sockets(each)


async def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from ._supervisor import worker_setup

    worker = worker_setup()  # a worker of `serve --workers`: its listeners come bound
    settings = serve_settings(args)
    options = settings.options
    cache_size = settings.cache_size
    if worker is not None:
        cache_size = max(1, cache_size // worker.workers)  # --cache-size is the whole server's budget
    raise_open_file_limit()
    # From here a stop signal is the loop's to handle; one that came earlier was recorded.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    if stop_requested():
        stop.set()
    # Bound before the server's modules load (about a second): a client that connects while
    # autocert starts or restarts waits in the kernel's queue instead of being refused.
    offering: asyncio.Task[None] | None = None  # answers a new serve on the same listeners
    if worker is not None:
        sockets = worker.sockets
    else:
        (sockets,), offer = acquire_listeners(options, 1)
        if offer is not None:
            offering = loop.create_task(offer_while_serving(offer, stop))
    try:
        from ._server import serve
        from ._tls import DEFAULT_ALPN

        manager = manager_from_args(args, challenge_types=settings.challenge_types, cache_size=cache_size,
                                    default_name=settings.default_name, alpn=options.alpn or DEFAULT_ALPN)
        ready: asyncio.Event | None = None
        if worker is not None:
            from ._board import Board

            manager.attachments[Board] = worker.board
            ready = asyncio.Event()
            loop.create_task(ready.wait()).add_done_callback(lambda t: None if t.cancelled() else worker.say_ready())
            loop.create_task(worker.watch_supervisor(stop))
        await serve(manager, options, sockets=sockets, stop=stop, ready=ready, announce=worker is None)
    finally:
        if offering is not None:
            offering.cancel()
        close_sockets(sockets)
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    return EXIT_OK


COMMANDS = {
    "allow": cmd_allow,
    "disallow": cmd_disallow,
    "list": cmd_list,
    "status": cmd_status,
    "issue": cmd_issue,
    "renew": cmd_renew,
    "revoke": cmd_revoke,
    "serve": cmd_serve,
}


def run(argv: Sequence[str] | None = None) -> int:
    expect_stop_signals()
    try:
        args = parse_arguments(argv)
    except ConfigError as exc:
        release_stop_signals()
        print(f"autocert: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException:  # --help, --version, a usage error: exit as usual
        release_stop_signals()
        raise
    if args.command != "serve" and release_stop_signals():
        return 130  # stopped while the command line was read
    worker = None
    if args.command == "serve":
        from ._supervisor import worker_index

        worker = worker_index()
    setup_logging(getattr(args, "log_format", "text"), logging.INFO if args.command == "serve" else logging.WARNING, worker=worker)
    handler = cmd_db_upgrade if args.command == "db" else COMMANDS[args.command]
    try:
        if args.command == "serve" and WORKER_ENV not in os.environ and parse_workers(args.workers) > 1:
            return supervise_serve(args, sys.argv[1:] if argv is None else argv)
        return run_async(handler(args), use_uvloop=args.command == "serve")
    except (InvalidName, ConfigError, UsageError) as exc:
        print(f"autocert: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except IssuanceError as exc:
        print(f"autocert: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except AutocertError as exc:
        print(f"autocert: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def run_async(coroutine: Any, *, use_uvloop: bool) -> int:
    """Run on uvloop where installed (the server's hot path is ~20% cheaper), else asyncio."""
    import asyncio

    if use_uvloop and os.environ.get("AUTOCERT_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            code = EXIT_OK
        else:
            raise
    sys.exit(code)
