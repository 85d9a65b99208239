"""``lexicon:PROVIDER``: a hosted DNS API through dns-lexicon (``pip install 'autocert[lexicon]'``),
with the credentials lexicon reads from its environment variables (``LEXICON_<PROVIDER>_<OPTION>``).

lexicon is synchronous (``requests``), so each change runs in a thread off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._errors import ConfigError
from .lookup import DnsLookup
from .providers import DnsError


def lexicon_providers() -> list[str]:
    """The providers the installed lexicon knows; ConfigError when it is not installed."""
    try:
        from lexicon._private.discovery import find_providers
    except ImportError:
        raise ConfigError(
            "--dns lexicon:...: dns-lexicon is not installed; install it with: pip install 'autocert[lexicon]'"
        ) from None
    return sorted(find_providers())


class LexiconProvider:
    """Creates and deletes the TXT record in the zone found by SOA lookup (not lexicon's guess
    from the public suffix list, which misses delegated subzones)."""

    def __init__(self, provider: str, lookup: DnsLookup) -> None:
        if provider not in lexicon_providers():
            raise ConfigError(
                f"--dns lexicon:{provider}: lexicon has no provider {provider!r} (see `lexicon --help`)"
            )
        self.provider = provider
        self._lookup = lookup

    def config(self, action: str, zone: str, fqdn: str, value: str) -> dict[str, Any]:
        """lexicon's settings for one change; the provider's own options come from the environment."""
        domain = zone.rstrip(".")
        return {
            "provider_name": self.provider,
            "action": action,
            "domain": domain,
            "delegated": domain,
            "type": "TXT",
            "name": fqdn.rstrip("."),
            "content": value,
            "ttl": 60,
        }

    async def set(self, fqdn: str, value: str) -> None:
        await self._change("create", fqdn, value)

    async def clear(self, fqdn: str, value: str) -> None:
        await self._change("delete", fqdn, value)

    async def _change(self, action: str, fqdn: str, value: str) -> None:
        config = self.config(action, await self._lookup.zone_for(fqdn), fqdn, value)
        try:
            await asyncio.to_thread(_execute, config)
        except Exception as exc:  # noqa: BLE001 -- lexicon and its providers raise anything (requests, boto, their own)
            detail = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DnsError(
                f"lexicon {self.provider}: {action} the TXT record {fqdn} failed: {detail}"
            ) from None


def _execute(config: dict[str, Any]) -> None:
    from lexicon.client import Client
    from lexicon.config import ConfigResolver

    resolved = ConfigResolver().with_env().with_dict(config)
    with Client(resolved) as operations:
        if config["action"] == "create":
            operations.create_record("TXT", config["name"], config["content"])
        else:
            operations.delete_record(None, "TXT", config["name"], config["content"])
