"""Partial indexes over unrevoked certificates: finding each name's current certificate and the
soonest renewal or renewal-information fetch without scanning every row, which the scheduler
and the expiry watch do often.
The index on revoked_at becomes partial too (revoked rows only): SQLite's planner otherwise
picks it for ``revoked_at IS NULL``, which matches nearly every row.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNREVOKED = sa.text("revoked_at IS NULL")
REVOKED = sa.text("revoked_at IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_certificates_revoked_at", table_name="certificates")
    op.create_index("ix_certificates_revoked_at", "certificates", ["revoked_at"], sqlite_where=REVOKED, postgresql_where=REVOKED)
    op.create_index("ix_certificates_current", "certificates", ["name", "not_after", "id"],
                    sqlite_where=UNREVOKED, postgresql_where=UNREVOKED)
    op.create_index("ix_certificates_renew_at", "certificates", ["renew_at"], sqlite_where=UNREVOKED, postgresql_where=UNREVOKED)
    op.create_index("ix_certificates_ari_next_check_at", "certificates", ["ari_next_check_at"],
                    sqlite_where=UNREVOKED, postgresql_where=UNREVOKED)


def downgrade() -> None:
    op.drop_index("ix_certificates_ari_next_check_at", table_name="certificates")
    op.drop_index("ix_certificates_renew_at", table_name="certificates")
    op.drop_index("ix_certificates_current", table_name="certificates")
    op.drop_index("ix_certificates_revoked_at", table_name="certificates")
    op.create_index("ix_certificates_revoked_at", "certificates", ["revoked_at"])
