"""Finding where a TXT record goes and when the world can see it: the zone (SOA), the
``_acme-challenge`` CNAME chain, the zone's authoritative servers (NS) and what each answers.

By default the system resolver finds zones and servers, and every authoritative server of the
zone is asked directly, as CertMagic and lego do: the CA asks one of them, so a record counts
as published only when all of them answer it. With resolvers given (``--dns-resolver``,
split-horizon setups and tests) those servers do both jobs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .._errors import ConfigError
from .providers import DnsError

Server = tuple[str, int]

#: Seconds one query may take before that server counts as not answering this round.
QUERY_TIMEOUT = 3.0

#: CNAMEs followed from ``_acme-challenge.NAME`` before giving up on the chain.
MAX_CNAMES = 8


def parse_resolvers(values: Sequence[str]) -> tuple[Server, ...]:
    """``--dns-resolver`` values (each ``HOST:PORT``, ``HOST`` for port 53, or a comma list)."""
    servers: list[Server] = []
    for value in values:
        for part in value.split(","):
            text = part.strip()
            if not text:
                continue
            if text.startswith("["):  # [IPv6] or [IPv6]:PORT
                host, _, rest = text[1:].partition("]")
                port = rest[1:] if rest.startswith(":") else rest or "53"
            elif text.count(":") == 1:
                host, _, port = text.partition(":")
            else:  # IPv4 alone, or IPv6 alone
                host, port = text, "53"
            if not port.isdigit() or not 0 < int(port) < 65536 or not _is_address(host):
                raise ConfigError(
                    f"--dns-resolver {value!r}: expected IP:PORT (or [IPv6]:PORT), comma-separated"
                )
            servers.append((host, int(port)))
    return tuple(servers)


def _is_address(host: str) -> bool:
    try:
        dns.inet.af_for_address(host)
    except ValueError:
        return False
    return True


class DnsLookup:
    """DNS questions asked on behalf of dns-01; ``resolvers`` empty means the system's."""

    def __init__(self, resolvers: Sequence[Server] = ()) -> None:
        self.resolvers = tuple(resolvers)

    def _resolver(self) -> dns.asyncresolver.Resolver:
        if not self.resolvers:
            return dns.asyncresolver.Resolver()
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in self.resolvers
        ]
        resolver.lifetime = QUERY_TIMEOUT * 2
        return resolver

    async def zone_for(self, fqdn: str) -> str:
        """The zone ``fqdn`` belongs to (the closest SOA), with its trailing dot."""
        try:
            zone = await dns.asyncresolver.zone_for_name(
                fqdn, resolver=self._resolver()
            )
        except dns.exception.DNSException as exc:
            raise DnsError(
                f"no zone found for {fqdn} (SOA lookup): {_short(exc)}"
            ) from None
        return str(zone.to_text())

    async def target(self, fqdn: str) -> str:
        """Where ``fqdn``'s TXT record must be published: the end of its CNAME chain (a
        delegated ``_acme-challenge``), or ``fqdn`` itself."""
        resolver, name, seen = self._resolver(), fqdn, {fqdn}
        for _ in range(MAX_CNAMES):
            try:
                answer = await resolver.resolve(name, "CNAME", raise_on_no_answer=False)
            except dns.exception.DNSException:
                return name  # NXDOMAIN, no answer, unreachable: no delegation to follow
            if answer.rrset is None:
                return name
            name = str(answer.rrset[0].target.to_text())
            if name in seen:
                raise DnsError(f"the CNAME chain from {fqdn} loops at {name}")
            seen.add(name)
        raise DnsError(f"the CNAME chain from {fqdn} is longer than {MAX_CNAMES}")

    async def authoritative(self, fqdn: str) -> list[Server]:
        """The servers whose answers count for ``fqdn``: the given resolvers, else every
        address of every NS of its zone."""
        if self.resolvers:
            return list(self.resolvers)
        zone = await self.zone_for(fqdn)
        resolver = self._resolver()
        try:
            names = [str(ns.target) for ns in await resolver.resolve(zone, "NS")]
        except dns.exception.DNSException as exc:
            raise DnsError(f"no name servers found for {zone}: {_short(exc)}") from None
        servers: list[Server] = []
        for ns in names:
            for rdtype in ("A", "AAAA"):
                try:
                    servers.extend(
                        (str(a.address), 53) for a in await resolver.resolve(ns, rdtype)
                    )
                except dns.exception.DNSException:
                    continue
        if not servers:
            raise DnsError(
                f"no address found for the name servers of {zone} ({', '.join(names)})"
            )
        return servers

    async def txt_at(self, fqdn: str, server: Server) -> set[str]:
        """The TXT strings ``server`` answers for ``fqdn`` now (empty when it has none or fails)."""
        query = dns.message.make_query(fqdn, dns.rdatatype.TXT)
        host, port = server
        try:
            response = await dns.asyncquery.udp(
                query, host, port=port, timeout=QUERY_TIMEOUT
            )
            if response.flags & dns.flags.TC:
                response = await dns.asyncquery.tcp(
                    query, host, port=port, timeout=QUERY_TIMEOUT
                )
        except (dns.exception.DNSException, OSError):
            return set()
        return {
            b"".join(rdata.strings).decode(errors="replace")
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.TXT
            and rrset.name == query.question[0].name
            for rdata in rrset
        }

    async def wait_visible(
        self, fqdn: str, value: str, *, timeout: float, interval: float = 2.0
    ) -> None:
        """Return once every authoritative server answers ``value`` for ``fqdn``; DnsError
        (naming the record and a server that lacks it) when ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        servers = await self.authoritative(fqdn)
        while True:
            answers = await asyncio.gather(
                *(self.txt_at(fqdn, server) for server in servers)
            )
            missing = [
                server
                for server, values in zip(servers, answers)
                if value not in values
            ]
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                host, port = missing[0]
                raise DnsError(
                    f"the TXT record {fqdn} was not visible at {host}:{port} "
                    f"({len(missing)} of {len(servers)} servers lack it) within {timeout:g} s"
                )
            await asyncio.sleep(min(interval, left))


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
