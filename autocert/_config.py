"""Settings shared by the CLI, the server and embedders, with their defaults and parsing.

Every option of the contract lives here once: its default, its environment variable and how
its text is checked, so that ``serve``, ``issue`` and the ``Manager`` never disagree.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import urllib.parse
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from ._errors import ConfigError

_Number = TypeVar("_Number", int, float)

LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"


def autocert_home() -> Path:
    """Where the default SQLite database lives (``$AUTOCERT_HOME``, else XDG data home)."""
    home = os.environ.get("AUTOCERT_HOME")
    if home:
        return Path(home).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "autocert"


def default_db_url() -> str:
    return f"sqlite:///{autocert_home() / 'autocert.db'}"


@dataclass(frozen=True)
class Listen:
    """A ``HOST:PORT`` address: a listener (``None`` stands for a disabled one), or the
    upstream of ``--upstream tcp://HOST:PORT``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(value: str, *, option: str) -> Listen | None:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) or ``none``."""
    text = value.strip()
    if text.lower() == "none":
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"{option} {value!r}: expected HOST:PORT or 'none'")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option} {value!r}: port must be between 0 and 65535")
    host = host.strip("[]") or "0.0.0.0"
    return Listen(host, port)


def parse_bool_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _parse_number(value: str, option: str, kind: type[_Number], expected: str, minimum: _Number, below: str) -> _Number:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{option} {value!r}: expected {expected}") from None
    if number < minimum:
        raise ConfigError(f"{option} {value!r}: {below}")
    return number


def parse_positive_float(value: str, *, option: str) -> float:
    """Seconds: any number from zero up."""
    return _parse_number(value, option, float, "a number of seconds", 0.0, "must not be negative")


def parse_seconds_above_zero(value: str, *, option: str) -> float:
    """A bound in seconds: any number above zero."""
    seconds = parse_positive_float(value, option=option)
    if seconds == 0:
        raise ConfigError(f"{option} {value!r}: must be more than 0")
    return seconds


def parse_on_off(value: str, *, option: str) -> bool:
    """``on`` or ``off`` (``true``/``false``, ``yes``/``no``, ``1``/``0`` too)."""
    text = value.strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"{option} {value!r}: expected on or off")


def parse_positive_int(value: str, *, option: str, maximum: int | None = None) -> int:
    """A count: a whole number from one up (to ``maximum``)."""
    number = _parse_number(value, option, int, "a whole number", 1, "must be at least 1")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{option} {value!r}: must be at most {maximum}")
    return number


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_order_limit(value: str, *, option: str = "--order-limit") -> tuple[int, timedelta] | None:
    """``N/DURATION`` (``300/3h``; units s, m, h, d) as (orders, window), or None for ``none``."""
    text = value.strip().lower()
    if text == "none":
        return None
    count, sep, duration = text.partition("/")
    unit = _DURATION_UNITS.get(duration[-1:]) if duration else None
    amount = duration[:-1]
    if not sep or unit is None or not amount.replace(".", "", 1).isdigit():
        raise ConfigError(f"{option} {value!r}: expected N/DURATION such as 300/3h, or 'none'")
    orders = parse_positive_int(count, option=option)
    window = timedelta(seconds=float(amount) * unit)
    if window <= timedelta(0):
        raise ConfigError(f"{option} {value!r}: the duration must be longer than zero")
    return orders, window


def check_ca_bundle(path: str | None) -> str | None:
    """A trust-anchor file must exist and be readable before any ACME request is attempted."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--ca-bundle {path!r}: no such file")
    return path


@dataclass(frozen=True)
class ExternalAccount:
    """External Account Binding: the key id and MAC key (base64url, as CAs hand it out) a CA
    that requires it gave for binding our ACME account to a customer account."""

    kid: str
    hmac_key: str

    def __repr__(self) -> str:
        return f"ExternalAccount(kid={self.kid!r}, hmac_key=...)"  # the key never reaches a log


def parse_external_account(kid: str | None, hmac_key: str | None) -> ExternalAccount | None:
    """``--eab-kid`` and ``--eab-hmac-key``: both or neither; the key must be base64url."""
    if not kid and not hmac_key:
        return None
    if not kid or not hmac_key:
        given, missing = ("--eab-kid", "--eab-hmac-key") if kid else ("--eab-hmac-key", "--eab-kid")
        raise ConfigError(f"{given} needs {missing} as well: External Account Binding takes both the key id and the MAC key")
    text = hmac_key.strip()
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        decoded = b""
    if not decoded or not all(c.isalnum() or c in "-_=" for c in text):
        raise ConfigError("--eab-hmac-key: not a base64url key (use the MAC key exactly as the CA gave it)")
    return ExternalAccount(kid.strip(), text.rstrip("="))


@dataclass
class ServeOptions:
    """What ``autocert serve`` runs with, one field per option of the contract.

    Each field says its default and what goes wrong when it is set badly.
    """

    #: The TLS listener (SNI routing, tls-alpn-01); None disables it. CLI default
    #: ``0.0.0.0:443``. Without it nothing is served over HTTPS and tls-alpn-01 cannot be answered.
    https: Listen | None
    #: The plain HTTP listener: http-01 answers, everything else 308 to https. CLI default
    #: ``0.0.0.0:80``. Without it (and without another server on the same database holding
    #: port 80) http-01 validation fails.
    http: Listen | None
    #: The admin listener (status page, JSON, metrics, health). CLI default ``127.0.0.1:8081``.
    #: It shows every name and its errors: beyond loopback it is refused without ``admin_token``.
    admin: Listen | None
    #: Bearer token every admin request must carry. Default None (loopback only, no token).
    #: Anyone holding it reads the status of every name.
    admin_token: str | None = None
    #: URL of the web app every TLS request is proxied to. Default None: TLS clients get a
    #: one-line confirmation page. A wrong URL shows clients a 502 page, never the address.
    upstream: str | None = None
    #: Seconds a first handshake for an allowed name waits while its certificate is issued.
    #: Default 10. Clients give up after their own timeout (often 10-30 s), so much longer
    #: only holds connections open; shorter turns slow CAs into refused first contacts.
    first_contact_wait: float = 10.0
    #: Add ``Strict-Transport-Security: max-age=31536000`` to responses that lack it. Default
    #: off. Once a browser has seen it, the name must keep working over HTTPS for a year.
    hsts: bool = False
    #: Seconds a new connection may take to send its whole ClientHello before it is dropped.
    #: Default 5. Longer lets idle connections hold sockets; far shorter drops slow clients.
    hello_timeout: float = 5.0
    #: Seconds the TLS handshake may take once it starts. Default 10.
    handshake_timeout: float = 10.0
    #: Seconds a client has to send a complete request head: the first one after the
    #: handshake, and each later one from its first byte. Default 30. Longer lets slow-header
    #: clients hold connections; far shorter cuts off clients on slow links.
    header_timeout: float = 30.0
    #: Seconds a kept-alive connection may wait for its next request before it is closed, and
    #: in pass-through mode (``tcp://``) seconds a connection may pass no bytes either way.
    #: Default 75 (nginx's). WebSockets and responses still streaming are never cut by it;
    #: long-lived quiet pass-through connections (a database pool) need more, or keepalives.
    idle_timeout: float = 75.0
    #: One line per answered request on the https listener (``autocert.access`` logger).
    #: Default on. Off saves a few microseconds of CPU per request.
    access_log: bool = True
    #: How long in-flight requests (a slow page, a proxied download) may run on after
    #: SIGTERM; idle connections close at once, so an idle server still stops immediately.
    #: Default 30. A supervisor that kills sooner cuts those requests off.
    shutdown_timeout: float = 30.0
    #: With a ``tcp://`` upstream, the PROXY protocol version (1 or 2) whose header starts
    #: every upstream connection. Default None: the decrypted bytes only. An upstream that
    #: does not expect the header reads it as garbage; one that does and gets none is confused.
    proxy_protocol: int | None = None
    #: With a ``tcp://`` upstream, the ALPN protocols offered to clients, in order of
    #: preference. Default None, meaning ``http/1.1``. The contexts are the manager's: the
    #: CLI hands this to ``Manager(alpn=...)``, and an embedder must do the same. A protocol
    #: the upstream does not speak (``h2`` to an HTTP/1.1 app) breaks every client that picks it.
    alpn: tuple[str, ...] | None = None
    #: Balancers whose connections start with a PROXY protocol header (v1 or v2) carrying the
    #: client's address, on the https and http listeners. Default none. From these addresses
    #: the header is required; from any other a header is refused, so that clients cannot
    #: claim another address. A balancer left out gets its connections dropped.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Shell command run with each notified event's JSON on stdin. Default None. It runs
    #: with the server's privileges: it must be trusted.
    on_event: str | None = None
    #: URL each notified event is POSTed to as JSON. Default None. Events name the failing
    #: domains and their errors: send them only to an endpoint you control.
    webhook: str | None = None


#: How ``--upstream`` names a pass-through upstream.
TCP_SCHEME = "tcp://"

#: Offered to clients only by the certificates tls-alpn-01 validation gets (RFC 8737).
_RESERVED_ALPN = "acme-tls/1"


def parse_proxy_protocol(value: str | None) -> int | None:
    """``--proxy-protocol``: ``v1`` or ``v2`` (``none`` or empty: no header)."""
    text = (value or "").strip().lower()
    if text in ("", "none"):
        return None
    if text in ("v1", "v2"):
        return int(text[1])
    raise ConfigError(f"--proxy-protocol {value!r}: expected v1 or v2")


def parse_trusted_proxies(value: str | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``--trusted-proxies``: addresses or networks separated by commas, e.g. ``10.0.0.0/8,::1``."""
    networks = []
    for part in (value or "").split(","):
        if not part.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"--trusted-proxies {value!r}: {part.strip()!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def parse_alpn(value: str | None) -> tuple[str, ...] | None:
    """``--alpn``: a comma-separated list of protocol names, e.g. ``h2,http/1.1``."""
    if value is None:
        return None
    protocols = tuple(part.strip() for part in value.split(","))
    for protocol in protocols:
        if not protocol or not protocol.isascii() or not protocol.isprintable() or len(protocol) > 255:
            raise ConfigError(f"--alpn {value!r}: expected protocol names separated by commas, such as h2,http/1.1")
        if protocol == _RESERVED_ALPN:
            raise ConfigError(f"--alpn {value!r}: {_RESERVED_ALPN} is reserved for tls-alpn-01 validation")
    return protocols


def tcp_upstream(options: ServeOptions) -> Listen | None:
    """The address of a ``tcp://HOST:PORT`` upstream (pass-through mode), else None.

    Raises ``ConfigError`` for a malformed ``tcp://`` URL, and for the pass-through options
    (``proxy_protocol``, ``alpn``) without a ``tcp://`` upstream to apply them to.
    """
    upstream = options.upstream or ""
    if not upstream.lower().startswith(TCP_SCHEME):
        for option, value in (("--proxy-protocol", options.proxy_protocol), ("--alpn", options.alpn)):
            if value is not None:
                raise ConfigError(f"{option} applies only to a pass-through upstream (--upstream tcp://HOST:PORT)")
        return None
    expected = f"--upstream {upstream!r}: expected tcp://HOST:PORT (IPv6 as tcp://[ADDRESS]:PORT)"
    try:
        url = urllib.parse.urlsplit(upstream)
        port = url.port
    except ValueError:
        raise ConfigError(expected) from None
    if not url.hostname or not port or url.username is not None or url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigError(expected)
    return Listen(url.hostname, port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_admin_binding(options: ServeOptions) -> None:
    if options.admin is not None and not is_loopback(options.admin.host) and not options.admin_token:
        raise ConfigError(f"--admin {options.admin}: refusing to expose the admin listener beyond loopback without --admin-token")


class ListenError(ConfigError):
    """A listener could not bind; ``errno`` tells a busy port from a forbidden one."""

    def __init__(self, listen: Listen, error: OSError) -> None:
        self.errno = error.errno
        super().__init__(f"cannot listen on {listen}: {error.strerror or error}")


def listening_socket(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        sock = socket.create_server((listen.host, listen.port), family=family, backlog=1024, reuse_port=False)
    except OSError as exc:
        raise ListenError(listen, exc) from None
    sock.setblocking(False)
    return sock


#: The order listeners are bound and reported in.
LISTENER_LABELS = ("https", "http", "admin")


def bind_listeners(options: ServeOptions) -> dict[str, socket.socket]:
    """Bind every configured listener, or none: a port that is busy closes the others."""
    bound: dict[str, socket.socket] = {}
    try:
        for label in LISTENER_LABELS:
            listen = getattr(options, label)
            if listen is not None:
                bound[label] = listening_socket(listen)
    except ListenError:
        for sock in bound.values():
            sock.close()
        raise
    return bound
