"""Scopes and the principal a request acts as."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from fnmatch import fnmatchcase

from impuls.errors import Forbidden, InvalidInput

#: a function-name glob: name characters plus ``*`` (any run) and ``?`` (one character)
PATTERN_RE = re.compile(r"^[A-Za-z0-9_*?-]{1,64}$")


class Scope(IntEnum):
    """Each scope includes the ones below it."""

    READ = 1  # list, get, logs, invocation records
    INVOKE = 2  # + invoke
    DEPLOY = 3  # + create, update, delete functions
    ADMIN = 4  # + keys and the audit log

    @classmethod
    def parse(cls, value: object) -> Scope:
        if isinstance(value, Scope):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise InvalidInput(f"scope: must be one of {', '.join(s.label for s in cls)}, not {value!r}")

    @property
    def label(self) -> str:
        return self.name.lower()


def check_pattern(pattern: object) -> str:
    if not isinstance(pattern, str) or not PATTERN_RE.match(pattern):
        raise InvalidInput("functions: a glob of function names such as 'orders-*' "
                           "(letters, digits, '_', '-', '*', '?'; at most 64 characters)")
    return pattern


@dataclass(frozen=True)
class Principal:
    """A key's name, scope and the functions (a glob) it may touch."""

    name: str
    scope: Scope
    functions: str = "*"

    def require(self, scope: Scope, function: str | None = None) -> None:
        """Forbidden unless this principal has ``scope`` (and may touch ``function``)."""
        if self.scope < scope:
            raise Forbidden(f"key '{self.name}' has scope '{self.scope.label}'; "
                            f"this needs '{scope.label}'")
        if function is not None and not self.may_touch(function):
            raise Forbidden(f"key '{self.name}' is limited to functions matching "
                            f"'{self.functions}'")

    def may_touch(self, function: str) -> bool:
        return fnmatchcase(function, self.functions)


#: who acts when authentication is off (``--no-auth``)
ANONYMOUS = Principal("anonymous", Scope.ADMIN)
