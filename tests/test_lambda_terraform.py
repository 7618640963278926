"""Terraform's ``aws_lambda_function``, replayed call by call with boto3.

``Provider`` makes the Lambda calls the Terraform AWS provider makes for the resource
(internal/service/lambda/function.go: resourceFunctionCreate/Read/Update/Delete and their
waiters), in the same order and with the same parameters, and reads the results the way the
provider does.  The waits are the provider's StateChangeConfs: any state other than the
pending and target ones is an error, as it is for Terraform.  Only the delays are shorter.

``plan`` then compares the refreshed state with the configuration as ``terraform plan``
would: any difference would be a perpetual diff (or, for ``package_type``, a replacement) for
every user of Impuls with Terraform.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from botocore.exceptions import ClientError

from tests.helpers import Server, unique
from tests.lambda_fixtures import (
    HANDLER,
    PYTHON,
    ROLE,
    WAIT,
    code_of,
    code_sha256,
    function_arn,
    lambda_client,
    make_credentials,
    python_zip,
    versioned_source,
    zip_bytes,
)

T = TypeVar("T")
#: the provider's lambdaPropagationTimeout is 2 minutes; its create timeout 10
TIMEOUT = 120.0
POLL = 0.25
#: listVersionsMaxItems
LIST_VERSIONS_MAX_ITEMS = 10000


class ProviderError(AssertionError):
    """What Terraform would print as an error diagnostic."""


@dataclasses.dataclass(frozen=True)
class Resource:
    """An ``aws_lambda_function`` block (the attributes the tests set; the schema's defaults)."""

    function_name: str
    filename: bytes
    role: str = ROLE
    handler: str = HANDLER
    runtime: str = PYTHON
    description: str = ""
    memory_size: int = 128
    timeout: int = 3
    publish: bool = False
    package_type: str = "Zip"
    environment: dict[str, str] | None = None
    tags: dict[str, str] | None = None
    reserved_concurrent_executions: int = -1


class Provider:
    """The Terraform AWS provider's calls for aws_lambda_function."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.calls: list[str] = []

    def call(self, operation: str, **params: Any) -> Any:
        self.calls.append(operation)
        method = "".join("_" + c.lower() if c.isupper() else c for c in operation).lstrip("_")
        return getattr(self.conn, method)(**params)

    # --- helpers of function.go ---------------------------------------------------------------

    def retry_function_op(self, op: Callable[[], T]) -> T:
        """retryFunctionOp: IAM propagation and ResourceConflictException are retried."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                return op()
            except ClientError as err:
                retryable = code_of(err) == "ResourceConflictException" or (
                    code_of(err) == "InvalidParameterValueException"
                    and "cannot be assumed by Lambda" in str(err))
                if not retryable or time.monotonic() > deadline:
                    raise
                time.sleep(POLL)

    def find_function(self, name: str, qualifier: str | None = None) -> dict[str, Any] | None:
        """findFunction: None when not found; a response without Code or Configuration is an error."""
        params: dict[str, Any] = {"FunctionName": name}
        if qualifier:
            params["Qualifier"] = qualifier
        try:
            output = self.call("GetFunction", **params)
        except ClientError as err:
            if code_of(err) == "ResourceNotFoundException":
                return None
            raise
        if not output.get("Code") or not output.get("Configuration"):
            raise ProviderError(f"empty result: GetFunction gave no Code or Configuration: {output}")
        return dict(output)

    def wait_for(self, name: str, attribute: str, pending: set[str], target: str) -> dict[str, Any]:
        """A StateChangeConf over GetFunction: ``pending`` states go on, ``target`` ends it,
        anything else (including no value at all) fails, with the reason the provider shows."""
        reason = {"State": ("StateReasonCode", "StateReason"),
                  "LastUpdateStatus": ("LastUpdateStatusReasonCode", "LastUpdateStatusReason")}[attribute]
        deadline = time.monotonic() + TIMEOUT
        while True:
            output = self.find_function(name)
            if output is None:
                raise ProviderError(f"couldn't find resource {name} while waiting for {attribute}")
            config = output["Configuration"]
            value = config.get(attribute)
            if value == target:
                return dict(config)
            if value not in pending:
                raise ProviderError(f"unexpected state '{value}', wanted target '{target}'. last error: "
                                    f"{config.get(reason[0])}: {config.get(reason[1])}")
            if time.monotonic() > deadline:
                raise ProviderError(f"timeout while waiting for {attribute} to become '{target}'")
            time.sleep(POLL)

    def wait_function_created(self, name: str) -> dict[str, Any]:
        return self.wait_for(name, "State", {"Pending"}, "Active")

    def wait_function_updated(self, name: str) -> dict[str, Any]:
        return self.wait_for(name, "LastUpdateStatus", {"InProgress"}, "Successful")

    def find_latest_function_version_by_name(self, name: str) -> dict[str, Any]:
        """ListVersionsByFunction, every page; the last entry of the last page is the newest."""
        params: dict[str, Any] = {"FunctionName": name, "MaxItems": LIST_VERSIONS_MAX_ITEMS}
        latest = None
        while True:
            page = self.call("ListVersionsByFunction", **params)
            if page["Versions"] and not page.get("NextMarker"):
                latest = page["Versions"][-1]
            if not page.get("NextMarker"):
                break
            params["Marker"] = page["NextMarker"]
        if latest is None:
            raise ProviderError(f"empty result: no versions of {name}")
        return dict(latest)

    def code_signing_config_arn(self, name: str) -> str:
        """GetFunctionCodeSigningConfig (commercial partition, Zip packages): the provider treats
        any error as fatal, so it must answer (no code signing config)."""
        output = self.call("GetFunctionCodeSigningConfig", FunctionName=name)
        assert output["FunctionName"] in (name, function_arn(name)), output
        return str(output.get("CodeSigningConfigArn") or "")

    # --- CRUD ---------------------------------------------------------------------------------

    def create(self, r: Resource) -> dict[str, Any]:
        params: dict[str, Any] = {
            "Code": {"ZipFile": r.filename}, "Description": r.description, "FunctionName": r.function_name,
            "MemorySize": r.memory_size, "PackageType": r.package_type, "Publish": r.publish,
            "Role": r.role, "Timeout": r.timeout, "Handler": r.handler, "Runtime": r.runtime,
        }
        if r.tags:
            params["Tags"] = r.tags
        if r.environment:
            params["Environment"] = {"Variables": r.environment}
        self.retry_function_op(lambda: self.call("CreateFunction", **params))

        deadline = time.monotonic() + TIMEOUT  # RetryWhenNotFound(findFunctionByName)
        while self.find_function(r.function_name) is None:
            if time.monotonic() > deadline:
                raise ProviderError(f"{r.function_name} not found after CreateFunction")
            time.sleep(POLL)
        self.wait_function_created(r.function_name)
        if r.reserved_concurrent_executions >= 0:
            self.call("PutFunctionConcurrency", FunctionName=r.function_name,
                      ReservedConcurrentExecutions=r.reserved_concurrent_executions)
        state = self.read(r.function_name)
        assert state is not None
        return state

    def read(self, name: str) -> dict[str, Any] | None:
        output = self.find_function(name)
        if output is None:
            return None  # removed from state
        fn = output["Configuration"]
        concurrency = output.get("Concurrency")
        state: dict[str, Any] = {
            "arn": fn["FunctionArn"], "code_sha256": fn["CodeSha256"], "description": fn.get("Description"),
            "environment": (fn.get("Environment") or {}).get("Variables") or {},
            "handler": fn.get("Handler"), "last_modified": fn["LastModified"],
            "memory_size": fn.get("MemorySize"), "package_type": fn.get("PackageType"),
            "reserved_concurrent_executions":
                concurrency["ReservedConcurrentExecutions"] if concurrency is not None else -1,
            "role": fn.get("Role"), "runtime": fn.get("Runtime"), "source_code_size": fn["CodeSize"],
            "timeout": fn.get("Timeout"), "ephemeral_storage": fn.get("EphemeralStorage"),
        }
        latest = self.find_latest_function_version_by_name(name)
        state["qualified_arn"] = latest["FunctionArn"]
        state["version"] = latest["Version"]
        state["tags"] = output.get("Tags") or {}
        if fn.get("PackageType") == "Zip":
            state["code_signing_config_arn"] = self.code_signing_config_arn(name)
        return state

    def update(self, old: Resource, new: Resource, state: dict[str, Any]) -> dict[str, Any]:
        name = new.function_name
        if (old.tags or {}) != (new.tags or {}):  # tags via the transparent tagging interceptor
            removed = [k for k in (old.tags or {}) if k not in (new.tags or {})]
            if removed:
                self.call("UntagResource", Resource=state["arn"], TagKeys=removed)
            changed = {k: v for k, v in (new.tags or {}).items() if (old.tags or {}).get(k) != v}
            if changed:
                self.call("TagResource", Resource=state["arn"], Tags=changed)

        params: dict[str, Any] = {"FunctionName": name}
        for attribute, key in (("description", "Description"), ("handler", "Handler"),
                               ("memory_size", "MemorySize"), ("role", "Role"), ("runtime", "Runtime"),
                               ("timeout", "Timeout")):
            if getattr(old, attribute) != getattr(new, attribute):
                params[key] = getattr(new, attribute)
        if old.environment != new.environment:
            params["Environment"] = {"Variables": new.environment or {}}
        config_update = len(params) > 1
        if config_update:
            self.retry_function_op(lambda: self.call("UpdateFunctionConfiguration", **params))
            self.wait_function_updated(name)

        code_update = old.filename != new.filename
        if code_update:
            self.call("UpdateFunctionCode", FunctionName=name, ZipFile=new.filename)
            self.wait_function_updated(name)

        if old.reserved_concurrent_executions != new.reserved_concurrent_executions:
            if new.reserved_concurrent_executions >= 0:
                self.call("PutFunctionConcurrency", FunctionName=name,
                          ReservedConcurrentExecutions=new.reserved_concurrent_executions)
            else:
                self.call("DeleteFunctionConcurrency", FunctionName=name)

        if new.publish and (code_update or config_update or not old.publish):
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    output = self.call("PublishVersion", FunctionName=name)
                    break
                except ClientError as err:  # RetryWhenIsAErrorMessageContains(..., "in progress")
                    if (code_of(err) != "ResourceConflictException" or "in progress" not in str(err)
                            or time.monotonic() > deadline):
                        raise
                    time.sleep(POLL)
            # lambda.NewFunctionUpdatedWaiter(conn).Wait(FunctionName: output.FunctionArn, Qualifier: ...)
            self.calls.append("GetFunctionConfiguration")
            self.conn.get_waiter("function_updated").wait(FunctionName=output["FunctionArn"],
                                                         Qualifier=output["Version"], WaiterConfig=WAIT)
            self.calls.append("GetFunctionConfiguration")
            self.conn.get_waiter("published_version_active").wait(FunctionName=name,
                                                                 Qualifier=output["Version"],
                                                                 WaiterConfig=WAIT)
        refreshed = self.read(name)
        assert refreshed is not None
        return refreshed

    def delete(self, name: str) -> None:
        try:
            self.call("DeleteFunction", FunctionName=name)
        except ClientError as err:
            if code_of(err) != "ResourceNotFoundException":
                raise

    def check_destroy(self, name: str) -> None:
        """The acceptance tests' CheckDestroy: GetFunction until ResourceNotFoundException."""
        deadline = time.monotonic() + TIMEOUT
        while self.find_function(name) is not None:
            if time.monotonic() > deadline:
                raise ProviderError(f"Lambda Function {name} still exists")
            time.sleep(POLL)


def plan(r: Resource, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The attributes ``terraform plan`` would want to change: {attribute: (state, config)}."""
    wanted = {
        "handler": r.handler, "runtime": r.runtime, "role": r.role, "description": r.description,
        "memory_size": r.memory_size, "timeout": r.timeout, "package_type": r.package_type,
        "environment": r.environment or {}, "tags": r.tags or {},
        "reserved_concurrent_executions": r.reserved_concurrent_executions,
        "code_sha256": code_sha256(r.filename),  # filebase64sha256(filename), the source_code_hash
        "source_code_size": len(r.filename),
    }
    return {k: (state.get(k), v) for k, v in wanted.items() if state.get(k) != v}


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = Server(tmp_path_factory.mktemp("lambda-terraform") / "data").start()
    creds = make_credentials(server, "deploy")
    yield lambda_client(server.url, creds.access_key_id, creds.secret_access_key)
    server.stop()


@pytest.fixture
def tf(conn: Any) -> Provider:
    return Provider(conn)


def invoked_value(conn: Any, name: str) -> Any:
    resp = conn.invoke(FunctionName=name, Payload=b"{}")
    assert resp["StatusCode"] == 200 and "FunctionError" not in resp, resp
    return json.loads(resp["Payload"].read())


def test_apply_update_publish_destroy(tf: Provider, conn: Any) -> None:
    name = unique("tf")
    v1 = Resource(function_name=name, filename=python_zip(versioned_source("one")),
                  environment={"GREETING": "one"}, tags={"managed-by": "terraform"})

    # terraform apply (create)
    state = tf.create(v1)
    assert tf.calls[:3] == ["CreateFunction", "GetFunction", "GetFunction"], tf.calls
    assert state["arn"] == function_arn(name)
    assert state["version"] == "$LATEST", state
    # AWS's own examples show both spellings of $LATEST's ARN in ListVersionsByFunction
    assert state["qualified_arn"] in (function_arn(name), function_arn(name, qualifier="$LATEST")), state
    assert plan(v1, state) == {}, "terraform plan right after apply shows changes"
    assert invoked_value(conn, name) == {"value": "one", "greeting": "one"}

    # terraform plan/refresh: reading again changes nothing
    tf.calls.clear()
    again = tf.read(name)
    assert again == state
    assert tf.calls[:2] == ["GetFunction", "ListVersionsByFunction"], tf.calls

    # a configuration change: UpdateFunctionConfiguration, then GetFunction until Successful
    v2 = dataclasses.replace(v1, description="updated by terraform", memory_size=256, timeout=10,
                             environment={"GREETING": "two", "EXTRA": "x"},
                             tags={"managed-by": "terraform", "stage": "two"})
    tf.calls.clear()
    state = tf.update(v1, v2, state)
    assert "UpdateFunctionConfiguration" in tf.calls and "UpdateFunctionCode" not in tf.calls, tf.calls
    assert plan(v2, state) == {}
    assert state["version"] == "$LATEST"
    assert invoked_value(conn, name) == {"value": "one", "greeting": "two"}

    # a code change: UpdateFunctionCode, then GetFunction until Successful
    v3 = dataclasses.replace(v2, filename=python_zip(versioned_source("two")))
    tf.calls.clear()
    state = tf.update(v2, v3, state)
    assert "UpdateFunctionCode" in tf.calls and "UpdateFunctionConfiguration" not in tf.calls, tf.calls
    assert plan(v3, state) == {}
    assert invoked_value(conn, name) == {"value": "two", "greeting": "two"}

    # publish = true: PublishVersion and its waiters; version and qualified_arn follow
    v4 = dataclasses.replace(v3, publish=True)
    state = tf.update(v3, v4, state)
    assert (state["version"], state["qualified_arn"]) == ("1", function_arn(name, qualifier="1")), state
    assert plan(v4, state) == {}

    # code and configuration at once, published
    v5 = dataclasses.replace(v4, filename=python_zip(versioned_source("three")),
                             environment={"GREETING": "three"})
    tf.calls.clear()
    state = tf.update(v4, v5, state)
    assert tf.calls.index("UpdateFunctionConfiguration") < tf.calls.index("UpdateFunctionCode") < \
        tf.calls.index("PublishVersion"), tf.calls
    assert (state["version"], state["qualified_arn"]) == ("2", function_arn(name, qualifier="2")), state
    assert plan(v5, state) == {}
    assert invoked_value(conn, f"{name}:1") == {"value": "two", "greeting": "two"}
    assert invoked_value(conn, f"{name}:2") == {"value": "three", "greeting": "three"}

    # terraform destroy
    tf.delete(name)
    tf.check_destroy(name)
    assert tf.read(name) is None  # a refresh now drops it from the state
    tf.delete(name)  # destroying what is already gone is not an error for the provider


def test_create_published_with_reserved_concurrency(tf: Provider) -> None:
    name = unique("tf-pub")
    r = Resource(function_name=name, filename=python_zip(versioned_source("one")), publish=True,
                 reserved_concurrent_executions=2, description="published at birth")
    state = tf.create(r)
    assert "PutFunctionConcurrency" in tf.calls, tf.calls
    assert (state["version"], state["qualified_arn"]) == ("1", function_arn(name, qualifier="1")), state
    assert state["reserved_concurrent_executions"] == 2
    assert plan(r, state) == {}

    unreserved = dataclasses.replace(r, reserved_concurrent_executions=-1)
    tf.calls.clear()
    state = tf.update(r, unreserved, state)
    assert "DeleteFunctionConcurrency" in tf.calls and "PublishVersion" not in tf.calls, tf.calls
    assert state["reserved_concurrent_executions"] == -1, "GetFunction still reports a Concurrency"
    assert plan(unreserved, state) == {}
    assert state["version"] == "1"

    tf.delete(name)
    tf.check_destroy(name)


def test_a_function_without_reserved_concurrency_reads_as_minus_one(tf: Provider) -> None:
    """Terraform's default is -1, read from a GetFunction *without* Concurrency: a Concurrency
    block on every function would make every plan want to delete it."""
    r = Resource(function_name=unique("tf-plain"), filename=python_zip(versioned_source("plain")))
    state = tf.create(r)
    assert state["reserved_concurrent_executions"] == -1, state
    assert plan(r, state) == {}
    tf.delete(r.function_name)
    tf.check_destroy(r.function_name)


def test_a_broken_package_fails_the_apply_with_its_reason(tf: Provider, conn: Any) -> None:
    name = unique("tf-broken")
    r = Resource(function_name=name, filename=zip_bytes({"main.sh": "echo no bootstrap\n"}),
                 runtime="provided.al2023", handler="function.handler")
    with pytest.raises(ProviderError) as info:
        tf.create(r)
    config = conn.get_function(FunctionName=name)["Configuration"]
    assert config["State"] == "Failed", config
    assert "unexpected state 'Failed'" in str(info.value), info.value
    assert config["StateReason"] in str(info.value) and config["StateReasonCode"] in str(info.value)
    tf.delete(name)  # terraform destroy of the tainted resource
    tf.check_destroy(name)
