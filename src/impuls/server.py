"""Running the HTTP server (uvicorn) around a :class:`~impuls.platform.Platform`."""

from __future__ import annotations

import logging

import uvicorn

from impuls.api.app import create_app
from impuls.config import Settings
from impuls.platform import Platform

log = logging.getLogger("impuls")


def serve(settings: Settings) -> None:
    """Open the platform and serve until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
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
    app = create_app(platform)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False, lifespan="on",
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
