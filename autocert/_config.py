"""Settings shared by the CLI, the server and embedders, with their defaults and parsing.

Every option of the contract lives here once: its default, its environment variable and how
its text is checked, so that ``serve``, ``issue`` and the ``Manager`` never disagree.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import os
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from yarl import URL

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


#: The host of a listener given as ``:PORT``: every address, IPv6 and IPv4 alike.
ANY_HOST = "::"


def parse_listen(value: str, *, option: str) -> Listen | None:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6, ``:PORT`` for every address) or ``none``."""
    text = value.strip()
    if text.lower() == "none":
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"{option} {value!r}: expected HOST:PORT or 'none'")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option} {value!r}: port must be between 0 and 65535")
    host = host.strip("[]") or ANY_HOST
    return Listen(host, port)


def parse_listeners(values: Sequence[str], *, option: str) -> tuple[Listen, ...]:
    """Every ``HOST:PORT`` of a listener option given several times, each maybe a comma-separated
    list (how the environment variables spell several); ``none`` alone means no listener."""
    texts = [text for value in values for text in value.split(",") if text.strip()]
    listens = [parse_listen(text, option=option) for text in texts]
    if not texts or (None in listens and len(listens) > 1):
        raise ConfigError(f"{option} {','.join(values)!r}: expected HOST:PORT (given once or more) or 'none'")
    return tuple(listen for listen in listens if listen is not None)


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

    #: The TLS listeners (SNI routing, tls-alpn-01); empty disables them. CLI default
    #: ``[::]:443``, IPv6 and IPv4 alike. Without one nothing is served over HTTPS and
    #: tls-alpn-01 cannot be answered.
    https: tuple[Listen, ...]
    #: The plain HTTP listeners: http-01 answers, everything else 308 to the first https
    #: listener's port. CLI default ``[::]:80``. Without one (and without another server on
    #: the same database holding port 80) http-01 validation fails.
    http: tuple[Listen, ...]
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
    #: Answer ``421 Misdirected Request`` to a request on the TLS listener whose host (``Host``,
    #: or an absolute-form target) is not the name the connection was made for. Default on.
    #: Off lets any allowed name's connection reach every host behind the upstream: only for
    #: upstreams that route on something else and clients that rely on reusing connections.
    host_check: bool = True
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


def parse_upstream(upstream: str) -> URL:
    """Check ``--upstream`` once at startup, so a typo fails the start rather than every request."""
    try:
        url = URL(upstream)
    except (ValueError, TypeError):
        raise ConfigError(f"--upstream {upstream!r}: not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"--upstream {upstream!r}: expected http://HOST:PORT or https://HOST:PORT")
    if url.query_string or url.fragment or url.user or url.password:
        raise ConfigError(f"--upstream {upstream!r}: must not contain credentials, a query or a fragment")
    return url


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


def listening_socket(listen: Listen, *, dualstack: bool = False, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        sock = socket.create_server((listen.host, listen.port), family=family, backlog=1024, reuse_port=reuse_port,
                                    dualstack_ipv6=dualstack)
    except OSError as exc:
        raise ListenError(listen, exc) from None
    sock.setblocking(False)
    return sock


#: A kernel without IPv6 (or with it turned off) answers a bind to ``::`` with one of these.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


def listening_sockets(listen: Listen, *, reuse_port: bool = False) -> list[socket.socket]:
    """The sockets that listen on ``listen``: one, except for ``[::]`` on some systems.

    ``[::]`` means every address, IPv4 included: one dual-stack socket where the system
    allows it (Linux, whatever ``net.ipv6.bindv6only`` says), else an IPv6-only socket and an
    IPv4 one on the same port, and on a system without IPv6 the IPv4 socket alone. A specific
    address, IPv6 or IPv4, gets just that. ``reuse_port`` sets ``SO_REUSEPORT`` on each
    (the listeners of ``serve --workers``).
    """
    if listen.host != ANY_HOST:
        return [listening_socket(listen, reuse_port=reuse_port)]
    if socket.has_dualstack_ipv6():
        try:
            return [listening_socket(listen, dualstack=True, reuse_port=reuse_port)]
        except ListenError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            return [listening_socket(Listen("0.0.0.0", listen.port), reuse_port=reuse_port)]
    try:
        ipv6 = listening_socket(listen, reuse_port=reuse_port)
    except ListenError as exc:
        if exc.errno not in _NO_IPV6:
            raise
        return [listening_socket(Listen("0.0.0.0", listen.port), reuse_port=reuse_port)]
    try:
        return [ipv6, listening_socket(Listen("0.0.0.0", ipv6.getsockname()[1]), reuse_port=reuse_port)]
    except ListenError:
        ipv6.close()
        raise


#: The order listeners are bound and reported in.
LISTENER_LABELS = ("https", "http", "admin")


def configured_listeners(options: ServeOptions, label: str) -> tuple[Listen, ...]:
    """The listeners ``options`` has for ``label`` (``https``, ``http`` or ``admin``)."""
    value = getattr(options, label)
    return (value,) if isinstance(value, Listen) else tuple(value or ())


def bind_listeners(options: ServeOptions, labels: Sequence[str] = LISTENER_LABELS) -> dict[str, list[socket.socket]]:
    """Bind every configured listener of ``labels``, or none: a port that is busy closes the others."""
    bound: dict[str, list[socket.socket]] = {}
    try:
        for label in labels:
            for listen in configured_listeners(options, label):
                bound.setdefault(label, []).extend(listening_sockets(listen))
    except ListenError:
        close_sockets(bound)
        raise
    return bound


def close_sockets(sockets: dict[str, list[socket.socket]]) -> None:
    """Close what is left in ``sockets``: those no listener took over."""
    for socks in sockets.values():
        for sock in socks:
            sock.close()
        socks.clear()


#: Set in the environment of the workers a ``serve --workers`` supervisor starts.
WORKER_ENV = "AUTOCERT_WORKER"

#: The most worker processes ``--workers`` accepts.
MAX_WORKERS = 256


def parse_workers(value: str, *, option: str = "--workers") -> int:
    """``--workers``: a count, or ``auto`` for one per CPU this process may run on."""
    if value.strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    return parse_positive_int(value, option=option, maximum=MAX_WORKERS)


def bind_worker_listeners(options: ServeOptions, workers: int) -> list[dict[str, list[socket.socket]]]:
    """The listeners of ``serve --workers``, one set per worker as :func:`bind_listeners`
    gives a single ``serve``: every https and http listener (each ``--https``, both families
    of ``[::]`` where they need two sockets) is bound ``workers`` times, the sockets sharing
    its address through ``SO_REUSEPORT`` so the kernel spreads connections over the workers;
    the admin listener is bound once, in the first worker's set. All or none: a port that
    is busy closes the others.

    Each address is first bound once without ``SO_REUSEPORT``, so that a port another
    server holds, even one that set ``SO_REUSEPORT`` itself, is refused as busy rather
    than shared; port 0 becomes the port that first bind got.
    """
    bound: list[dict[str, list[socket.socket]]] = [{} for _ in range(workers)]
    try:
        for label in LISTENER_LABELS:
            for listen in configured_listeners(options, label):
                if label == "admin":
                    bound[0].setdefault(label, []).extend(listening_sockets(listen))
                    continue
                probes = listening_sockets(listen)
                port = probes[0].getsockname()[1]
                for probe in probes:
                    probe.close()
                for sockets in bound:
                    sockets.setdefault(label, []).extend(listening_sockets(Listen(listen.host, port), reuse_port=True))
    except ListenError:
        for sockets in bound:
            close_sockets(sockets)
        raise
    return bound


def ready_line(label: str, sock: socket.socket) -> str:
    """The line ``serve`` prints when a listener is ready."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = {"https": "https", "http": "http", "admin": "http"}[label]
    return f"autocert: {label} listening on {scheme}://{shown}:{port}"
