"""Challenge types the client does not know are ignored: CAs add new ones (``dns-persist-01``)
to the authorizations they already hand out, and issuance must go on with the types we answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_renewal import running_manager

from autocert._acme.client import _choose_challenge
from autocert._errors import AcmeError

UNKNOWN = [
    {"type": "dns-persist-01", "url": "https://ca.example/chall/1", "status": "pending", "issuer-domain-names": ["ca.example"]},
    {"type": "future-01", "url": "https://ca.example/chall/2", "status": "pending", "token": 7, "extra": {"nested": [1, 2]}},
    {"type": ["not", "a", "string"], "status": "pending"},
    "not even an object",
]


async def test_issuance_succeeds_when_the_ca_adds_unknown_challenge_types(pebble, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ari_double import AriDouble

    with AriDouble(pebble, extra_challenges=UNKNOWN) as double:  # type: ignore[arg-type]
        async with running_manager(pebble, f"sqlite:///{tmp_path / 'types.db'}", renew=False) as manager:
            manager.worker.directory = double.directory_url
            await manager.allow("persist.example.test")
            certificate = await manager.issue("persist.example.test")
            assert certificate.name == "persist.example.test"
            assert double.authorizations_extended >= 1, "the CA did offer the unknown types"


def test_only_unknown_types_fail_naming_what_was_offered() -> None:
    authorization = {"challenges": UNKNOWN[:2]}
    with pytest.raises(AcmeError, match="offers dns-persist-01, future-01, we answer http-01"):
        _choose_challenge(authorization, ["http-01"], "persist.example.test")
    chosen = _choose_challenge({"challenges": [*UNKNOWN, {"type": "http-01", "url": "u", "token": "t"}]}, ["http-01"], "n")
    assert chosen["type"] == "http-01"
