"""Answering one dns-01 challenge: note the record, publish it, wait until it is visible,
and clear it afterwards (and, after a crash, at the next start)."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._errors import AutocertError
from .lookup import DnsLookup
from .providers import DnsProvider

if TYPE_CHECKING:
    from .._store import DnsRecord, Store

log = logging.getLogger("autocert.dns")

#: ``--dns-timeout`` default: CertMagic and lego wait a couple of minutes for propagation too.
DEFAULT_TIMEOUT = 120.0


def txt_value(key_authorization: str) -> str:
    """The TXT record's content (RFC 8555 section 8.4): base64url of SHA-256, unpadded."""
    digest = hashlib.sha256(key_authorization.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class DnsSettings:
    """How dns-01 is answered: what ``--dns``, ``--dns-resolver`` and ``--dns-timeout`` say."""

    #: Publishes and clears the TXT records.
    provider: DnsProvider
    #: Finds zones, CNAME targets and the servers a record must be visible at.
    lookup: DnsLookup = field(default_factory=DnsLookup)
    #: Seconds to wait for a record to be visible at every authoritative server; past it the
    #: order fails instead of asking the CA to look too early (a failed validation counts
    #: against the CA's limits).
    timeout: float = DEFAULT_TIMEOUT
    #: Seconds between looks.
    interval: float = 2.0


class Dns01:
    """Publishes dns-01 answers through the provider, noting each in the database first."""

    def __init__(self, settings: DnsSettings, store: Store, owner: str) -> None:
        self.settings = settings
        self._store = store
        self._owner = owner
        #: Published records by challenge token: (database id, fqdn, value).
        self._published: dict[str, tuple[int, str, str]] = {}

    async def present(self, name: str, token: str, key_authorization: str) -> None:
        """Publish the answer for ``name`` (the authorization's identifier, without ``*.``)
        and return once every server that counts answers it."""
        lookup, value = self.settings.lookup, txt_value(key_authorization)
        fqdn = await lookup.target(f"_acme-challenge.{name}.")
        record_id = await self._store.add_dns_record(fqdn, value, self._owner)
        self._published[token] = (record_id, fqdn, value)
        await self.settings.provider.set(fqdn, value)
        await lookup.wait_visible(
            fqdn, value, timeout=self.settings.timeout, interval=self.settings.interval
        )
        log.debug("dns-01 record %s is visible for %s", fqdn, name)

    async def cleanup(self, token: str) -> None:
        published = self._published.pop(token, None)
        if published is not None:
            await self._clear(*published)

    async def clear_leftovers(self, is_leftover: Callable[[DnsRecord], bool]) -> int:
        """Clear records that processes no longer running left published; returns how many.
        One that cannot be cleared stays noted for the next start."""
        cleared = 0
        for record in await self._store.dns_records():
            if is_leftover(record):
                log.info(
                    "clearing the dns-01 record %s left by %s",
                    record.fqdn,
                    record.owner,
                )
                try:
                    await self._clear(record.id, record.fqdn, record.value)
                except (AutocertError, OSError) as exc:
                    log.warning(
                        "could not clear the dns-01 record %s: %s", record.fqdn, exc
                    )
                    continue
                cleared += 1
        return cleared

    async def _clear(self, record_id: int, fqdn: str, value: str) -> None:
        await self.settings.provider.clear(fqdn, value)
        await self._store.delete_dns_record(record_id)
