"""``rfc2136://KEYNAME:SECRET@HOST:PORT?algorithm=hmac-sha256&zone=ZONE``: dynamic updates
(RFC 2136) signed with a TSIG key, sent to the zone's primary server (BIND, Knot, PowerDNS)."""

from __future__ import annotations

import base64
import binascii
import urllib.parse

import dns.asyncquery
import dns.exception
import dns.name
import dns.rcode
import dns.tsig
import dns.tsigkeyring
import dns.update

from .._errors import ConfigError
from .lookup import DnsLookup
from .providers import DnsError

#: Seconds an update may take to be answered.
UPDATE_TIMEOUT = 10.0

#: TTL of the records published: short, so a cleared record does not linger in caches.
RECORD_TTL = 60

_ALGORITHMS = {
    "hmac-md5": dns.tsig.HMAC_MD5,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}


class Rfc2136Provider:
    """Adds and deletes the one TXT value in the zone, over TCP (updates are not retried over UDP)."""

    def __init__(
        self,
        host: str,
        port: int,
        keyname: str,
        secret: bytes,
        algorithm: str,
        zone: str | None,
        lookup: DnsLookup,
    ) -> None:
        self.server = (host, port)
        self.keyname = dns.name.from_text(keyname)
        self.keyring = {
            self.keyname: dns.tsig.Key(self.keyname, secret, _ALGORITHMS[algorithm])
        }
        self.algorithm = _ALGORITHMS[algorithm]
        self.zone = zone
        self._lookup = lookup

    @classmethod
    def from_url(cls, url: str, lookup: DnsLookup) -> Rfc2136Provider:
        """The provider a ``--dns rfc2136://`` URL describes (``/`` in the secret as ``%2F``)."""
        shown = (
            "rfc2136://" + url.partition("@")[2] if "@" in url else url
        )  # the secret stays out of errors

        def bad(why: str) -> ConfigError:
            return ConfigError(
                f"--dns {shown!r}: {why}; expected rfc2136://KEYNAME:SECRET@HOST:PORT?algorithm=hmac-sha256[&zone=ZONE]"
            )

        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or 53
        except ValueError as exc:
            raise bad(str(exc)) from None
        if not parts.username or not parts.password or not parts.hostname:
            raise bad("a key name, its secret and a server are needed")
        query = urllib.parse.parse_qs(parts.query)
        unknown = set(query) - {"algorithm", "zone"}
        if unknown:
            raise bad(f"unknown parameter {min(unknown)!r}")
        algorithm = query.get("algorithm", ["hmac-sha256"])[-1].lower()
        if algorithm not in _ALGORITHMS:
            raise bad(
                f"unknown algorithm {algorithm!r} (use one of {', '.join(_ALGORITHMS)})"
            )
        try:
            secret = base64.b64decode(
                urllib.parse.unquote(parts.password), validate=True
            )
        except (binascii.Error, ValueError):
            raise bad("the secret is not base64") from None
        zone = query.get("zone", [None])[-1]
        if zone is not None:
            zone = zone.rstrip(".") + "."
        return cls(
            parts.hostname,
            port,
            urllib.parse.unquote(parts.username),
            secret,
            algorithm,
            zone,
            lookup,
        )

    async def set(self, fqdn: str, value: str) -> None:
        update = await self._update(fqdn)
        update.add(fqdn, RECORD_TTL, "TXT", _quoted(value))
        await self._send(update, "adding", fqdn)

    async def clear(self, fqdn: str, value: str) -> None:
        update = await self._update(fqdn)
        update.delete(fqdn, "TXT", _quoted(value))
        await self._send(update, "deleting", fqdn)

    async def _update(self, fqdn: str) -> dns.update.UpdateMessage:
        zone = self.zone or await self._lookup.zone_for(fqdn)
        return dns.update.UpdateMessage(
            zone,
            keyring=self.keyring,
            keyname=self.keyname,
            keyalgorithm=self.algorithm,
        )

    async def _send(
        self, update: dns.update.UpdateMessage, doing: str, fqdn: str
    ) -> None:
        host, port = self.server
        try:
            response = await dns.asyncquery.tcp(
                update, host, port=port, timeout=UPDATE_TIMEOUT
            )
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsError(
                f"{doing} the TXT record {fqdn} at {host}:{port} failed: {exc or type(exc).__name__}"
            ) from None
        if response.rcode() != dns.rcode.NOERROR:
            raise DnsError(
                f"{host}:{port} refused {doing} the TXT record {fqdn}: {dns.rcode.to_text(response.rcode())}"
            )


def _quoted(value: str) -> str:
    """A TXT value as zone-file text (ACME values are base64url: nothing needs escaping)."""
    return f'"{value}"'
