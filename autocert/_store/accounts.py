"""ACME accounts: one per directory URL, whose key is the account's identity at the CA."""

from __future__ import annotations

from sqlalchemy import select, update

from .._timefmt import utcnow
from .engine import StoreBase, _as_bytes
from .records import Account, _account, _accounts


class AccountsMixin(StoreBase):
    """The ACME account of each directory; a stored key is never replaced."""

    async def get_account(self, directory: str) -> Account | None:
        """The account registered for an ACME directory URL, if any."""
        async with self._reading() as session:
            row = (await session.execute(select(_accounts).where(_accounts.c.directory == directory))).first()
        return self._unsealed(_account(row)) if row is not None else None

    async def save_account(
        self, directory: str, key_pem: bytes, url: str | None = None, contact: str | None = None
    ) -> Account:
        """Insert the account, or update ``url``/``contact`` of the stored one; returns the stored row.

        An existing key is never replaced: an account key is the account, and losing it
        orphans every order made with it. When a row for ``directory`` already holds a
        different key (another process won a race to create it), that row is returned
        unchanged and the caller must use its key. To update an existing account, pass the
        ``key_pem`` exactly as :meth:`get_account` returned it. A ``url`` of None keeps a
        stored URL; ``contact`` is stored as given.
        """
        key = _as_bytes(key_pem)
        # Sealed keys differ byte-wise each time they are sealed, so the stored key is
        # compared after unsealing rather than in SQL.
        async with self._writing() as session:
            existing = (await session.execute(select(_accounts).where(_accounts.c.directory == directory))).first()
            if existing is None:
                stmt = self._insert(_accounts).values(
                    directory=directory, key_pem=self._sealer.seal(key), url=url, contact=contact, created_at=utcnow()
                )
                await session.execute(stmt.on_conflict_do_nothing(index_elements=["directory"]))
            elif self._sealer.unseal(bytes(existing.key_pem)) == key:
                await session.execute(
                    update(_accounts)
                    .where(_accounts.c.directory == directory)
                    .values(url=url if url is not None else existing.url, contact=contact)
                )
            row = (await session.execute(select(_accounts).where(_accounts.c.directory == directory))).one()
        return self._unsealed(_account(row))
