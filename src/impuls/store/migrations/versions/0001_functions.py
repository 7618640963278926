"""functions table

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "functions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("handler", sa.String(256), nullable=False),
        sa.Column("code_sha256", sa.String(64), nullable=False, index=True),
        sa.Column("code_size", sa.Integer, nullable=False),
        sa.Column("code_kind", sa.String(8), nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("timeout_sec", sa.Integer, nullable=False),
        sa.Column("environment", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("max_concurrency", sa.Integer, nullable=False),
        sa.Column("ephemeral_storage_mb", sa.Integer, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("functions")
