"""History: jobs and their transitions (job_events).

Revision ID: 0001
Revises:
Create Date: 2026-11-23 12:05:06

Mirrors tasks_platform.history.models as of this revision. Constraint and index names are
spelled out as the models' naming convention produces them (op.f marks them as final).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOBS_INDEXES: dict[str, list[str]] = {
    "ix_jobs_state_queued_at": ["state", "queued_at"],
    "ix_jobs_queue_queued_at": ["queue", "queued_at"],
    "ix_jobs_name_queued_at": ["name", "queued_at"],
    "ix_jobs_tenant_queued_at": ["tenant", "queued_at"],
    "ix_jobs_queued_at_id": ["queued_at", "id"],
    "ix_jobs_finished_at": ["finished_at"],
    "ix_jobs_root_id": ["root_id"],
    "ix_jobs_idempotency_key": ["idempotency_key"],
}
_JOB_EVENTS_INDEXES: dict[str, list[str]] = {
    "ix_job_events_job_id_at": ["job_id", "at"],
    "ix_job_events_at": ["at"],
}


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("queue", sa.String(length=200), nullable=True),
        sa.Column("priority", sa.String(length=16), nullable=True),
        sa.Column("tenant", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=True),
        sa.Column("args", sa.JSON(), nullable=True),
        sa.Column("kwargs", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error_type", sa.String(length=200), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
        sa.Column("dead_reason", sa.String(length=40), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("root_id", sa.String(length=64), nullable=True),
        sa.Column("group_id", sa.String(length=64), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wait_seconds", sa.Float(), nullable=True),
        sa.Column("run_seconds", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    for name, columns in _JOBS_INDEXES.items():
        op.create_index(op.f(name), "jobs", columns, unique=False)

    op.create_table(
        "job_events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_job_events_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    for name, columns in _JOB_EVENTS_INDEXES.items():
        op.create_index(op.f(name), "job_events", columns, unique=False)


def downgrade() -> None:
    for name in reversed(_JOB_EVENTS_INDEXES):
        op.drop_index(op.f(name), table_name="job_events")
    op.drop_table("job_events")
    for name in reversed(_JOBS_INDEXES):
        op.drop_index(op.f(name), table_name="jobs")
    op.drop_table("jobs")
