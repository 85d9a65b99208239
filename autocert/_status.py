"""The per-name status report behind ``autocert status --json`` and ``/status.json``.

One function builds it for both, so the CLI and the admin listener can never disagree.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from ._policy import is_allowed, lease_held, name_status
from ._store import Store
from ._timefmt import isoformat, utcnow

async def status_report(
    store: Store,
    *,
    directory: str,
    names: Sequence[str] | None = None,
    in_flight: Collection[str] = (),
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """STATUS objects (see the contract) for every known name, or for ``names``."""
    now = now or utcnow()
    allowed_entries = await store.allowed_entries()
    listed = await store.status_names(names)
    # A few queries per chunk of names, not per name: /status.json may cover thousands.
    certificates = {certificate.name: certificate for certificate in await store.current_certificates(listed)}
    states = await store.name_states(listed)
    attempts = await store.attempt_counts(listed)
    report: list[dict[str, Any]] = []
    for name in listed:
        allowed = is_allowed(name, allowed_entries)
        certificate = certificates.get(name)
        state_row = states.get(name)
        leased = state_row is not None and lease_held(state_row.lease_owner, state_row.lease_until, now)
        state = name_status(
            allowed=allowed,
            not_after=certificate.not_after if certificate is not None else None,
            ordering=leased or name in in_flight,
            failures=state_row.failures if state_row is not None else 0,
            now=now,
        )
        report.append(
            {
                "name": name,
                "state": state,
                "not_before": isoformat(certificate.not_before) if certificate else None,
                "not_after": isoformat(certificate.not_after) if certificate else None,
                "renew_at": isoformat(certificate.renew_at) if certificate else None,
                "serial": certificate.serial if certificate else None,
                "issuer": certificate.issuer if certificate else None,
                "directory": certificate.directory if certificate else directory,
                "attempts": attempts.get(name, 0),
                "last_error": state_row.last_error if state_row else None,
                "next_attempt_at": isoformat(state_row.next_attempt_at) if state_row else None,
            }
        )
    return report
