"""Table definitions; migrations in ``migrations/versions`` create them."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

functions = Table(
    "functions",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("description", String(256), nullable=False, default=""),
    Column("runtime", String(32), nullable=False),
    Column("handler", String(256), nullable=False),
    Column("code_sha256", String(64), nullable=False, index=True),
    Column("code_size", Integer, nullable=False),
    Column("code_kind", String(8), nullable=False),  # "source" | "zip"
    Column("memory_mb", Integer, nullable=False),
    Column("timeout_sec", Integer, nullable=False),
    Column("environment", Text, nullable=False),  # JSON object
    Column("status", String(16), nullable=False),
    Column("max_concurrency", Integer, nullable=False),
    Column("ephemeral_storage_mb", Integer, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

invocations = Table(
    "invocations",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("function_name", String(64), nullable=False),
    Column("function_id", String(36), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("outcome", String(16), nullable=False),  # success | error | timeout | crash | throttled
    Column("error_type", String(128), nullable=True),
    Column("cold_start", Boolean, nullable=False),
    Column("sandbox", String(16), nullable=False),
    Column("logs", Text, nullable=False),
    Column("logs_truncated", Boolean, nullable=False),
    Column("note", String(256), nullable=False, default=""),
    Index("ix_invocations_fn_started", "function_name", "started_at"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("key_id", String(16), nullable=False, unique=True),  # the key's public part
    Column("key_hash", String(64), nullable=False),  # sha256 of the whole key
    Column("access_key_id", String(20), nullable=False, unique=True),  # AWS-style, for SigV4
    Column("scope", String(8), nullable=False),  # read | invoke | deploy | admin
    Column("functions", String(64), nullable=False),  # glob of function names
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("key_name", String(64), nullable=False),
    Column("source", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("target", String(128), nullable=False),
    Column("detail", Text, nullable=False),  # JSON object
)
