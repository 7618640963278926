"""Impuls' records in the shapes of Lambda's service model (FunctionConfiguration, ...)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from impuls.functions.models import Function, function_arn


def lambda_time(ts: datetime) -> str:
    """Lambda's ``LastModified``: ``2024-01-31T12:00:00.000+0000``."""
    ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}+0000"


def iso_time(ts: datetime) -> str:
    """ISO 8601 as in ``CreationTime`` and ``LastModified`` of newer shapes."""
    ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def code_sha256(hex_digest: str) -> str:
    """Lambda's ``CodeSha256``: the base64 of the sha256 digest (Impuls stores it in hex)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def function_configuration(fn: Function, region: str, account: str) -> dict[str, Any]:
    qualifier = None if fn.version == "$LATEST" else fn.version
    out: dict[str, Any] = {
        "FunctionName": fn.name,
        "FunctionArn": function_arn(fn.name, qualifier, region, account),
        "Runtime": fn.runtime_given or fn.runtime,
        "Role": fn.role,
        "Handler": fn.handler,
        "CodeSize": fn.code_size,
        "Description": fn.description,
        "Timeout": fn.timeout_sec,
        "MemorySize": fn.memory_mb,
        "LastModified": lambda_time(fn.updated_at),
        "CodeSha256": code_sha256(fn.code_sha256),
        "Version": fn.version,
        "TracingConfig": {"Mode": "PassThrough"},
        "RevisionId": fn.revision_id,
        "State": fn.state,
        "LastUpdateStatus": fn.last_update_status,
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
        "EphemeralStorage": {"Size": fn.ephemeral_storage_mb},
        "SnapStart": {"ApplyOn": "None", "OptimizationStatus": "Off"},
        "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{fn.name}"},
    }
    if fn.environment:
        out["Environment"] = {"Variables": dict(fn.environment)}
    for key, value in (("StateReason", fn.state_reason), ("StateReasonCode", fn.state_reason_code),
                       ("LastUpdateStatusReason", fn.last_update_status_reason),
                       ("LastUpdateStatusReasonCode", fn.last_update_status_reason_code)):
        if value:
            out[key] = value
    return out


def alias_configuration(alias: Any, function_name: str, region: str, account: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "AliasArn": function_arn(function_name, alias.name, region, account),
        "Name": alias.name,
        "FunctionVersion": alias.function_version,
        "Description": alias.description,
        "RevisionId": alias.revision_id,
    }
    if alias.weights:
        out["RoutingConfig"] = {"AdditionalVersionWeights": dict(alias.weights)}
    return out
