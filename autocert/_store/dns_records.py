"""dns-01 TXT records published and not yet cleared: the note that lets a restart clear what a
process killed mid-order left in the zone."""

from __future__ import annotations

from sqlalchemy import delete, insert, select

from .._timefmt import utcnow
from .engine import StoreBase
from .records import DnsRecord, _dns_records


class DnsRecordsMixin(StoreBase):
    """Written before a record is published and deleted once it is cleared."""

    async def add_dns_record(self, fqdn: str, value: str, owner: str) -> int:
        """Note a record about to be published; returns its id for :meth:`delete_dns_record`."""
        stmt = (
            insert(_dns_records)
            .values(fqdn=fqdn, value=value, owner=owner, created_at=utcnow())
            .returning(_dns_records.c.id)
        )
        async with self._writing() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def delete_dns_record(self, record_id: int) -> None:
        async with self._writing() as session:
            await session.execute(
                delete(_dns_records).where(_dns_records.c.id == record_id)
            )

    async def dns_records(self) -> list[DnsRecord]:
        """Every record not cleared yet, oldest first."""
        async with self._reading() as session:
            rows = (
                await session.execute(select(_dns_records).order_by(_dns_records.c.id))
            ).all()
        return [
            DnsRecord(row.id, row.fqdn, row.value, row.owner, row.created_at)
            for row in rows
        ]
