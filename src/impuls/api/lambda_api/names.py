"""Lambda's ways of naming a function: ``name``, ``name:qualifier``, a partial ARN
(``<account>:function:name[:qualifier]``) or a full ARN."""

from __future__ import annotations

import re
from dataclasses import dataclass

from impuls.errors import InvalidInput

_FULL = re.compile(r"^arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):function:"
                   r"(?P<name>[A-Za-z0-9_-]+)(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]+))?$")
_PARTIAL = re.compile(r"^(?P<account>\d{12}):function:(?P<name>[A-Za-z0-9_-]+)"
                      r"(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]+))?$")
_PLAIN = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]+))?$")


@dataclass(frozen=True)
class FunctionRef:
    name: str
    qualifier: str | None


def parse_function(value: str, account: str, qualifier: str | None = None) -> FunctionRef:
    """The function (and qualifier) a ``FunctionName`` names; a ``Qualifier`` parameter must
    agree with one in the name.  InvalidInput for anything else, or another account's ARN."""
    m = _FULL.match(value) or _PARTIAL.match(value) or _PLAIN.match(value)
    if m is None:
        raise InvalidInput(f"FunctionName: {value!r} is not a function name, a partial ARN or an ARN")
    if "account" in m.groupdict() and m["account"] != account:
        raise InvalidInput(f"FunctionName: account {m['account']} is not this server's ({account})")
    named = m["qualifier"]
    if named and qualifier and named != qualifier:
        raise InvalidInput(f"Qualifier {qualifier!r} does not match the one in FunctionName ({named!r})")
    return FunctionRef(m["name"], named or qualifier or None)
