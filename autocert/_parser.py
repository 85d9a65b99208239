"""The ``autocert`` command line's options: the parser, their environment variables and the
config file under them (:mod:`autocert._config_file`), in the order command line, environment,
file, default. Checking the values is left to :mod:`autocert._config` and the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._config import parse_bool_env
from ._config_file import apply_config_file, load_config_file
from ._issuers import DIRECTORY_ENV
from ._version import __version__

__all__ = ["ENV_NAMES", "REVOCATION_REASONS", "build_parser", "config_path", "env", "env_flag", "parse_arguments"]

#: The environment variables options are read from, recorded as the parser is built (plus
#: those read later: the database, and the listeners, whose variables hold comma-separated
#: lists): a config file's value for the same option gives way to them.
ENV_NAMES: set[str] = {"AUTOCERT_DB", "AUTOCERT_HTTP", "AUTOCERT_HTTPS"}


def env(name: str, default: str | None = None) -> str | None:
    ENV_NAMES.add(name)
    return os.environ.get(name) or default


def env_flag(name: str) -> bool:
    ENV_NAMES.add(name)
    return parse_bool_env(name)


class ReplacingAppend(argparse._AppendAction):
    """A repeatable option (``--https``, ``--http``, ``--directory``) whose values given replace
    the config file's list (the parser's default) instead of adding to it, as every other
    option overrides the file: several values are given on the command line or in the file,
    not in both."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        given = getattr(namespace, self.dest, None)
        items = [] if given is None or given is self.default else list(given)
        items.append(values)
        setattr(namespace, self.dest, items)


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
    acme.add_argument("--directory", action=ReplacingAppend, metavar="URL",
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
    acme.add_argument("--http", action=ReplacingAppend, metavar="HOST:PORT",
                      help="plain listener HOST:PORT, repeatable, or none (env AUTOCERT_HTTP, commas between several; "
                           "default [::]:80: IPv6 and IPv4)")
    acme.add_argument("--https", action=ReplacingAppend, metavar="HOST:PORT",
                      help="TLS listener HOST:PORT, repeatable, or none (env AUTOCERT_HTTPS, commas between several; "
                           "default [::]:443: IPv6 and IPv4)")
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
    serve.add_argument("--cache-size", default=env("AUTOCERT_CACHE_SIZE", "10000"), metavar="N",
                       help="live TLS contexts kept in memory, shared out among the workers (default 10000, ~24 KiB each)")
    serve.add_argument("--workers", default=env("AUTOCERT_WORKERS", "auto"), metavar="N|auto",
                       help="worker processes sharing the listeners; auto: one per CPU this process may run on (default)")
    serve.add_argument("--default-name", default=None, metavar="NAME", help="certificate (a name or an address) for clients without SNI that connected to no allowed address")
    serve.add_argument("--hsts", action="store_true", help="add Strict-Transport-Security to proxied responses")
    serve.add_argument("--header-timeout", default=env("AUTOCERT_HEADER_TIMEOUT", "30"), metavar="SECONDS",
                       help="a client must send each request head within SECONDS (the first one from the handshake)")
    serve.add_argument("--idle-timeout", default=env("AUTOCERT_IDLE_TIMEOUT", "75"), metavar="SECONDS",
                       help="close a kept-alive connection after SECONDS without a request (pass-through: without a byte)")
    serve.add_argument("--access-log", default=env("AUTOCERT_ACCESS_LOG", "on"), metavar="on|off",
                       help="one log line per HTTPS request (default on)")
    serve.add_argument("--host-check", default=env("AUTOCERT_HOST_CHECK", "on"), metavar="on|off",
                       help="answer 421 to a request whose Host is not the name its TLS connection was made for (default on)")
    serve.add_argument("--log-format", choices=("text", "json"), default=env("AUTOCERT_LOG_FORMAT", "text"))
    serve.add_argument("--on-event", default=env("AUTOCERT_ON_EVENT"), metavar="CMD",
                       help="run CMD (a shell command; event JSON on stdin) on issued, renewed, failed, expiring, expired")
    serve.add_argument("--webhook", default=env("AUTOCERT_WEBHOOK"), metavar="URL", help="POST each such event as JSON to URL")
    return parser



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
