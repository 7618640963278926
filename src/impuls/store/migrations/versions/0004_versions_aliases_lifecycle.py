"""versions, aliases, event-invoke and URL configs; Lambda's lifecycle on functions

Existing functions become Active/Successful, with their runtime as written and a revision id.

Revision ID: 0004
Revises: 0003
"""

import uuid
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _function_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("role", sa.String(2048), nullable=False, server_default=""),
        sa.Column("runtime_given", sa.String(32), nullable=False, server_default=""),
        sa.Column("tags", sa.Text, nullable=False, server_default="{}"),
        sa.Column("reserved_concurrency", sa.Integer, nullable=True),
        sa.Column("revision_id", sa.String(36), nullable=False, server_default=""),
        sa.Column("last_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("state", sa.String(16), nullable=False, server_default="Active"),
        sa.Column("state_reason", sa.Text, nullable=True),
        sa.Column("state_reason_code", sa.String(64), nullable=True),
        sa.Column("last_update_status", sa.String(16), nullable=False, server_default="Successful"),
        sa.Column("last_update_status_reason", sa.Text, nullable=True),
        sa.Column("last_update_status_reason_code", sa.String(64), nullable=True),
        sa.Column("pending", sa.Text, nullable=True),
        sa.Column("pending_code_sha256", sa.String(64), nullable=True),
        sa.Column("pending_code_size", sa.Integer, nullable=True),
        sa.Column("pending_code_kind", sa.String(8), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("functions") as batch:
        for column in _function_columns():
            batch.add_column(column)
    functions = sa.table("functions", sa.column("id", sa.String), sa.column("runtime", sa.String),
                         sa.column("runtime_given", sa.String), sa.column("revision_id", sa.String))
    conn = op.get_bind()
    for fn_id, runtime in conn.execute(sa.select(functions.c.id, functions.c.runtime)).all():
        conn.execute(sa.update(functions).where(functions.c.id == fn_id)
                     .values(runtime_given=runtime, revision_id=str(uuid.uuid4())))
    with op.batch_alter_table("audit_log") as batch:
        batch.alter_column("target", existing_type=sa.String(128), type_=sa.String(256),
                           existing_nullable=False)

    op.create_table(
        "function_versions",
        sa.Column("function_name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("code_sha256", sa.String(64), nullable=False),
        sa.Column("code_size", sa.Integer, nullable=False),
        sa.Column("code_kind", sa.String(8), nullable=False),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("revision_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_function_versions_code_sha256", "function_versions", ["code_sha256"])
    op.create_table(
        "aliases",
        sa.Column("function_name", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("function_version", sa.String(16), nullable=False),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("routing", sa.Text, nullable=False),
        sa.Column("revision_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "event_invoke_configs",
        sa.Column("function_name", sa.String(64), primary_key=True),
        sa.Column("qualifier", sa.String(128), primary_key=True),
        sa.Column("maximum_retry_attempts", sa.Integer, nullable=False),
        sa.Column("maximum_event_age_seconds", sa.Integer, nullable=False),
        sa.Column("on_success", sa.String(1024), nullable=True),
        sa.Column("on_failure", sa.String(1024), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "function_urls",
        sa.Column("function_name", sa.String(64), primary_key=True),
        sa.Column("qualifier", sa.String(128), primary_key=True),
        sa.Column("url_id", sa.String(40), nullable=False, unique=True),
        sa.Column("auth_type", sa.String(16), nullable=False),
        sa.Column("cors", sa.Text, nullable=False),
        sa.Column("invoke_mode", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("function_urls")
    op.drop_table("event_invoke_configs")
    op.drop_table("aliases")
    op.drop_table("function_versions")
    with op.batch_alter_table("audit_log") as batch:
        batch.alter_column("target", existing_type=sa.String(256), type_=sa.String(128),
                           existing_nullable=False)
    with op.batch_alter_table("functions") as batch:
        for column in reversed(_function_columns()):
            batch.drop_column(column.name)
