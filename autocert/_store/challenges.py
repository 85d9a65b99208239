"""Pending challenge answers (http-01 by token, tls-alpn-01 by name), shared so that any
instance behind a name can serve them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select

from .._timefmt import utcnow
from .engine import StoreBase, _aware
from .records import _challenges


class ChallengesMixin(StoreBase):
    """Key authorizations by token, with the challenge type they answer."""

    async def put_challenge(self, token: str, name: str, key_authorization: str, challenge_type: str = "http-01") -> None:
        """Publish an answer so that whichever instance the CA reaches can serve it."""
        stmt = self._insert(_challenges).values(
            token=token, name=name, key_authorization=key_authorization, created_at=utcnow(), challenge_type=challenge_type
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["token"],
            set_={
                "name": stmt.excluded.name,
                "key_authorization": stmt.excluded.key_authorization,
                "created_at": stmt.excluded.created_at,
                "challenge_type": stmt.excluded.challenge_type,
            },
        )
        async with self._writing() as session:
            await session.execute(stmt)

    async def get_challenge(self, token: str) -> str | None:
        """The key authorization to answer for ``token``, if one is pending."""
        stmt = select(_challenges.c.key_authorization).where(_challenges.c.token == token, _challenges.c.challenge_type == "http-01")
        async with self._reading() as session:
            return (await session.execute(stmt)).scalar_one_or_none()

    async def tls_alpn_challenge(self, name: str) -> str | None:
        """The key authorization a tls-alpn-01 certificate for ``name`` must carry now, if one is
        pending (the newest, should an abandoned one linger)."""
        stmt = (
            select(_challenges.c.key_authorization)
            .where(_challenges.c.name == name, _challenges.c.challenge_type == "tls-alpn-01")
            .order_by(_challenges.c.created_at.desc())
            .limit(1)
        )
        async with self._reading() as session:
            return (await session.execute(stmt)).scalar_one_or_none()

    async def delete_challenge(self, token: str) -> None:
        """Withdraw an answer once its authorization is settled."""
        async with self._writing() as session:
            await session.execute(delete(_challenges).where(_challenges.c.token == token))

    async def purge_challenges(self, older_than: datetime) -> int:
        """Drop answers left behind by a crashed process; returns how many were removed."""
        stmt = (
            delete(_challenges)
            .where(_challenges.c.created_at < _aware(older_than, "older_than"))
            .returning(_challenges.c.token)
        )
        async with self._writing() as session:
            return len((await session.execute(stmt)).all())
