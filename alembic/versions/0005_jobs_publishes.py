"""Idempotency keys across a publish whose outcome is unknown: two columns on jobs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 10:00:00

Mirrors tasks_platform.history.models.Job as of this revision: ``publish_uncertain`` (a keyed
job whose publish may or may not have queued it) and ``delivered_by`` (the publish whose
delivery a worker ran). Neither is indexed: both are read and written by the job's id.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("publish_uncertain", sa.Boolean(), nullable=True))
        jobs.add_column(sa.Column("delivered_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("delivered_by")
        jobs.drop_column("publish_uncertain")
