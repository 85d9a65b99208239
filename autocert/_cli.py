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
from typing import TYPE_CHECKING, Any

from ._version import __version__
from ._config import (
    ListenError,
    ServeOptions,
    bind_listeners,
    check_admin_binding,
    listening_socket,
    parse_alpn,
    parse_bool_env,
    parse_listen,
    parse_on_off,
    parse_positive_float,
    parse_positive_int,
    parse_proxy_protocol,
    parse_seconds_above_zero,
    parse_trusted_proxies,
    tcp_upstream,
)
from ._config_file import apply_config_file, load_config_file
from ._errors import AcmeError, AutocertError, ConfigError, InvalidName, IssuanceError
from ._names import is_pattern, normalize_entry, normalize_name
from ._cli_manager import DirectoryAction, db_url, issuers_from_args, manager_from_args, primary_directory
from ._issuers import DIRECTORY_ENV
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


#: The environment variables options are read from, recorded as the parser is built (plus
#: the one read later): a config file's value for the same option gives way to them.
ENV_NAMES: set[str] = {"AUTOCERT_DB"}


def env(name: str, default: str | None = None) -> str | None:
    ENV_NAMES.add(name)
    return os.environ.get(name) or default


def env_flag(name: str) -> bool:
    ENV_NAMES.add(name)
    return parse_bool_env(name)


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
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="TOML file of options (first_contact_wait = 10, [[issuer]] tables); environment and command line override it"
                             " (env AUTOCERT_CONFIG)")

    acme = argparse.ArgumentParser(add_help=False)
    ENV_NAMES.add(DIRECTORY_ENV)  # read when the CAs are put together (a comma list)
    acme.add_argument("--directory", action=DirectoryAction, metavar="URL",
                      help="ACME directory URL; repeat it for CAs to fall back on, tried in order (env AUTOCERT_DIRECTORY, "
                           "comma-separated; default: the config file's [[issuer]] tables, else Let's Encrypt)")
    acme.add_argument("--ca-bundle", default=env("AUTOCERT_CA_BUNDLE"), help="PEM trusted for the ACME server(s), at every CA")
    acme.add_argument("--email", default=env("AUTOCERT_EMAIL"), help="ACME account contact, at every CA")
    acme.add_argument("--agree-tos", action="store_true", default=env_flag("AUTOCERT_AGREE_TOS"), help="accept the CA's terms")
    acme.add_argument("--profile", default=env("AUTOCERT_PROFILE"), help="ACME certificate profile")
    acme.add_argument("--order-limit", default=env("AUTOCERT_ORDER_LIMIT"), metavar="N/DURATION",
                      help="new orders per account kept under at each CA, e.g. 300/3h, or none (default: Let's Encrypt's limits for its directories, else none)")
    acme.add_argument("--eab-kid", default=env("AUTOCERT_EAB_KID"), metavar="KID",
                      help="External Account Binding key id, for CAs that require it (with --eab-hmac-key), at every CA")
    acme.add_argument("--eab-hmac-key", default=env("AUTOCERT_EAB_HMAC_KEY"), metavar="KEY",
                      help="External Account Binding MAC key, base64url as the CA gave it (with --eab-kid), at every CA")
    acme.add_argument("--ask", default=env("AUTOCERT_ASK"), metavar="URL",
                      help="for names not on the allowlist, GET URL?domain=NAME: a 2xx allows the name (Caddy's on-demand ask)")
    acme.add_argument("--ask-timeout", default=env("AUTOCERT_ASK_TIMEOUT", "2"), metavar="SECONDS",
                      help="an ask that takes longer refuses the name (default 2)")
    acme.add_argument("--http", default=env("AUTOCERT_HTTP", "0.0.0.0:80"), help="plain listener HOST:PORT or none")
    acme.add_argument("--https", default=env("AUTOCERT_HTTPS", "0.0.0.0:443"), help="TLS listener HOST:PORT or none")
    acme.add_argument("--dns", default=env("AUTOCERT_DNS"), metavar="PROVIDER",
                      help="answer dns-01 (wildcards; last choice for other names) by publishing TXT records: "
                           "exec:COMMAND (runs COMMAND set|clear FQDN VALUE), rfc2136://KEYNAME:SECRET@HOST:PORT?algorithm=hmac-sha256[&zone=ZONE] "
                           "or lexicon:PROVIDER (pip install 'autocert[lexicon]'; credentials in LEXICON_* variables)")
    acme.add_argument("--dns-resolver", action="append", default=[x for x in [env("AUTOCERT_DNS_RESOLVER")] if x], metavar="HOST:PORT",
                      help="DNS servers (repeatable or comma list) for zone and CNAME lookups and for checking that a record is "
                           "visible (default: the system resolver, then every authoritative server of the zone)")
    acme.add_argument("--dns-timeout", default=env("AUTOCERT_DNS_TIMEOUT", "120"), metavar="SECONDS",
                      help="how long a TXT record may take to be visible before the order fails (default 120)")
    acme.add_argument("--prefer-dns", action="store_true", default=parse_bool_env("AUTOCERT_PREFER_DNS"),
                      help="answer dns-01 first for every name, not only for wildcards (names the CA cannot reach)")

    parser = argparse.ArgumentParser(prog="autocert", description="Automatic HTTPS: ACME certificates on demand, served by SNI.", parents=[common])
    parser.add_argument("--version", action="version", version=f"autocert {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    db = commands.add_parser("db", help="database maintenance", parents=[common])
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_commands.add_parser("upgrade", help="create or migrate the schema to the newest revision", parents=[common])

    allow = commands.add_parser("allow", help="allow names, IP addresses or *.patterns", parents=[common])
    allow.add_argument("names", nargs="+", metavar="NAME")
    allow.add_argument("--cap", metavar="N", help="for *.patterns: at most N distinct names under it are ever ordered")
    allow.add_argument("--wildcard", action="store_true",
                       help="for *.patterns: serve every name under it from one wildcard certificate (dns-01: needs --dns)")
    allow.add_argument("--dns", default=env("AUTOCERT_DNS"), metavar="PROVIDER", help="the --dns that serve and issue run with (checked with --wildcard)")
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
    serve.add_argument("--trusted-proxies", default=env("AUTOCERT_TRUSTED_PROXIES"), metavar="CIDR,...",
                       help="balancers whose connections start with a PROXY protocol v1/v2 header carrying the client's address "
                            "(required from them, refused from anyone else)")
    serve.add_argument("--alpn", default=env("AUTOCERT_ALPN"), metavar="LIST",
                       help="with a tcp:// upstream: ALPN protocols offered to clients (default http/1.1)")
    serve.add_argument("--first-contact-wait", default=env("AUTOCERT_FIRST_CONTACT_WAIT", "10"), metavar="SECONDS")
    serve.add_argument("--cache-size", default=env("AUTOCERT_CACHE_SIZE", "10000"), metavar="N")
    serve.add_argument("--default-name", default=None, metavar="NAME", help="certificate (a name or an address) for clients without SNI that connected to no allowed address")
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


async def cmd_issue(args: argparse.Namespace) -> int:
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
        https=parse_listen(args.https, option="--https"),
        http=parse_listen(args.http, option="--http"),
        admin=parse_listen(args.admin, option="--admin") if hasattr(args, "admin") else None,
    )


def challenge_types_for(options: ServeOptions, args: argparse.Namespace) -> list[str]:
    """http-01 whenever the http listener is on; tls-alpn-01 on the https listener otherwise;
    dns-01 when there is neither, or first with ``--prefer-dns`` (the manager adds it last
    whenever ``--dns`` is set)."""
    first = ["dns-01"] if args.prefer_dns else []
    if options.http is not None:
        return [*first, "http-01"]
    if options.https is not None:
        return [*first, "tls-alpn-01"]
    if args.dns:
        return ["dns-01"]
    raise ConfigError("--http none and --https none: no listener could answer ACME challenges (nor dns-01: no --dns)")


@contextlib.asynccontextmanager
async def challenge_listeners(manager: Manager, options: ServeOptions) -> AsyncIterator[None]:
    """Answer challenges while the CLI orders; defer to a running ``serve`` holding the port."""
    from ._server import listeners

    label = "http" if options.http is not None else "https"
    listen = getattr(options, label)
    if listen is None:  # dns-01 alone
        yield
        return
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
    options.trusted_proxies = parse_trusted_proxies(args.trusted_proxies)
    tcp_upstream(options)
    options.hsts = args.hsts
    options.header_timeout = parse_seconds_above_zero(args.header_timeout, option="--header-timeout")
    options.idle_timeout = parse_seconds_above_zero(args.idle_timeout, option="--idle-timeout")
    options.access_log = parse_on_off(args.access_log, option="--access-log")
    options.on_event = args.on_event
    options.webhook = check_webhook(args.webhook)
    check_admin_binding(options)
    challenge_types = challenge_types_for(options, args)
    if options.http is not None and options.https is not None:
        challenge_types.append("tls-alpn-01")
    cache_size = parse_positive_int(args.cache_size, option="--cache-size")
    default_name = normalize_name(args.default_name) if args.default_name else None
    issuers_from_args(args)  # a bad directory, trust-anchor file or EAB pair stops us before binding
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


def config_path(argv: Sequence[str]) -> str | None:
    """``--config FILE`` wherever it is on the command line, else ``$AUTOCERT_CONFIG``: read
    before the real parse, because the file sets the defaults that parse starts from."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    return known.config or env("AUTOCERT_CONFIG")


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, over the environment, over the config file, over the defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    path = config_path(argv)
    config = load_config_file(path) if path else None
    if config is not None:
        apply_config_file(parser, config, ENV_NAMES)
    args = parser.parse_args(argv)
    args.config_file = config
    return args


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
