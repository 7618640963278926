"""Event-invoke configs and function URL configs over the Lambda API (stored in the registry)."""

from __future__ import annotations

from typing import Any

from impuls.api.lambda_api.call import Call, Reply
from impuls.api.lambda_api.shapes import iso_time
from impuls.auth.principal import Scope
from impuls.functions.models import function_arn

# --- event-invoke configs ------------------------------------------------------------------


def _event_fields(doc: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if "MaximumRetryAttempts" in doc:
        fields["maximum_retry_attempts"] = doc["MaximumRetryAttempts"]
    if "MaximumEventAgeInSeconds" in doc:
        fields["maximum_event_age_seconds"] = doc["MaximumEventAgeInSeconds"]
    destinations = doc.get("DestinationConfig") or {}
    for key, field in (("OnSuccess", "on_success"), ("OnFailure", "on_failure")):
        if key in destinations:
            fields[field] = (destinations[key] or {}).get("Destination")
    return fields


def _event_shape(call: Call, name: str, config: Any) -> dict[str, Any]:
    destinations: dict[str, Any] = {}
    if config.on_success:
        destinations["OnSuccess"] = {"Destination": config.on_success}
    if config.on_failure:
        destinations["OnFailure"] = {"Destination": config.on_failure}
    qualifier = None if config.qualifier == "$LATEST" else config.qualifier
    return {
        "LastModified": config.updated_at.timestamp(),
        "FunctionArn": function_arn(name, qualifier, call.region, call.account),
        "MaximumRetryAttempts": config.maximum_retry_attempts,
        "MaximumEventAgeInSeconds": config.maximum_event_age_seconds,
        "DestinationConfig": destinations,
    }


async def _put_event_config(call: Call, replace: bool) -> Reply:
    ref = call.function(Scope.DEPLOY)
    config = await call.run(call.platform.registry.put_event_config, ref.name, ref.qualifier or "$LATEST",
                            _event_fields(call.json()), call.actor, replace=replace)
    return Reply(body=_event_shape(call, ref.name, config))


async def put_function_event_invoke_config(call: Call) -> Reply:
    return await _put_event_config(call, replace=True)


async def update_function_event_invoke_config(call: Call) -> Reply:
    return await _put_event_config(call, replace=False)


async def get_function_event_invoke_config(call: Call) -> Reply:
    ref = call.function(Scope.READ)
    config = await call.run(call.platform.registry.get_event_config, ref.name, ref.qualifier or "$LATEST")
    return Reply(body=_event_shape(call, ref.name, config))


async def delete_function_event_invoke_config(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY)
    await call.run(call.platform.registry.delete_event_config, ref.name, ref.qualifier or "$LATEST",
                   call.actor)
    return Reply(204)


async def list_function_event_invoke_configs(call: Call) -> Reply:
    ref = call.function(Scope.READ, qualified=False)
    configs = await call.run(call.platform.registry.list_event_configs, ref.name)
    return Reply(body={"FunctionEventInvokeConfigs": [_event_shape(call, ref.name, c) for c in configs]})


# --- function URL configs ------------------------------------------------------------------

#: Lambda's Cors fields and the registry's names for them
CORS_FIELDS = (("AllowOrigins", "allow_origins"), ("AllowMethods", "allow_methods"),
               ("AllowHeaders", "allow_headers"), ("ExposeHeaders", "expose_headers"),
               ("AllowCredentials", "allow_credentials"), ("MaxAge", "max_age"))


def _url_fields(doc: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if "AuthType" in doc:
        fields["auth_type"] = doc["AuthType"]
    if "InvokeMode" in doc:
        fields["invoke_mode"] = doc["InvokeMode"]
    if "Cors" in doc:
        cors = doc["Cors"] or {}
        fields["cors"] = {snake: cors[camel] for camel, snake in CORS_FIELDS if camel in cors}
    return fields


def _url_shape(call: Call, name: str, config: Any) -> dict[str, Any]:
    qualifier = None if config.qualifier == "$LATEST" else config.qualifier
    suffix = f":{config.qualifier}" if qualifier else ""
    cors = {camel: config.cors[snake] for camel, snake in CORS_FIELDS if snake in config.cors}
    out: dict[str, Any] = {
        "FunctionUrl": f"{call.base_url}/fn/{name}{suffix}/",
        "FunctionArn": function_arn(name, qualifier, call.region, call.account),
        "AuthType": config.auth_type,
        "CreationTime": iso_time(config.created_at),
        "LastModifiedTime": iso_time(config.updated_at),
        "InvokeMode": config.invoke_mode,
    }
    if cors:
        out["Cors"] = cors
    return out


async def create_function_url_config(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY)
    config = await call.run(call.platform.registry.put_url_config, ref.name, ref.qualifier or "$LATEST",
                            _url_fields(call.json()), call.actor, create=True)
    return Reply(201, _url_shape(call, ref.name, config))


async def update_function_url_config(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY)
    config = await call.run(call.platform.registry.put_url_config, ref.name, ref.qualifier or "$LATEST",
                            _url_fields(call.json()), call.actor, create=False)
    return Reply(body=_url_shape(call, ref.name, config))


async def get_function_url_config(call: Call) -> Reply:
    ref = call.function(Scope.READ)
    config = await call.run(call.platform.registry.get_url_config, ref.name, ref.qualifier or "$LATEST")
    return Reply(body=_url_shape(call, ref.name, config))


async def delete_function_url_config(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY)
    await call.run(call.platform.registry.delete_url_config, ref.name, ref.qualifier or "$LATEST",
                   call.actor)
    return Reply(204)


async def list_function_url_configs(call: Call) -> Reply:
    ref = call.function(Scope.READ, qualified=False)
    configs = await call.run(call.platform.registry.list_url_configs, ref.name)
    return Reply(body={"FunctionUrlConfigs": [_url_shape(call, ref.name, c) for c in configs]})
