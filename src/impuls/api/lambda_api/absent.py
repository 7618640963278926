"""Reads of Lambda features Impuls does not have, answered as Lambda answers them for a
function that does not use them (the Terraform provider reads them on every refresh)."""

from __future__ import annotations

from impuls.api.lambda_api.call import Call, Reply
from impuls.auth.principal import Scope
from impuls.functions.models import function_arn


async def get_function_code_signing_config(call: Call) -> Reply:
    ref = call.function(Scope.READ, qualified=False)
    await call.run(call.platform.registry.get, ref.name)
    return Reply(body={"CodeSigningConfigArn": "", "FunctionName": ref.name})


async def get_runtime_management_config(call: Call) -> Reply:
    ref = call.function(Scope.READ)
    await call.run(call.platform.registry.get, ref.name, ref.qualifier)
    return Reply(body={"UpdateRuntimeOn": "Auto",
                       "FunctionArn": function_arn(ref.name, ref.qualifier, call.region, call.account)})


async def get_function_recursion_config(call: Call) -> Reply:
    ref = call.function(Scope.READ, qualified=False)
    await call.run(call.platform.registry.get, ref.name)
    return Reply(body={"RecursiveLoop": "Terminate"})
