"""Links that work without a key for a while: the package download URL GetFunction hands out."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from urllib.parse import urlencode

from impuls.errors import Forbidden


class CodeLinks:
    """Signs and checks ``/code/<name>?version=..&expires=..&signature=..`` with a server MAC."""

    def __init__(self, mac: Callable[[bytes], bytes]) -> None:
        self._mac = mac

    def _signature(self, name: str, version: str, expires: int) -> str:
        return self._mac(f"code-link:{name}:{version}:{expires}".encode()).hex()

    def sign(self, name: str, version: str, expires: int) -> str:
        """The query string of a link to ``name``'s package at ``version``, valid until ``expires``."""
        return urlencode({"version": version, "expires": expires,
                          "signature": self._signature(name, version, expires)})

    def check(self, name: str, version: str, expires: str, signature: str) -> None:
        """Forbidden unless the link was made by this server and has not expired."""
        if not expires.isdigit() or int(expires) < time.time():
            raise Forbidden("this code link has expired: ask GetFunction for a new one")
        if not hmac.compare_digest(signature, self._signature(name, version, int(expires))):
            raise Forbidden("this code link is not valid")
