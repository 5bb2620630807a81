"""Durable intake: the outbox of jobs accepted in the caller's transaction.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 10:00:00

Mirrors tasks_platform.history.models.OutboxMessage. Pending rows (``published_at`` NULL) are
found through ``ix_outbox_published_at_created_at``. The relay is woken on PostgreSQL by the
``NOTIFY`` the submitting transaction sends (delivered only when it commits), so no trigger.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("message", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(
        op.f("ix_outbox_published_at_created_at"),
        "outbox",
        ["published_at", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_outbox_published_at_created_at"), table_name="outbox")
    op.drop_table("outbox")
