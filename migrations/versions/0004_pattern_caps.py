"""A per-pattern cap on how many names under a ``*.pattern`` may be ordered.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("allowed", sa.Column("cap", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("allowed") as batch:
        batch.drop_column("cap")
