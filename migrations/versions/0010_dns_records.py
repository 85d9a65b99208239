"""Wildcard patterns (served from one wildcard certificate ordered with dns-01) and the dns-01
TXT records published but not yet cleared, so that a restart clears what a killed process left.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "allowed",
        sa.Column(
            "wildcard", sa.Boolean(), nullable=False, server_default=sa.text("false")
        ),
    )
    op.create_table(
        "dns_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fqdn", sa.String(length=255), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dns_records")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("dns_records")
    with op.batch_alter_table("allowed") as batch:
        batch.drop_column("wildcard")
