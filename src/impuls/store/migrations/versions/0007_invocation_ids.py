"""invocation records keyed by their own id: an asynchronous event's retries share a request id

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = ("request_id", "function_name", "function_id", "started_at", "duration_ms", "outcome",
           "error_type", "cold_start", "sandbox", "logs", "logs_truncated", "note")


def upgrade() -> None:
    op.create_table(
        "invocations_0007",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False),
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
    columns = ", ".join(COLUMNS)
    op.execute(f"INSERT INTO invocations_0007 ({columns}) SELECT {columns} FROM invocations "
               "ORDER BY started_at")
    op.drop_table("invocations")
    op.rename_table("invocations_0007", "invocations")
    op.create_index("ix_invocations_fn_started", "invocations", ["function_name", "started_at"])
    op.create_index("ix_invocations_request_id", "invocations", ["request_id"])


def downgrade() -> None:
    raise NotImplementedError("records of retried events share request ids: no way back")
