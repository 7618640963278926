"""Settings, read once from ``IMPULS_*`` environment variables.

Command-line flags override the environment; :func:`load` does the merge so
the rest of the code only ever sees a frozen :class:`Settings`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from impuls.errors import ConfigError

SANDBOX_KINDS = ("auto", "process", "namespace", "microvm")
#: the default server-wide instance cap: one instance per this much of the host's memory (an
#: idle warm Python instance takes ~3.5 MiB PSS in the namespace sandbox; the rest is room for
#: what functions hold), and never fewer than MIN_INSTANCES
MIB_PER_INSTANCE = 16
MIN_INSTANCES = 64
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".impuls")
    database_url: str | None = None
    sandbox: str = "auto"
    allow_local: bool = False
    idle_timeout: float = 300.0
    #: live instances on this server (all functions, all sandboxes); default: follows the host's
    #: memory (:func:`default_max_concurrency`)
    max_concurrency: int = field(default_factory=lambda: default_max_concurrency())
    queue_size: int = 100
    queue_timeout: float = 10.0
    shutdown_grace: float = 30.0
    invocation_retention_days: float = 7.0
    log_level: str = "info"
    #: the server's own logs: ``text`` (one line each) or ``json`` (one JSON object per line)
    log_format: str = "text"
    #: ``GET /metrics`` without a key (else it needs a key with ``read`` scope on every function)
    metrics_public: bool = False
    #: every /api/v1 request needs a key; off (``--no-auth``) only on a loopback address
    auth: bool = True
    #: an admin key taken as given (automation); without it the first start writes one
    #: to ``<data dir>/admin-key``
    admin_key: str = ""
    #: the secret AWS-style credentials are derived from; nodes of a cluster share it
    #: (default: ``<data dir>/server-secret``, made at first start)
    server_secret: str = ""
    #: asynchronous events: retries after a function error wait base and 2 * base seconds
    event_retry_base_seconds: float = 60.0
    #: throttled or failed-to-start deliveries wait 1 s, doubling up to this, until the event's age runs out
    event_backoff_max_seconds: float = 300.0
    #: the smallest maximum_event_age_seconds a function may set (Lambda: 60)
    event_min_age_seconds: int = 60
    #: a delivery's lease outlives the function's timeout by this much; a node that dies
    #: holding it leaves the event to another node afterwards
    event_lease_margin_seconds: float = 30.0
    #: asynchronous deliveries running at once on this node
    async_concurrency: int = 64
    #: a wildcard DNS name pointing at the server: ``<name>.<url_domain>`` serves function
    #: ``name``'s URL at ``/`` (function URLs are always at ``/fn/<name>/`` too)
    url_domain: str = ""
    #: the account id in ARNs (the region comes from each request's credential scope)
    account_id: str = "000000000000"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: microVM guest images (default: ``<data dir>/images``)
    images_dir: Path | None = None
    #: Debian mirror the image builder downloads from (default: the host's apt source)
    images_mirror: str = ""
    #: ``auto`` (KVM when a probe boot works, else TCG), ``kvm`` or ``tcg``
    microvm_accel: str = "auto"
    #: cold starts restore a per-runtime snapshot (else every instance boots)
    microvm_snapshots: bool = True
    #: the namespace sandbox's template (whose address-space layout its instances share) is
    #: replaced after this many instances or seconds
    template_max_forks: int = 1000
    template_max_age: float = 600.0
    #: an OpenTelemetry collector's OTLP/HTTP endpoint (e.g. ``http://127.0.0.1:4318``): spans go to
    #: ``<endpoint>/v1/traces``; empty (the default): no tracing at all
    otlp_endpoint: str = ""
    #: how other nodes and ``GET /api/v1/nodes`` name this node's API (default:
    #: ``<scheme>://<host>:<port>``, the host's name when listening on every address)
    advertise_address: str = ""
    #: a node writes its heartbeat row this often; it is down after 3 missed beats
    heartbeat_seconds: float = 5.0

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL: ``IMPULS_DATABASE_URL`` or SQLite in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'impuls.db').resolve()}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    @property
    def images_path(self) -> Path:
        return self.images_dir if self.images_dir is not None else self.data_dir / "images"

    @property
    def address(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def store_kind(self) -> str:
        return self.db_url.split(":", 1)[0].split("+", 1)[0]


def default_max_concurrency(meminfo: Path = Path("/proc/meminfo")) -> int:
    """One instance per :data:`MIB_PER_INSTANCE` MiB of the host's memory (24 GiB: 1,536), at
    least :data:`MIN_INSTANCES` (also when the memory cannot be read)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return max(MIN_INSTANCES, int(line.split()[1]) // 1024 // MIB_PER_INSTANCE)
    except (OSError, ValueError, IndexError):
        pass
    return MIN_INSTANCES


_BOOL_TRUE = {"1", "true", "yes", "on"}


def _convert(name: str, raw: str, kind: str) -> Any:
    """``raw`` as the field's type (``kind`` is its annotation, e.g. ``"Path | None"``)."""
    try:
        if kind == "bool":
            return raw.strip().lower() in _BOOL_TRUE
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("Path"):
            return Path(raw)
    except ValueError as exc:
        raise ConfigError(f"IMPULS_{name.upper()}: cannot parse {raw!r}: {exc}") from exc
    return raw


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Settings from the environment, then ``overrides`` (values that are None are ignored)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = env.get(f"IMPULS_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _convert(f.name, raw, str(f.type))
    settings = replace(Settings(), **values)
    settings = replace(settings, **{k: v for k, v in (overrides or {}).items() if v is not None})
    if settings.sandbox not in SANDBOX_KINDS:
        raise ConfigError(f"sandbox must be one of {', '.join(SANDBOX_KINDS)}, not {settings.sandbox!r}")
    if not settings.auth and not is_loopback(settings.host):
        raise ConfigError(f"authentication can only be turned off on a loopback address, "
                          f"not on {settings.host!r}: anyone who reaches the port could run code")
    if not (len(settings.account_id) == 12 and settings.account_id.isdigit()):
        raise ConfigError(f"account id must be 12 digits, not {settings.account_id!r}")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    if settings.microvm_accel not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"microvm accel must be auto, kvm or tcg, not {settings.microvm_accel!r}")
    if settings.log_format not in LOG_FORMATS:
        raise ConfigError(f"log format must be text or json, not {settings.log_format!r}")
    if settings.heartbeat_seconds <= 0:
        raise ConfigError("heartbeat seconds must be positive")
    if settings.idle_timeout <= 0:
        raise ConfigError("idle timeout must be positive")
    return settings
