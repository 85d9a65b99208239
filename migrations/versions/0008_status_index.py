"""The status index: one row per known name with what the status page and ``/status.json``
filter, sort and count on, so that they read a page of names instead of every row of every
table; and an index on the order leases, for the names being ordered right now.

The new table is filled from the existing rows by the store in the same transaction, right
after this migration (``Store.rebuild_names``): one of its columns comes from the expiry rule in
``autocert._policy``, which a migration script should not import.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_TIME = sa.DateTime(timezone=True)


def _partial(condition: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


def upgrade() -> None:
    op.create_index("ix_name_states_lease_until", "name_states", ["lease_until"], **_partial("lease_owner IS NOT NULL"))
    op.create_table(
        "names",
        sa.Column("name", sa.String(255).with_variant(sa.String(255, collation="C"), "postgresql"), nullable=False),
        sa.Column("listed", sa.Boolean(), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("certificate_id", sa.Integer(), nullable=True),
        sa.Column("not_before", UTC_TIME, nullable=True),
        sa.Column("not_after", UTC_TIME, nullable=True),
        sa.Column("renew_at", UTC_TIME, nullable=True),
        sa.Column("issuer", sa.Text(), nullable=True),
        sa.Column("serial", sa.String(128), nullable=True),
        sa.Column("directory", sa.String(1024), nullable=True),
        sa.Column("soon_at", UTC_TIME, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", UTC_TIME, nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_names")),
    )
    for column in ("not_after", "renew_at", "next_attempt_at", "attempts", "issuer"):
        op.create_index(f"ix_names_{column}", "names", [column, "name"])
    op.create_index("ix_names_soon_at", "names", ["soon_at"])
    op.create_index("ix_names_uncertified", "names", ["failures", "name"], **_partial("not_after IS NULL"))
    op.create_index("ix_names_failing", "names", ["name"], **_partial("failures > 0"))
    op.create_index("ix_names_disallowed", "names", ["name"], sqlite_where=sa.text("allowed = 0"), postgresql_where=sa.text("NOT allowed"))


def downgrade() -> None:
    op.drop_table("names")
    op.drop_index("ix_name_states_lease_until", table_name="name_states")
