"""Index certificates.revoked_at: running servers ask every second what was revoked lately.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_certificates_revoked_at", "certificates", ["revoked_at"])


def downgrade() -> None:
    op.drop_index("ix_certificates_revoked_at", table_name="certificates")
