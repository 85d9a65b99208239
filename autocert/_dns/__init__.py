"""dns-01: publishing ``_acme-challenge`` TXT records through a provider, waiting until the
zone's authoritative servers answer them, and clearing them again.

A provider is anything with ``set(fqdn, value)`` and ``clear(fqdn, value)`` (:class:`DnsProvider`);
``--dns`` names one of three (:func:`parse_provider`): a command run for each change
(``exec:``), RFC 2136 dynamic updates signed with TSIG (``rfc2136://``), or a hosted DNS
API through dns-lexicon (``lexicon:``). :class:`Dns01` is what the challenge book calls.
"""

from __future__ import annotations

from .challenge import Dns01, DnsSettings, txt_value
from .lookup import DnsLookup, parse_resolvers
from .providers import DnsError, DnsProvider, parse_provider

__all__ = [
    "Dns01",
    "DnsError",
    "DnsLookup",
    "DnsProvider",
    "DnsSettings",
    "parse_provider",
    "parse_resolvers",
    "txt_value",
]
