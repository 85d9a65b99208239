"""The ``autocert`` command line: parsing, output formatting and exit codes.

Exit codes: 0 success, 1 an operation failed (e.g. issuance), 2 bad usage or bad input.
Bad input is always detected before anything is written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import resource
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from ._version import __version__
from ._config import (
    LETS_ENCRYPT_DIRECTORY,
    ListenError,
    ServeOptions,
    bind_listeners,
    check_admin_binding,
    check_ca_bundle,
    default_db_url,
    listening_socket,
    parse_alpn,
    parse_bool_env,
    parse_listen,
    parse_on_off,
    parse_positive_float,
    parse_order_limit,
    parse_positive_int,
    parse_proxy_protocol,
    parse_seconds_above_zero,
    tcp_upstream,
)
from ._errors import AcmeError, AutocertError, ConfigError, InvalidName, IssuanceError
from ._names import is_pattern, normalize_entry, normalize_name
from ._issuers import directories_from, issuers_for
from ._policy import MAX_CAP, STATES
from ._signals import STOP_SIGNALS, expect_stop_signals, release_stop_signals, stop_requested
from ._timefmt import isoformat
from ._console import emit_json, print_status, print_table, setup_logging

if TYPE_CHECKING:  # imported where used: `serve` binds its ports before loading the server
    from ._manager import Manager
    from ._store import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("autocert")


class UsageError(AutocertError):
    """Bad input from the user: reported in one line with exit code 2."""


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


#: RFC 5280 CRLReason codes accepted by ACME revocation.
REVOCATION_REASONS = {
    "unspecified": 0,
    "keyCompromise": 1,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
}


def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the subcommand; SUPPRESS keeps a value
    # given in one place from being reset by the other parser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help="database URL (env AUTOCERT_DB)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    acme = argparse.ArgumentParser(add_help=False)
    acme.add_argument("--directory", action="append", metavar="URL",
                      help="ACME directory URL; repeat it for CAs to fall back on, tried in order "
                           "(env AUTOCERT_DIRECTORY, comma-separated; default Let's Encrypt)")
    acme.add_argument("--ca-bundle", default=env("AUTOCERT_CA_BUNDLE"), help="PEM trusted for the ACME server(s), at every CA")
    acme.add_argument("--email", default=env("AUTOCERT_EMAIL"), help="ACME account contact, at every CA")
    acme.add_argument("--agree-tos", action="store_true", default=parse_bool_env("AUTOCERT_AGREE_TOS"), help="accept the CA's terms")
    acme.add_argument("--profile", default=env("AUTOCERT_PROFILE"), help="ACME certificate profile")
    acme.add_argument("--order-limit", default=env("AUTOCERT_ORDER_LIMIT"), metavar="N/DURATION",
                      help="new orders per account kept under at each CA, e.g. 300/3h, or none (default: Let's Encrypt's limits for its directories, else none)")
    acme.add_argument("--http", default=env("AUTOCERT_HTTP", "0.0.0.0:80"), help="plain listener HOST:PORT or none")
    acme.add_argument("--https", default=env("AUTOCERT_HTTPS", "0.0.0.0:443"), help="TLS listener HOST:PORT or none")

    parser = argparse.ArgumentParser(prog="autocert", description="Automatic HTTPS: ACME certificates on demand, served by SNI.", parents=[common])
    parser.add_argument("--version", action="version", version=f"autocert {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    db = commands.add_parser("db", help="database maintenance", parents=[common])
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_commands.add_parser("upgrade", help="create or migrate the schema to the newest revision", parents=[common])

    allow = commands.add_parser("allow", help="allow names or *.patterns", parents=[common])
    allow.add_argument("names", nargs="+", metavar="NAME")
    allow.add_argument("--cap", metavar="N", help="for *.patterns: at most N distinct names under it are ever ordered")
    disallow = commands.add_parser("disallow", help="remove names or patterns", parents=[common])
    disallow.add_argument("names", nargs="+", metavar="NAME")
    commands.add_parser("list", help="show the allowlist", parents=[common])
    status = commands.add_parser("status", help="issuance status of every known name", parents=[common])
    status.add_argument("names", nargs="*", metavar="NAME")
    status.add_argument("--state", action="append", metavar="STATE", help="only names in STATE (repeatable)")
    status.add_argument("--limit", metavar="N", help="at most N names")

    issue = commands.add_parser("issue", help="order certificates now", parents=[common, acme])
    issue.add_argument("names", nargs="+", metavar="NAME")
    issue.add_argument("--wait", metavar="SECONDS", help="give up after SECONDS; exit 0 only if all are valid")
    issue.add_argument("--force", action="store_true", help="order even for names whose certificate is valid and not due")

    renew = commands.add_parser("renew", help="renew what is due (or the given names)", parents=[common, acme])
    renew.add_argument("names", nargs="*", metavar="NAME")
    renew.add_argument("--force", action="store_true", help="renew now, whatever the renewal time")
    revoke = commands.add_parser("revoke", help="revoke at the CA and stop serving", parents=[common, acme])
    revoke.add_argument("names", nargs="+", metavar="NAME")
    revoke.add_argument("--reason", choices=sorted(REVOCATION_REASONS), default="unspecified", help="RFC 5280 reason")

    serve = commands.add_parser("serve", help="run the server", parents=[common, acme])
    serve.add_argument("--admin", default=env("AUTOCERT_ADMIN", "127.0.0.1:8081"), help="admin listener HOST:PORT or none")
    serve.add_argument("--admin-token", default=env("AUTOCERT_ADMIN_TOKEN"), help="bearer token for the admin listener")
    serve.add_argument("--upstream", default=env("AUTOCERT_UPSTREAM"),
                       help="reverse-proxy TLS requests to this http(s):// URL, or pass decrypted bytes to tcp://HOST:PORT")
    serve.add_argument("--proxy-protocol", default=env("AUTOCERT_PROXY_PROTOCOL"), metavar="v1|v2",
                       help="with a tcp:// upstream: start each upstream connection with a PROXY protocol header")
    serve.add_argument("--alpn", default=env("AUTOCERT_ALPN"), metavar="LIST",
                       help="with a tcp:// upstream: ALPN protocols offered to clients (default http/1.1)")
    serve.add_argument("--first-contact-wait", default=env("AUTOCERT_FIRST_CONTACT_WAIT", "10"), metavar="SECONDS")
    serve.add_argument("--cache-size", default=env("AUTOCERT_CACHE_SIZE", "10000"), metavar="N")
    serve.add_argument("--default-name", default=None, metavar="NAME", help="certificate for clients without SNI")
    serve.add_argument("--hsts", action="store_true", help="add Strict-Transport-Security to proxied responses")
    serve.add_argument("--header-timeout", default=env("AUTOCERT_HEADER_TIMEOUT", "30"), metavar="SECONDS",
                       help="a client must send each request head within SECONDS (the first one from the handshake)")
    serve.add_argument("--idle-timeout", default=env("AUTOCERT_IDLE_TIMEOUT", "75"), metavar="SECONDS",
                       help="close a kept-alive connection after SECONDS without a request (pass-through: without a byte)")
    serve.add_argument("--access-log", default=env("AUTOCERT_ACCESS_LOG", "on"), metavar="on|off",
                       help="one log line per HTTPS request (default on)")
    serve.add_argument("--log-format", choices=("text", "json"), default=env("AUTOCERT_LOG_FORMAT", "text"))
    serve.add_argument("--on-event", default=env("AUTOCERT_ON_EVENT"), metavar="CMD",
                       help="run CMD (a shell command; event JSON on stdin) on issued, renewed, failed, expiring, expired")
    serve.add_argument("--webhook", default=env("AUTOCERT_WEBHOOK"), metavar="URL", help="POST each such event as JSON to URL")
    return parser


# -- helpers -------------------------------------------------------------------------------


def db_url(args: argparse.Namespace) -> str:
    return getattr(args, "db", None) or env("AUTOCERT_DB") or default_db_url()


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
    if cap is not None and not all(is_pattern(entry) for entry in entries):
        raise UsageError(f"--cap {args.cap}: applies to *.patterns only, not {next(e for e in entries if not is_pattern(e))}")
    async with open_store(args) as store:
        added = await store.allow(entries, cap=cap)
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
        emit_json({"allowed": [{"name": e.entry, "added_at": isoformat(e.added_at), "cap": e.cap} for e in entries]})
    else:
        print_table([[e.entry, isoformat(e.added_at) or "", "" if e.cap is None else str(e.cap)] for e in entries], ["NAME", "ADDED", "CAP"])
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    """Named names at once; otherwise every name (or those in ``--state``), streamed in name
    order from the database a chunk at a time, so that 100,000 names start printing at once."""
    states = args.state or []
    for state in states:
        if state not in STATES:
            raise UsageError(f"--state {state}: unknown state; use one of {', '.join(STATES)}")
    limit = parse_positive_int(args.limit, option="--limit") if args.limit is not None else None
    names = normalise_all(args.names, patterns=False) if args.names else None
    directory = directories_from(None, os.environ, LETS_ENCRYPT_DIRECTORY)[0]
    from ._status import parse_query, status_chunks, status_report

    async with open_store(args) as store:
        if names is not None:
            report = [item for item in await status_report(store, directory=directory, names=names) if not states or item["state"] in states]
            await print_status(_once(report[:limit]), as_json=wants_json(args))
            return EXIT_OK
        query = parse_query(states=states)
        chunks = status_chunks(store, query, directory=directory, limit=limit, chunk=STATUS_CHUNK)
        async with contextlib.aclosing(chunks):
            await print_status(chunks, as_json=wants_json(args), widths=store.status_widths)
    return EXIT_OK


async def _once(items: list[dict[str, Any]]) -> AsyncIterator[list[dict[str, Any]]]:
    yield items


#: Names per chunk of ``autocert status``: the table's columns are sized from the first one
#: when it is all there is, else from the database's longest name and largest attempt count.
STATUS_CHUNK = 1000


def manager_from_args(args: argparse.Namespace, *, challenge_types: Sequence[str], **extra: Any) -> Manager:
    from ._manager import Manager

    extra.setdefault("renew", False)  # one-shot commands do only what they were asked
    order_limit: tuple[int, timedelta] | None | Literal["auto"] = "auto"
    if args.order_limit is not None:
        order_limit = parse_order_limit(args.order_limit)
    # For now every CA gets the command line's options; a CA's own would come from its settings.
    issuers = issuers_for(directories_from(args.directory, os.environ, LETS_ENCRYPT_DIRECTORY), email=args.email,
                          ca_bundle=args.ca_bundle, profile=args.profile, order_limit=order_limit)
    return Manager(db=db_url(args), issuers=issuers, agree_tos=args.agree_tos, challenge_types=challenge_types, **extra)


async def cmd_issue(args: argparse.Namespace) -> int:
    names = normalise_all(args.names, patterns=False)
    wait = parse_positive_float(args.wait, option="--wait") if args.wait is not None else None
    options = listener_options(args)
    manager = manager_from_args(args, challenge_types=challenge_types_for(options))
    async with manager:
        not_allowed = [name for name in names if not manager.is_allowed(name)]
        if not_allowed:
            raise UsageError(f"{not_allowed[0]}: not allowed; run `autocert allow {not_allowed[0]}` first")
        async with challenge_listeners(manager, options):
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(manager.issue(name, force=args.force) for name in names), return_exceptions=True), timeout=wait
                )
            except asyncio.TimeoutError:
                results = [IssuanceError(name, f"not finished within {args.wait} s") for name in names]
        report = await manager.status(names)
    return report_outcomes(args, report, dict(zip(names, results)))


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
    names = normalise_all(args.names, patterns=False) if args.names else None
    options = listener_options(args)
    manager = manager_from_args(args, challenge_types=challenge_types_for(options))
    async with manager:
        async with challenge_listeners(manager, options):
            results = await manager.renew(names, force=args.force)
        report = await manager.status(list(results)) if results else []
    if not results and not wants_json(args):
        print("nothing is due for renewal")
    return report_outcomes(args, report, results)


async def cmd_revoke(args: argparse.Namespace) -> int:
    names = normalise_all(args.names, patterns=False)
    options = listener_options(args)
    manager = manager_from_args(args, challenge_types=challenge_types_for(options))
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
        https=parse_listen(args.https, option="--https"),
        http=parse_listen(args.http, option="--http"),
        admin=parse_listen(args.admin, option="--admin") if hasattr(args, "admin") else None,
    )


def challenge_types_for(options: ServeOptions) -> list[str]:
    """http-01 whenever the http listener is on; tls-alpn-01 on the https listener otherwise."""
    if options.http is not None:
        return ["http-01"]
    if options.https is not None:
        return ["tls-alpn-01"]
    raise ConfigError("--http none and --https none: no listener could answer ACME challenges")


@contextlib.asynccontextmanager
async def challenge_listeners(manager: Manager, options: ServeOptions) -> AsyncIterator[None]:
    """Answer challenges while the CLI orders; defer to a running ``serve`` holding the port."""
    from ._server import listeners

    label = "http" if options.http is not None else "https"
    listen = getattr(options, label)
    assert listen is not None
    try:
        sockets = {label: listening_socket(listen)}
    except ListenError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning("%s is in use; assuming a running `autocert serve` on this database answers challenges", listen)
        yield
        return
    try:
        async with listeners(manager, options, sockets, announce=False):
            yield
    finally:
        for unused in sockets.values():  # a start that failed before handing it on
            unused.close()


async def cmd_serve(args: argparse.Namespace) -> int:
    options = listener_options(args)
    options.admin_token = args.admin_token
    options.upstream = args.upstream
    options.first_contact_wait = parse_positive_float(args.first_contact_wait, option="--first-contact-wait")
    options.proxy_protocol = parse_proxy_protocol(args.proxy_protocol)
    options.alpn = parse_alpn(args.alpn)
    tcp_upstream(options)
    options.hsts = args.hsts
    options.header_timeout = parse_seconds_above_zero(args.header_timeout, option="--header-timeout")
    options.idle_timeout = parse_seconds_above_zero(args.idle_timeout, option="--idle-timeout")
    options.access_log = parse_on_off(args.access_log, option="--access-log")
    options.on_event = args.on_event
    options.webhook = check_webhook(args.webhook)
    check_admin_binding(options)
    challenge_types = challenge_types_for(options)
    if options.http is not None and options.https is not None:
        challenge_types.append("tls-alpn-01")
    cache_size = parse_positive_int(args.cache_size, option="--cache-size")
    default_name = normalize_name(args.default_name) if args.default_name else None
    check_ca_bundle(args.ca_bundle)
    directories_from(args.directory, os.environ, LETS_ENCRYPT_DIRECTORY)  # a bad URL stops us before binding
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
    sockets = bind_listeners(options)
    try:
        from ._server import serve
        from ._tls import DEFAULT_ALPN

        manager = manager_from_args(args, challenge_types=challenge_types, cache_size=cache_size, default_name=default_name,
                                    alpn=options.alpn or DEFAULT_ALPN, renew=True)
        await serve(manager, options, sockets=sockets, stop=stop)
    finally:
        for sock in sockets.values():
            sock.close()
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
        args = build_parser().parse_args(argv)
    except BaseException:  # --help, --version, a usage error: exit as usual
        release_stop_signals()
        raise
    if args.command != "serve" and release_stop_signals():
        return 130  # stopped while the command line was read
    setup_logging(getattr(args, "log_format", "text"), logging.INFO if args.command == "serve" else logging.WARNING)
    handler = cmd_db_upgrade if args.command == "db" else COMMANDS[args.command]
    try:
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
