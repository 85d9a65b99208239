"""Initial schema: allowlist, accounts, certificates, attempts, name states, challenges.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Written out in full rather than importing autocert._models, so that this revision keeps
creating exactly this schema however the models change later. Timestamps are
``timestamptz`` on PostgreSQL and text on SQLite; the models' UTCDateTime type makes both
read back as aware UTC datetimes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("directory", sa.String(length=1024), nullable=False),
        sa.Column("key_pem", sa.LargeBinary(), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("contact", sa.Text(), nullable=True),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("directory", name=op.f("uq_accounts_directory")),
    )
    op.create_table(
        "allowed",
        sa.Column("entry", sa.String(length=255), nullable=False),
        _timestamp("added_at"),
        sa.PrimaryKeyConstraint("entry", name=op.f("pk_allowed")),
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("directory", sa.String(length=1024), nullable=False),
        _timestamp("started_at"),
        _timestamp("finished_at", nullable=True),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("problem_type", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attempts")),
    )
    op.create_index(op.f("ix_attempts_name"), "attempts", ["name"], unique=False)
    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("names", sa.JSON(), nullable=False),
        sa.Column("key_pem", sa.LargeBinary(), nullable=False),
        sa.Column("chain_pem", sa.LargeBinary(), nullable=False),
        sa.Column("serial", sa.String(length=128), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        _timestamp("not_before"),
        _timestamp("not_after"),
        _timestamp("renew_at"),
        sa.Column("directory", sa.String(length=1024), nullable=False),
        sa.Column("order_url", sa.Text(), nullable=True),
        sa.Column("profile", sa.String(length=255), nullable=True),
        _timestamp("created_at"),
        _timestamp("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificates")),
        # Ids must never be reused: servers poll for rows newer than the last id they saw.
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_certificates_name"), "certificates", ["name"], unique=False)
    op.create_table(
        "challenges",
        sa.Column("token", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("key_authorization", sa.Text(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_challenges")),
    )
    op.create_table(
        "name_states",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        _timestamp("next_attempt_at", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        _timestamp("lease_until", nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_name_states")),
    )


def downgrade() -> None:
    op.drop_table("name_states")
    op.drop_table("challenges")
    op.drop_index(op.f("ix_certificates_name"), table_name="certificates")
    op.drop_table("certificates")
    op.drop_index(op.f("ix_attempts_name"), table_name="attempts")
    op.drop_table("attempts")
    op.drop_table("allowed")
    op.drop_table("accounts")
