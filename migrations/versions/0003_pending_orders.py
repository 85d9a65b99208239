"""Keep each name's order in progress and its key, so an interrupted order is resumed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("name_states", sa.Column("order_url", sa.Text(), nullable=True))
    op.add_column("name_states", sa.Column("order_directory", sa.Text(), nullable=True))
    op.add_column("name_states", sa.Column("order_key_pem", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("name_states") as batch:
        batch.drop_column("order_key_pem")
        batch.drop_column("order_directory")
        batch.drop_column("order_url")
