"""Access to the running :class:`~impuls.platform.Platform` from a request."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from starlette.requests import Request

if TYPE_CHECKING:
    from impuls.platform import Platform


def platform_of(request: Request) -> Platform:
    return cast("Platform", request.app.state.platform)
