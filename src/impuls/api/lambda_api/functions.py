"""Functions, versions, aliases, tags, concurrency and account settings over the Lambda API.

Each handler maps Lambda's request shape onto the registry and its answer back onto
Lambda's shapes (:mod:`.shapes`); the registry does the validating.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

from impuls.api.lambda_api.call import Call, Reply
from impuls.api.lambda_api.names import parse_function
from impuls.api.lambda_api.shapes import alias_configuration, function_configuration
from impuls.auth.principal import Scope
from impuls.errors import InvalidInput
from impuls.functions.models import MAX_UNZIPPED_BYTES, MAX_ZIP_BYTES, Function

#: Lambda's defaults where Impuls' differ
LAMBDA_DEFAULT_TIMEOUT = 3
MAX_ITEMS = 10_000
CODE_URL_SECONDS = 600

#: request fields Impuls stores or ignores harmlessly when empty; anything else set is refused
_IGNORED_WHEN_EMPTY = {"VpcConfig", "Layers", "DeadLetterConfig", "KMSKeyArn", "FileSystemConfigs",
                       "ImageConfig", "CodeSigningConfigArn", "SnapStart", "LoggingConfig"}


def _config_body(doc: dict[str, Any], create: bool) -> dict[str, Any]:
    """Lambda's configuration fields as the registry's."""
    _refuse_unsupported(doc)
    body: dict[str, Any] = {}
    simple = {"FunctionName": "name", "Runtime": "runtime", "Handler": "handler",
              "Description": "description", "Timeout": "timeout_sec", "MemorySize": "memory_mb",
              "Role": "role"}
    for key, field in simple.items():
        if key in doc:
            body[field] = doc[key]
    if "Environment" in doc:
        body["environment"] = (doc["Environment"] or {}).get("Variables") or {}
    if "EphemeralStorage" in doc:
        body["ephemeral_storage_mb"] = (doc["EphemeralStorage"] or {}).get("Size")
    if create:
        body.setdefault("timeout_sec", LAMBDA_DEFAULT_TIMEOUT)
        if doc.get("Tags"):
            body["tags"] = doc["Tags"]
    return body


def _refuse_unsupported(doc: dict[str, Any]) -> None:
    for key in _IGNORED_WHEN_EMPTY:
        value = doc.get(key)
        if key == "VpcConfig" and isinstance(value, dict):
            value = [v for v in value.values() if v]
        if key == "SnapStart" and isinstance(value, dict):
            value = value.get("ApplyOn") not in (None, "None")
        if key == "LoggingConfig" and isinstance(value, dict):
            value = value.get("LogFormat") not in (None, "Text")
        if value:
            raise InvalidInput(f"{key} is not supported by Impuls")
    if doc.get("PackageType", "Zip") != "Zip":
        raise InvalidInput("PackageType: Impuls runs Zip packages only")
    if any(a != "x86_64" for a in doc.get("Architectures") or []):
        raise InvalidInput("Architectures: Impuls runs x86_64 only")
    mode = (doc.get("TracingConfig") or {}).get("Mode", "PassThrough")
    if mode != "PassThrough":
        raise InvalidInput("TracingConfig.Mode: only PassThrough is supported")


def _zip_field(code: dict[str, Any]) -> dict[str, Any]:
    """``Code.ZipFile`` (base64 in rest-json) as the registry's ``code_zip``."""
    for key in ("S3Bucket", "S3Key", "ImageUri"):
        if code.get(key):
            raise InvalidInput(f"Code.{key}: Impuls takes the package as ZipFile only")
    data = code.get("ZipFile")
    if not isinstance(data, str) or not data:
        raise InvalidInput("Code.ZipFile: the deployment package (a zip) is required")
    return {"code_zip": data}


def _config(call: Call, fn: Function) -> dict[str, Any]:
    return function_configuration(fn, call.region, call.account)


def _page(items: list[Any], call: Call) -> tuple[list[Any], str | None]:
    """Lambda's Marker/MaxItems pagination over ``items`` (the marker is an offset)."""
    marker = call.query.get("Marker") or "0"
    try:
        start = int(marker)
        limit = int(call.query.get("MaxItems") or 50)
    except ValueError as exc:
        raise InvalidInput("Marker and MaxItems must come from an earlier page") from exc
    if start < 0 or not 1 <= limit <= MAX_ITEMS:
        raise InvalidInput(f"MaxItems must be 1-{MAX_ITEMS}")
    end = start + limit
    return items[start:end], (str(end) if end < len(items) else None)


# --- functions ---------------------------------------------------------------------------


async def create_function(call: Call) -> Reply:
    call.principal.require(Scope.DEPLOY)
    doc = call.json()
    name = doc.get("FunctionName")
    if not isinstance(name, str):
        raise InvalidInput("FunctionName is required")
    name = parse_function(name, call.account).name
    call.principal.require(Scope.DEPLOY, name)
    body = {**_config_body(doc, create=True), "name": name, **_zip_field(doc.get("Code") or {})}
    registry = call.platform.registry
    if doc.get("Publish"):
        await call.run(registry.create, body, call.actor, wait=True)
        fn = await call.run(registry.publish, name, call.actor)
    else:
        fn = await call.run(registry.create, body, call.actor, wait=False)
    return Reply(201, _config(call, fn))


async def get_function(call: Call) -> Reply:
    ref = call.function(Scope.READ)
    fn = await call.run(call.platform.registry.get, ref.name, ref.qualifier)
    out: dict[str, Any] = {
        "Configuration": _config(call, fn),
        "Code": {"RepositoryType": "S3", "Location": _code_url(call, fn)},
    }
    if fn.tags:
        out["Tags"] = dict(fn.tags)
    if fn.reserved_concurrency is not None:
        out["Concurrency"] = {"ReservedConcurrentExecutions": fn.reserved_concurrency}
    return Reply(body=out)


def _code_url(call: Call, fn: Function) -> str:
    """A URL the package can be downloaded from for a while, without credentials."""
    expires = int(time.time()) + CODE_URL_SECONDS
    query = call.platform.code_links.sign(fn.name, fn.version, expires)
    return f"{call.base_url}/code/{fn.name}?{query}"


async def get_function_configuration(call: Call) -> Reply:
    ref = call.function(Scope.READ)
    return Reply(body=_config(call, await call.run(call.platform.registry.get, ref.name, ref.qualifier)))


async def list_functions(call: Call) -> Reply:
    call.principal.require(Scope.READ)
    registry = call.platform.registry
    functions, _ = await call.run(registry.list, 1000, 0, call.principal.functions)
    everything: list[Function] = []
    for fn in functions:
        if call.query.get("FunctionVersion") == "ALL":
            everything.extend(await call.run(registry.versions, fn.name))
        else:
            everything.append(fn)
    page, marker = _page(everything, call)
    out: dict[str, Any] = {"Functions": [_config(call, fn) for fn in page]}
    if marker:
        out["NextMarker"] = marker
    return Reply(body=out)


async def update_function_code(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY, qualified=False)
    doc = call.json()
    body = _zip_field(doc)
    registry = call.platform.registry
    if doc.get("DryRun"):
        fn = await call.run(registry.get, ref.name)
        return Reply(body=_config(call, fn))
    revision = doc.get("RevisionId")
    if doc.get("Publish"):
        await call.run(registry.update, ref.name, body, call.actor, wait=True, revision_id=revision)
        fn = await call.run(registry.publish, ref.name, call.actor)
    else:
        fn = await call.run(registry.update, ref.name, body, call.actor, wait=False, revision_id=revision)
    return Reply(body=_config(call, fn))


async def update_function_configuration(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY, qualified=False)
    doc = call.json()
    body = _config_body(doc, create=False)
    fn = await call.run(call.platform.registry.update, ref.name, body, call.actor, wait=False,
                        revision_id=doc.get("RevisionId"))
    return Reply(body=_config(call, fn))


async def delete_function(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY)
    await call.run(call.platform.registry.delete, ref.name, call.actor, ref.qualifier)
    return Reply(204)


async def get_account_settings(call: Call) -> Reply:
    call.principal.require(Scope.READ)
    functions, total = await call.run(call.platform.registry.list, 1000, 0)
    reserved = sum(fn.reserved_concurrency or 0 for fn in functions)
    limit = call.platform.settings.max_concurrency
    return Reply(body={
        "AccountLimit": {"TotalCodeSize": 75 * 1024**3, "CodeSizeUnzipped": MAX_UNZIPPED_BYTES,
                         "CodeSizeZipped": MAX_ZIP_BYTES, "ConcurrentExecutions": limit,
                         "UnreservedConcurrentExecutions": max(0, limit - reserved)},
        "AccountUsage": {"TotalCodeSize": sum(fn.code_size for fn in functions), "FunctionCount": total},
    })


# --- versions and aliases ----------------------------------------------------------------


async def publish_version(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY, qualified=False)
    doc = call.json()
    sha = doc.get("CodeSha256")
    if sha is not None:
        try:
            sha = base64.b64decode(sha, validate=True).hex()
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput("CodeSha256 must be the base64 of a sha256 digest") from exc
    fn = await call.run(call.platform.registry.publish, ref.name, call.actor,
                        description=doc.get("Description", ""), code_sha256=sha,
                        revision_id=doc.get("RevisionId"))
    return Reply(201, _config(call, fn))


async def list_versions_by_function(call: Call) -> Reply:
    ref = call.function(Scope.READ, qualified=False)
    versions = await call.run(call.platform.registry.versions, ref.name)
    page, marker = _page(versions, call)
    out: dict[str, Any] = {"Versions": [_config(call, fn) for fn in page]}
    if marker:
        out["NextMarker"] = marker
    return Reply(body=out)


def _weights(doc: dict[str, Any]) -> dict[str, float] | None:
    routing = doc.get("RoutingConfig")
    if routing is None:
        return None
    return dict((routing or {}).get("AdditionalVersionWeights") or {})


async def create_alias(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY, qualified=False)
    doc = call.json()
    alias = await call.run(call.platform.registry.create_alias, ref.name, doc.get("Name"),
                           doc.get("FunctionVersion"), call.actor, description=doc.get("Description", ""),
                           weights=_weights(doc))
    return Reply(201, alias_configuration(alias, ref.name, call.region, call.account))


async def get_alias(call: Call) -> Reply:
    ref = call.function(Scope.READ, qualified=False)
    alias = await call.run(call.platform.registry.get_alias, ref.name, call.params["Name"])
    return Reply(body=alias_configuration(alias, ref.name, call.region, call.account))


async def update_alias(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY, qualified=False)
    doc = call.json()
    alias = await call.run(call.platform.registry.update_alias, ref.name, call.params["Name"], call.actor,
                           version=doc.get("FunctionVersion"), description=doc.get("Description"),
                           weights=_weights(doc), revision_id=doc.get("RevisionId"))
    return Reply(body=alias_configuration(alias, ref.name, call.region, call.account))


async def delete_alias(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY, qualified=False)
    await call.run(call.platform.registry.delete_alias, ref.name, call.params["Name"], call.actor)
    return Reply(204)


async def list_aliases(call: Call) -> Reply:
    ref = call.function(Scope.READ, qualified=False)
    aliases = await call.run(call.platform.registry.list_aliases, ref.name, call.query.get("FunctionVersion"))
    page, marker = _page(aliases, call)
    out: dict[str, Any] = {"Aliases": [alias_configuration(a, ref.name, call.region, call.account)
                                       for a in page]}
    if marker:
        out["NextMarker"] = marker
    return Reply(body=out)


# --- tags and concurrency ----------------------------------------------------------------


def _tagged(call: Call, scope: Scope) -> str:
    ref = parse_function(call.params["Resource"], call.account)
    if ref.qualifier is not None:
        raise InvalidInput("tags belong to the function: give its unqualified ARN")
    call.principal.require(scope, ref.name)
    return ref.name


async def tag_resource(call: Call) -> Reply:
    name = _tagged(call, Scope.DEPLOY)
    tags = call.json().get("Tags")
    if not isinstance(tags, dict):
        raise InvalidInput("Tags: an object of tag names and values is required")
    await call.run(call.platform.registry.tag, name, tags, call.actor)
    return Reply(204)


async def untag_resource(call: Call) -> Reply:
    name = _tagged(call, Scope.DEPLOY)
    keys = call.query_all.get("tagKeys", [])
    await call.run(call.platform.registry.untag, name, keys, call.actor)
    return Reply(204)


async def list_tags(call: Call) -> Reply:
    name = _tagged(call, Scope.READ)
    fn = await call.run(call.platform.registry.get, name)
    return Reply(body={"Tags": dict(fn.tags)})


async def put_function_concurrency(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY, qualified=False)
    n = call.json().get("ReservedConcurrentExecutions")
    if not isinstance(n, int) or isinstance(n, bool):
        raise InvalidInput("ReservedConcurrentExecutions: a whole number is required")
    await call.run(call.platform.registry.put_concurrency, ref.name, n, call.actor)
    return Reply(body={"ReservedConcurrentExecutions": n})


async def get_function_concurrency(call: Call) -> Reply:
    ref = call.function(Scope.READ, qualified=False)
    fn = await call.run(call.platform.registry.get, ref.name)
    if fn.reserved_concurrency is None:
        return Reply(body={})
    return Reply(body={"ReservedConcurrentExecutions": fn.reserved_concurrency})


async def delete_function_concurrency(call: Call) -> Reply:
    ref = call.function(Scope.DEPLOY, qualified=False)
    await call.run(call.platform.registry.delete_concurrency, ref.name, call.actor)
    return Reply(204)
