"""What several instances need to agree on: tls-alpn-01 answers in the database (so that any
instance the CA reaches can build the challenge certificate) and the places taken under
capped patterns (claimed in the transaction that checks the cap).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("challenges") as batch:
        batch.add_column(sa.Column("challenge_type", sa.String(16), nullable=False, server_default="http-01"))
        batch.create_index(batch.f("ix_challenges_name"), ["name"])
    op.create_table(
        "cap_claims",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("pattern", sa.String(255), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_cap_claims")),
    )
    op.create_index(op.f("ix_cap_claims_pattern"), "cap_claims", ["pattern"])


def downgrade() -> None:
    op.drop_index(op.f("ix_cap_claims_pattern"), table_name="cap_claims")
    op.drop_table("cap_claims")
    with op.batch_alter_table("challenges") as batch:
        batch.drop_index(batch.f("ix_challenges_name"))
        batch.drop_column("challenge_type")
