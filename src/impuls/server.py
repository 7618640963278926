"""Running the HTTP server (uvicorn) around a :class:`~impuls.platform.Platform`."""

from __future__ import annotations

import json
import logging
import resource
from datetime import UTC, datetime
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from impuls.api.app import create_app
from impuls.api.http1 import HttpProtocol
from impuls.config import Settings
from impuls.console.app import create_console
from impuls.platform import Platform

log = logging.getLogger("impuls")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: what the server holds open per live instance (sockets, pipes, pidfds: ~6 measured) and for
#: itself (the store, clients), for :func:`raise_open_files`
FILES_PER_INSTANCE = 8
FILES_OF_ITS_OWN = 1024


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``,
    and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str)


def configure_logging(settings: Settings) -> None:
    """The server's own logs on stderr: text lines, or with ``log_format`` json one JSON object
    per line (uvicorn's and Python's warnings included)."""
    if settings.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
        logging.captureWarnings(True)
    else:
        logging.basicConfig(level=settings.log_level.upper(), format=TEXT_FORMAT)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def raise_open_files(max_instances: int) -> None:
    """Raise this process's soft limit on open files to its hard limit: a usual soft limit of
    1,024 runs out at about 150 live instances.  Functions keep their own limit of 1,024
    (``sandbox.base.INSTANCE_OPEN_FILES``).  Warn when even the hard limit is short of what
    ``max_instances`` need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = FILES_OF_ITS_OWN + FILES_PER_INSTANCE * max_instances
    if hard != resource.RLIM_INFINITY and hard < need:
        log.warning("the limit on open files (%d) is below what %d live instances need (~%d): "
                    "starts beyond ~%d instances may fail; raise it (ulimit -Hn, LimitNOFILE=) or "
                    "lower IMPULS_MAX_CONCURRENCY", hard, max_instances, need,
                    max(0, (hard - FILES_OF_ITS_OWN) // FILES_PER_INSTANCE))


def serve(settings: Settings) -> None:
    """Open the platform and serve until SIGINT/SIGTERM."""
    configure_logging(settings)
    raise_open_files(settings.max_concurrency)
    platform = Platform(settings)
    if settings.auth:
        made = platform.keys.bootstrap(platform.admin_key_file)
        if made is not None:
            log.warning("first start: an admin API key was written to %s (mode 0600); "
                        "the CLI on this machine uses it, or send it as 'Authorization: Bearer <key>'",
                        made.resolve())
    else:
        log.warning("authentication is OFF (--no-auth): anyone who reaches %s:%d may deploy and "
                    "run code; for local development only", settings.host, settings.port)
    app = create_app(platform, create_console(platform))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop", http=HttpProtocol,
        log_level="warning", access_log=False, lifespan="on",
        # json: uvicorn's loggers reach the root logger's JSON handler instead of its own text ones
        log_config=None if settings.log_format == "json" else LOGGING_CONFIG,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key,
    )
    server = uvicorn.Server(config)
    facts = platform.describe()
    extra = "".join(f", {k}: {v}" for k, v in facts.items()
                    if k not in ("store", "sandbox", "unsafe", "runtimes"))
    log.info(
        "Impuls listening on %s://%s:%d (store: %s, data dir: %s, sandbox: %s%s%s)",
        settings.scheme, settings.host, settings.port, platform.store_description(),
        settings.data_dir.resolve(), facts["sandbox"],
        " UNSAFE for untrusted code" if facts["unsafe"] else "", extra,
    )
    try:
        server.run()
    finally:
        platform.close()
