"""The provider interface, and ``--dns`` parsed into a provider.

Each provider lives in a module of its own; only the one named is imported, so the
optional dns-lexicon stays optional.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .._errors import AutocertError, ConfigError

if TYPE_CHECKING:
    from .lookup import DnsLookup


class DnsError(AutocertError):
    """A record could not be published, cleared or seen; the message is one line naming the record."""


class DnsProvider(Protocol):
    """Publishes and removes TXT records. ``fqdn`` ends with a dot; ``clear`` removes only
    ``value``, so two orders answering for one name at once do not undo each other.
    Both raise :class:`DnsError` with one line saying what went wrong."""

    async def set(self, fqdn: str, value: str) -> None: ...

    async def clear(self, fqdn: str, value: str) -> None: ...


#: How ``--dns`` values start, for the one-line refusal of anything else.
SCHEMES = "exec:COMMAND, rfc2136://KEYNAME:SECRET@HOST:PORT or lexicon:PROVIDER"


def parse_provider(spec: str, lookup: DnsLookup) -> DnsProvider:
    """The provider ``--dns`` names; ConfigError (one line naming the value) when it is unusable.
    ``lookup`` finds zones for the providers that need them."""
    text = spec.strip()
    if text.startswith("exec:") and text[5:].strip():
        from .command import CommandProvider

        return CommandProvider(text[5:].strip())
    if text.lower().startswith("rfc2136://"):
        from .rfc2136 import Rfc2136Provider

        return Rfc2136Provider.from_url(text, lookup)
    if text.startswith("lexicon:") and text[8:].strip():
        from .lexicon import LexiconProvider

        return LexiconProvider(text[8:].strip(), lookup)
    raise ConfigError(f"--dns {spec!r}: expected {SCHEMES}")
