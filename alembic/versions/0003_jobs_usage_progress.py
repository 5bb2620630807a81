"""Job types: progress and LLM token usage on jobs; stats snapshots.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 16:30:00

Mirrors tasks_platform.history.models as of this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("percent", sa.Float(), nullable=True))
        jobs.add_column(sa.Column("progress_note", sa.String(length=500), nullable=True))
        jobs.add_column(sa.Column("run_seconds_total", sa.Float(), nullable=True))
        jobs.add_column(sa.Column("prompt_tokens", sa.Integer(), nullable=True))
        jobs.add_column(sa.Column("completion_tokens", sa.Integer(), nullable=True))

    op.create_table(
        "stats_snapshots",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stats_snapshots")),
    )
    op.create_index(op.f("ix_stats_snapshots_at"), "stats_snapshots", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_stats_snapshots_at"), table_name="stats_snapshots")
    op.drop_table("stats_snapshots")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("completion_tokens")
        jobs.drop_column("prompt_tokens")
        jobs.drop_column("run_seconds_total")
        jobs.drop_column("progress_note")
        jobs.drop_column("percent")
