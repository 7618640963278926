"""Table definitions; migrations in ``migrations/versions`` create them."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    true,
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
    # 0004: Lambda's view of a function
    Column("role", String(2048), nullable=False, server_default=""),
    Column("runtime_given", String(32), nullable=False, server_default=""),  # as the user wrote it
    Column("tags", Text, nullable=False, server_default="{}"),  # JSON object
    Column("reserved_concurrency", Integer, nullable=True),
    Column("revision_id", String(36), nullable=False, server_default=""),  # new uuid4 on every change
    Column("last_version", Integer, nullable=False, server_default="0"),  # never reused
    Column("state", String(16), nullable=False, server_default="Active"),  # Pending | Active | Failed
    Column("state_reason", Text, nullable=True),
    Column("state_reason_code", String(64), nullable=True),
    # InProgress | Successful | Failed
    Column("last_update_status", String(16), nullable=False, server_default="Successful"),
    Column("last_update_status_reason", Text, nullable=True),
    Column("last_update_status_reason_code", String(64), nullable=True),
    # an update being built: the new configuration (JSON) and code; NULL when none
    Column("pending", Text, nullable=True),
    Column("pending_code_sha256", String(64), nullable=True),
    Column("pending_code_size", Integer, nullable=True),
    Column("pending_code_kind", String(8), nullable=True),
    # 0010: init once, fork many (docs/init-once.md)
    Column("init_once", Boolean, nullable=False, server_default=true()),
)

function_versions = Table(
    "function_versions",
    metadata,
    Column("function_name", String(64), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("config", Text, nullable=False),  # JSON: the frozen configuration
    Column("code_sha256", String(64), nullable=False, index=True),
    Column("code_size", Integer, nullable=False),
    Column("code_kind", String(8), nullable=False),
    Column("description", String(256), nullable=False),
    Column("revision_id", String(36), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

aliases = Table(
    "aliases",
    metadata,
    Column("function_name", String(64), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("function_version", String(16), nullable=False),  # a version number or "$LATEST"
    Column("description", String(256), nullable=False),
    Column("routing", Text, nullable=False),  # JSON {version: weight}
    Column("revision_id", String(36), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

event_invoke_configs = Table(
    "event_invoke_configs",
    metadata,
    Column("function_name", String(64), primary_key=True),
    Column("qualifier", String(128), primary_key=True),  # "$LATEST", a version or an alias
    Column("maximum_retry_attempts", Integer, nullable=False),
    Column("maximum_event_age_seconds", Integer, nullable=False),
    Column("on_success", String(1024), nullable=True),
    Column("on_failure", String(1024), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

function_urls = Table(
    "function_urls",
    metadata,
    Column("function_name", String(64), primary_key=True),
    Column("qualifier", String(128), primary_key=True),  # "$LATEST" or an alias
    Column("url_id", String(40), nullable=False, unique=True),
    Column("auth_type", String(16), nullable=False),  # NONE | KEY | AWS_IAM
    Column("cors", Text, nullable=False),  # JSON object
    Column("invoke_mode", String(16), nullable=False),  # BUFFERED | RESPONSE_STREAM
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

invocations = Table(
    "invocations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # 0007: retries share a request id
    Column("request_id", String(36), nullable=False, index=True),
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
    Column("target", String(256), nullable=False),  # 0004: room for "function:alias"
    Column("detail", Text, nullable=False),  # JSON object
)

events = Table(
    "events",
    metadata,
    Column("request_id", String(36), primary_key=True),  # the aws_request_id of every attempt
    Column("function_name", String(64), nullable=False, index=True),
    Column("qualifier", String(128), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("source", String(16), nullable=False),  # api | lambda | schedule | destination | redrive
    Column("state", String(16), nullable=False),  # queued | running | retrying | succeeded | failed | expired
    Column("attempts", Integer, nullable=False),  # deliveries that reached the function
    Column("retries_used", Integer, nullable=False),  # of maximum_retry_attempts (function errors)
    Column("duplicates", Integer, nullable=False),  # deliveries that may have run twice (a lost lease)
    Column("backoff", Float, nullable=False),  # the last throttle/start-failure delay, seconds
    Column("next_at", DateTime(timezone=True), nullable=False),  # not delivered before
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("executed_version", String(16), nullable=True),
    Column("last_error_type", String(128), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("result", Text, nullable=True),  # the last result (truncated)
    Column("traceparent", String(64), nullable=True),  # 0008: the accepting span (tracing on)
    Index("ix_events_due", "state", "next_at"),
)

event_attempts = Table(
    "event_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(36), nullable=False, index=True),
    Column("number", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("outcome", String(16), nullable=False),  # an invocation outcome, or "throttled"
    Column("error_type", String(128), nullable=True),
    Column("error", Text, nullable=True),
    Column("result", Text, nullable=True),
    Column("node", String(64), nullable=False),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("function_name", String(64), nullable=False, index=True),
    Column("request_id", String(36), nullable=False),
    Column("condition", String(32), nullable=False),  # RetriesExhausted | EventAgeExceeded
    Column("record", Text, nullable=False),  # the destination record (JSON)
    Column("created_at", DateTime(timezone=True), nullable=False),
)

schedules = Table(
    "schedules",
    metadata,
    Column("function_name", String(64), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("expression", String(256), nullable=False),  # rate(...), cron(...) or five-field cron
    Column("timezone", String(64), nullable=False),  # IANA name
    Column("payload", Text, nullable=True),  # JSON; NULL: EventBridge's scheduled-event shape
    Column("enabled", Boolean, nullable=False),
    Column("catch_up", String(8), nullable=False),  # one | none
    Column("created_at", DateTime(timezone=True), nullable=False),  # rate() slots count from here
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_slot", DateTime(timezone=True), nullable=True),  # the last slot fired
    Column("next_slot", DateTime(timezone=True), nullable=True),  # NULL: disabled, or no slot left
    Index("ix_schedules_due", "enabled", "next_slot"),
)

# --- several nodes on one PostgreSQL (0009) ---------------------------------------

code_blobs = Table(
    "code_blobs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False),  # the last put of this content
)

#: built packages, so that a package is built on one node only (impuls.store.package_archives)
package_archives = Table(
    "package_archives",
    metadata,
    Column("key", String(64), primary_key=True),  # impuls.functions.packages.PackageBuilder.key
    Column("code_sha256", String(64), nullable=False, index=True),
    Column("archive", LargeBinary, nullable=False),  # tar.gz of the package directory
    Column("meta", Text, nullable=False),  # JSON: the build's status, log and seconds
    Column("stored_at", DateTime(timezone=True), nullable=False),
)

#: the cluster's revision counter: one row per committed registry change, ids in commit order
changes = Table(
    "changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("function_name", String(64), nullable=False),
    Column("qualifier", String(160), nullable=True),  # see impuls.functions.base.ChangeListener
    Column("node", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(128), primary_key=True),  # host:data-directory digest
    Column("address", String(256), nullable=False),
    Column("version", String(32), nullable=False),
    Column("sandbox", String(32), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("stopped_at", DateTime(timezone=True), nullable=True),  # a clean stop
    Column("stats", Text, nullable=False),  # JSON: instances, in-flight calls, queue work
)
