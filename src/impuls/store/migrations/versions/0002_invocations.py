"""invocations table

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "invocations",
        sa.Column("request_id", sa.String(36), primary_key=True),
        sa.Column("function_name", sa.String(64), nullable=False),
        sa.Column("function_id", sa.String(36), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error_type", sa.String(128), nullable=True),
        sa.Column("cold_start", sa.Boolean, nullable=False),
        sa.Column("sandbox", sa.String(16), nullable=False),
        sa.Column("logs", sa.Text, nullable=False),
        sa.Column("logs_truncated", sa.Boolean, nullable=False),
        sa.Column("note", sa.String(256), nullable=False),
    )
    op.create_index("ix_invocations_fn_started", "invocations", ["function_name", "started_at"])


def downgrade() -> None:
    op.drop_table("invocations")
