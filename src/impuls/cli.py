"""The ``impuls`` command: run the server, and manage functions over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import ssl
import sys
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from rich.console import Console
from rich.table import Table

from impuls import __version__
from impuls.config import Settings
from impuls.errors import ImpulsError
from impuls.sandbox.microvm.images import GUEST_RUNTIMES

# piped output is never cut to 80 columns: scripts grep it
console = Console(width=None if sys.stdout.isatty() else 10_000)
err_console = Console(stderr=True, soft_wrap=True)
SKIP_DIRS = {"__pycache__", ".git", ".impuls", ".venv"}


def fail(message: str) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    sys.exit(1)


class Client:
    """A thin HTTP client for the REST API; every failure becomes ``fail``."""

    def __init__(self, url: str, api_key: str, ca_cert: Path | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify: ssl.SSLContext | bool = True
        if ca_cert is not None:
            verify = ssl.create_default_context(cafile=str(ca_cert))
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(930.0, connect=5.0),
                                 headers=headers, verify=verify)

    def call(self, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kw: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the Impuls server at {self.url}: {exc}")
        if resp.status_code not in ok:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            fail(f"{resp.status_code}: {message}")
        return resp.json() if resp.content else None

    def exists(self, name: str) -> bool:
        return self.call("GET", f"/api/v1/functions/{name}", ok=(200, 404)).get("error") is not True


pass_client = click.make_pass_decorator(Client)


def _resolve_api_key(given: str | None) -> str:
    """``--api-key`` (or IMPULS_API_KEY), else the admin key a local server wrote at its first
    start (``<data dir>/admin-key``, data dir from IMPULS_DATA_DIR or ./.impuls), else none."""
    if given:
        return given
    from impuls import config

    try:
        return (config.load().data_dir / "admin-key").read_text().strip()
    except (OSError, ImpulsError):
        return ""


@click.group()
@click.version_option(__version__)
@click.option("--url", envvar="IMPULS_URL", default="http://127.0.0.1:8080", show_default=True,
              help="Impuls server URL, http:// or https:// (IMPULS_URL)")
@click.option("--api-key", envvar="IMPULS_API_KEY", default=None,
              help="API key (IMPULS_API_KEY; default: <data dir>/admin-key of a local server)")
@click.option("--ca-cert", envvar="IMPULS_CA_CERT", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), default=None, help="CA certificate to trust for https:// (IMPULS_CA_CERT)")
@click.pass_context
def main(ctx: click.Context, url: str, api_key: str | None, ca_cert: Path | None) -> None:
    """Impuls: a self-hosted serverless function platform."""
    ctx.obj = Client(url, _resolve_api_key(api_key), ca_cert)


@main.command()
@click.option("--host", default=None, help="listen address (IMPULS_HOST, default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="listen port (IMPULS_PORT, default 8080)")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="data directory (IMPULS_DATA_DIR, default ./.impuls)")
@click.option("--sandbox", type=click.Choice(["auto", "process", "namespace", "microvm"]),
              default=None, help="isolation for functions (IMPULS_SANDBOX, default auto: the strongest)")
@click.option("--allow-local", is_flag=True, default=None,
              help="accept ?local=true, which runs code UNSANDBOXED on the host (IMPULS_ALLOW_LOCAL=1)")
@click.option("--no-auth", is_flag=True, default=None,
              help="no API keys: local development only, refused unless bound to loopback (IMPULS_AUTH=off)")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="serve HTTPS with this certificate (PEM; IMPULS_TLS_CERT)")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the certificate's private key (PEM; IMPULS_TLS_KEY)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="the server's own logs: text lines or one JSON object per line "
                   "(IMPULS_LOG_FORMAT, default text)")
@click.option("--metrics-public", is_flag=True, default=None,
              help="serve GET /metrics without a key (IMPULS_METRICS_PUBLIC=1; default: a key "
                   "with read scope)")
def server(host: str | None, port: int | None, data_dir: Path | None, sandbox: str | None,
           allow_local: bool | None, no_auth: bool | None, tls_cert: Path | None,
           tls_key: Path | None, log_format: str | None, metrics_public: bool | None) -> None:
    """Run the Impuls HTTP API server."""
    from impuls import config
    from impuls.server import serve

    try:
        settings = config.load({"host": host, "port": port, "data_dir": data_dir,
                                "sandbox": sandbox, "allow_local": allow_local or None,
                                "auth": False if no_auth else None, "tls_cert": tls_cert,
                                "tls_key": tls_key, "log_format": log_format,
                                "metrics_public": metrics_public or None})
        serve(settings)
    except ImpulsError as exc:
        fail(exc.message)


def _package(path: Path) -> dict[str, str]:
    """The code fields for ``path``: a single file as ``code``, a folder or .zip as ``code_zip``."""
    if path.is_file():
        if path.suffix == ".zip":
            return {"code_zip": base64.b64encode(path.read_bytes()).decode()}
        return {"code": path.read_text()}
    if not path.is_dir():
        fail(f"{path}: no such file or folder")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in sorted(files):
                full = Path(root) / name
                if full.is_symlink():
                    continue
                zf.write(full, full.relative_to(path).as_posix())
    return {"code_zip": base64.b64encode(buf.getvalue()).decode()}


def _env_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            fail(f"--env {pair!r}: use KEY=VALUE")
        env[key] = value
    return env


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True)
@click.option("--runtime", default=None, help="e.g. python3.11, nodejs20 (required on create)")
@click.option("--handler", default=None, help="module.function (required on create)")
@click.option("--memory", type=int, default=None, help="memory in MB")
@click.option("--timeout", type=int, default=None, help="timeout in seconds")
@click.option("--description", default=None)
@click.option("--env", "env", multiple=True, help="KEY=VALUE, repeatable")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@pass_client
def deploy(client: Client, path: Path, name: str, runtime: str | None, handler: str | None,
           memory: int | None, timeout: int | None, description: str | None,
           env: tuple[str, ...], as_json: bool) -> None:
    """Create or update function NAME from PATH (a file or a folder)."""
    body: dict[str, Any] = {
        "runtime": runtime, "handler": handler, "memory_mb": memory, "timeout_sec": timeout,
        "description": description,
    }
    body = {k: v for k, v in body.items() if v is not None}
    if env:
        body["environment"] = _env_pairs(env)
    body.update(_package(path))
    # the server builds the package (compile, dependencies) before it answers
    with err_console.status(f"uploading and building {name}..."):
        if client.exists(name):
            fn = client.call("PATCH", f"/api/v1/functions/{name}", json=body)
            action = "updated"
        else:
            fn = client.call("POST", "/api/v1/functions", json={"name": name, **body})
            action = "created"
    if as_json:
        click.echo(json.dumps(_without_code(fn), indent=2))
    else:
        console.print(f"{action} [bold]{fn['name']}[/bold] ({fn['runtime']}, "
                      f"{fn['code_size']} bytes, sha256 {fn['code_sha256'][:12]}, "
                      f"build: {_build_summary(fn['build'])})", highlight=False)


def _build_summary(build: dict[str, Any]) -> str:
    if build["status"] == "none":
        return "nothing to build"
    return f"{build['status']} in {build['seconds']:.1f} s"


def _without_code(fn: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fn.items() if k not in ("code", "code_zip")}


@main.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", type=int, default=100)
@click.option("--offset", type=int, default=0)
@pass_client
def list_functions(client: Client, as_json: bool, limit: int, offset: int) -> None:
    """List functions."""
    data = client.call("GET", "/api/v1/functions", params={"limit": limit, "offset": offset})
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("NAME", "RUNTIME", "HANDLER", "MEMORY", "TIMEOUT", "STATUS", "UPDATED")
    for fn in data["functions"]:
        table.add_row(fn["name"], fn["runtime"], fn["handler"], f"{fn['memory_mb']} MB",
                      f"{fn['timeout_sec']} s", fn["status"], fn["updated_at"])
    console.print(table)


@main.command("get")
@click.argument("name")
@click.option("--qualifier", "-q", default=None, help="a version number or an alias")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def get_function(client: Client, name: str, qualifier: str | None, as_json: bool) -> None:
    """Show one function (code omitted unless --json)."""
    fn = client.call("GET", f"/api/v1/functions/{name}",
                     params={"qualifier": qualifier} if qualifier else {})
    if as_json:
        click.echo(json.dumps(fn, indent=2))
        return
    table = Table("FIELD", "VALUE", show_header=False)
    for key, value in _without_code(fn).items():
        if key == "environment":
            value = ", ".join(sorted(value)) or "-"
        if key == "build":
            value = _build_summary(value)
        table.add_row(key, str(value))
    console.print(table)
    if fn["build"]["log"]:
        console.print("build log:", highlight=False)
        console.print(fn["build"]["log"], highlight=False, markup=False)


@main.command()
@click.argument("name")
@click.option("--data", default=None, help="the event, as JSON")
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="read the event from a JSON file")
@click.option("--local", is_flag=True, help="run unsandboxed (the server must allow it)")
@click.option("--qualifier", "-q", default=None, help="a version number, an alias or $LATEST")
@click.option("-v", "--verbose", is_flag=True, help="also print duration, cold start and logs")
@click.option("--async", "is_async", is_flag=True,
              help="queue the event (durably) and print its request id; see `impuls events`")
@pass_client
def invoke(client: Client, name: str, data: str | None, file: Path | None, local: bool,
           qualifier: str | None, verbose: bool, is_async: bool) -> None:
    """Invoke function NAME and print what it returned (or, with --async, the request id)."""
    if data is not None and file is not None:
        fail("give either --data or --file, not both")
    event = file.read_bytes() if file is not None else (data or "{}").encode()
    params = {"local": "true"} if local else {}
    if qualifier:
        params["qualifier"] = qualifier
    if is_async:
        params["async"] = "true"
        queued = client.call("POST", f"/api/v1/functions/{name}/invoke", ok=(202,), content=event,
                             params=params, headers={"Content-Type": "application/json"})
        click.echo(queued["request_id"])
        return
    doc = client.call("POST", f"/api/v1/functions/{name}/invoke", ok=(200, 502, 504),
                      content=event, params=params, headers={"Content-Type": "application/json"})
    if verbose:
        err_console.print(f"request {doc['request_id']}  {doc['duration_ms']:.2f} ms  "
                          f"{'cold' if doc['cold_start'] else 'warm'} start  "
                          f"version {doc['executed_version']}", highlight=False)
        if doc.get("logs"):
            err_console.print(doc["logs"].rstrip("\n"), highlight=False, markup=False)
    if doc["status_code"] == 200:
        click.echo(json.dumps(doc["body"], indent=2))
        return
    fail(f"{doc['error_type']}: {doc['error']}")


@main.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="stream new output as it is written")
@click.option("--limit", type=int, default=20, help="how many recent invocations")
@pass_client
def logs(client: Client, name: str, follow: bool, limit: int) -> None:
    """Print the logs of function NAME's recent invocations (or follow them live)."""
    if not follow:
        for entry in client.call("GET", f"/api/v1/functions/{name}/logs", params={"limit": limit})["logs"]:
            click.echo(f"--- {entry['started_at']} {entry['request_id']}")
            click.echo(entry["logs"], nl=not entry["logs"].endswith("\n"))
        return
    client.call("GET", f"/api/v1/functions/{name}")  # a clear 404 before streaming
    try:
        with client.http.stream("GET", f"/api/v1/functions/{name}/logs", params={"follow": "true"},
                                timeout=httpx.Timeout(None, connect=5.0)) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    click.echo(json.loads(line[6:])["text"], nl=False)
    except httpx.HTTPError as exc:
        fail(f"log stream ended: {exc}")
    except KeyboardInterrupt:
        pass


@main.command("rm")
@click.argument("name")
@click.option("--version", "version", default=None, help="delete only this published version")
@pass_client
def remove(client: Client, name: str, version: str | None) -> None:
    """Delete a function (with its versions and aliases), or one of its versions."""
    client.call("DELETE", f"/api/v1/functions/{name}", params={"qualifier": version} if version else {})
    console.print(f"deleted {name}" + (f" version {version}" if version else ""))




@main.command()
@click.argument("name")
@click.option("--description", default=None, help="the version's description (default: the function's)")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def publish(client: Client, name: str, description: str | None, as_json: bool) -> None:
    """Publish function NAME's current code and configuration as a new version."""
    body = {"description": description} if description is not None else {}
    fn = client.call("POST", f"/api/v1/functions/{name}/versions", json=body)
    if as_json:
        click.echo(json.dumps(fn, indent=2))
        return
    console.print(f"published [bold]{name}[/bold] version {fn['version']} "
                  f"(sha256 {fn['code_sha256'][:12]})", highlight=False)


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def versions(client: Client, name: str, as_json: bool) -> None:
    """List function NAME's versions ($LATEST first)."""
    data = client.call("GET", f"/api/v1/functions/{name}/versions")["versions"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("VERSION", "SHA256", "DESCRIPTION", "STATE", "LAST MODIFIED")
    for fn in data:
        table.add_row(fn["version"], fn["code_sha256"][:12], fn["description"], fn["state"],
                      fn["updated_at"])
    console.print(table)


def _routing(pairs: tuple[str, ...]) -> dict[str, float]:
    routing = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        try:
            if not sep:
                raise ValueError(pair)
            routing[version] = float(weight)
        except ValueError:
            fail(f"--routing {pair!r}: use VERSION=WEIGHT with a weight from 0.0 to 1.0")
    return routing


def _print_alias(alias: dict[str, Any], as_json: bool, action: str) -> None:
    if as_json:
        click.echo(json.dumps(alias, indent=2))
        return
    routing = ", ".join(f"{v} at {w:g}" for v, w in alias["routing"].items())
    console.print(f"{action} alias [bold]{alias['function_name']}:{alias['name']}[/bold] → version "
                  f"{alias['function_version']}" + (f" (and {routing})" if routing else ""), highlight=False)


@main.group()
def alias() -> None:
    """Aliases: names for a version, optionally sharing calls with a second version."""


@alias.command("create")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--version", "version", required=True, help="a version number or $LATEST")
@click.option("--routing", multiple=True, help="VERSION=WEIGHT: send that share of calls (0.0-1.0) "
              "to another version")
@click.option("--description", default="")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def alias_create(client: Client, name: str, alias_name: str, version: str, routing: tuple[str, ...],
                 description: str, as_json: bool) -> None:
    """Create ALIAS of function NAME."""
    body: dict[str, Any] = {"name": alias_name, "function_version": version, "description": description}
    if routing:
        body["routing"] = _routing(routing)
    _print_alias(client.call("POST", f"/api/v1/functions/{name}/aliases", json=body), as_json, "created")


@alias.command("ls")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def alias_ls(client: Client, name: str, as_json: bool) -> None:
    """List function NAME's aliases."""
    data = client.call("GET", f"/api/v1/functions/{name}/aliases")["aliases"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("ALIAS", "VERSION", "ROUTING", "DESCRIPTION", "UPDATED")
    for a in data:
        table.add_row(a["name"], a["function_version"],
                      ", ".join(f"{v}={w:g}" for v, w in a["routing"].items()) or "-",
                      a["description"], a["updated_at"])
    console.print(table)


@alias.command("update")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--version", "version", default=None, help="a version number or $LATEST")
@click.option("--routing", multiple=True, help="VERSION=WEIGHT (replaces the routing)")
@click.option("--no-routing", is_flag=True, help="send every call to the alias's version")
@click.option("--description", default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_client
def alias_update(client: Client, name: str, alias_name: str, version: str | None, routing: tuple[str, ...],
                 no_routing: bool, description: str | None, as_json: bool) -> None:
    """Change ALIAS of function NAME (what is not given stays)."""
    if routing and no_routing:
        fail("give either --routing or --no-routing, not both")
    body: dict[str, Any] = {}
    if version is not None:
        body["function_version"] = version
    if description is not None:
        body["description"] = description
    if routing or no_routing:
        body["routing"] = _routing(routing)
    _print_alias(client.call("PATCH", f"/api/v1/functions/{name}/aliases/{alias_name}", json=body),
                 as_json, "updated")


@alias.command("rm")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@pass_client
def alias_rm(client: Client, name: str, alias_name: str) -> None:
    """Delete ALIAS of function NAME."""
    client.call("DELETE", f"/api/v1/functions/{name}/aliases/{alias_name}")
    console.print(f"deleted alias {name}:{alias_name}")


@main.command()
@click.argument("name")
@click.argument("request_id", required=False)
@click.option("--limit", type=int, default=50)
@click.option("--json", "as_json", is_flag=True)
@pass_client
def events(client: Client, name: str, request_id: str | None, limit: int, as_json: bool) -> None:
    """Asynchronous invocations of function NAME (or one of them, with its attempts)."""
    if request_id:
        doc = client.call("GET", f"/api/v1/functions/{name}/invocations/{request_id}")
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            return
        console.print(f"{doc['request_id']}  {doc['state']}  attempts {doc['attempts']}  "
                      f"duplicates {doc['duplicates']}", highlight=False)
        for h in doc["history"]:
            console.print(f"  {h['attempt']}  {h['started_at']}  {h['outcome']}  "
                          f"{h['error_type'] or ''} {h['error'] or ''}", highlight=False, markup=False)
        return
    doc = client.call("GET", f"/api/v1/functions/{name}/events", params={"limit": limit})
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    table = Table("REQUEST ID", "STATE", "ATTEMPTS", "SOURCE", "CREATED", "ERROR")
    for e in doc["events"]:
        table.add_row(e["request_id"], e["state"], str(e["attempts"]), e["source"], e["created_at"],
                      e["error_type"] or "")
    console.print(table)
    console.print(f"{doc['pending']} pending of {doc['total']}", highlight=False)


@main.command("dead-letters")
@click.argument("name")
@click.option("--redrive", "redrive", default=None, help="queue dead letter ID's event again")
@click.option("--all", "redrive_all", is_flag=True, help="queue every dead letter's event again")
@click.option("--rm", "remove", default=None, help="delete dead letter ID")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def dead_letters(client: Client, name: str, redrive: str | None, redrive_all: bool, remove: str | None,
                 as_json: bool) -> None:
    """The dead letters of function NAME: events that failed or expired, to redrive or delete."""
    base = f"/api/v1/functions/{name}/dead-letters"
    if remove:
        client.call("DELETE", f"{base}/{remove}")
        console.print(f"deleted {remove}")
        return
    letters = client.call("GET", base)["dead_letters"]
    chosen = [x for x in letters if redrive_all or x["id"] == redrive] if (redrive or redrive_all) else []
    if redrive and not chosen:
        fail(f"404: dead letter '{redrive}' not found")
    for letter in chosen:
        queued = client.call("POST", f"{base}/{letter['id']}/redrive", ok=(202,))
        console.print(f"redriven {letter['id']} as {queued['request_id']}", highlight=False)
    if chosen:
        return
    if as_json:
        click.echo(json.dumps(letters, indent=2))
        return
    table = Table("ID", "REQUEST ID", "CONDITION", "CREATED")
    for x in letters:
        table.add_row(x["id"], x["request_id"], x["condition"], x["created_at"])
    console.print(table)


@main.group()
def url() -> None:
    """Function URLs: a function as an HTTP endpoint."""


_QUALIFIER = click.option("--qualifier", default="$LATEST", show_default=True,
                          help="$LATEST or an alias")


def _print_url(config: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(config, indent=2))
        return
    console.print(f"{config['url']}  (auth {config['auth_type']}, {config['invoke_mode']})", highlight=False)


@url.command("create")
@click.argument("name")
@_QUALIFIER
@click.option("--auth-type", type=click.Choice(["NONE", "KEY", "AWS_IAM"]), default="KEY", show_default=True,
              help="NONE: public; KEY: an Impuls key with invoke scope (Bearer) or a signed request")
@click.option("--invoke-mode", type=click.Choice(["BUFFERED", "RESPONSE_STREAM"]), default="BUFFERED",
              show_default=True)
@click.option("--cors-origin", "origins", multiple=True,
              help="an allowed CORS origin (repeatable; * for any)")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def url_create(client: Client, name: str, qualifier: str, auth_type: str, invoke_mode: str,
               origins: tuple[str, ...], as_json: bool) -> None:
    """Give function NAME a URL."""
    body: dict[str, Any] = {"qualifier": qualifier, "auth_type": auth_type, "invoke_mode": invoke_mode}
    if origins:
        body["cors"] = {"allow_origins": list(origins)}
    _print_url(client.call("POST", f"/api/v1/functions/{name}/url", json=body), as_json)


@url.command("get")
@click.argument("name")
@_QUALIFIER
@click.option("--json", "as_json", is_flag=True)
@pass_client
def url_get(client: Client, name: str, qualifier: str, as_json: bool) -> None:
    """Show function NAME's URL."""
    _print_url(client.call("GET", f"/api/v1/functions/{name}/url", params={"qualifier": qualifier}),
               as_json)


@url.command("rm")
@click.argument("name")
@_QUALIFIER
@pass_client
def url_rm(client: Client, name: str, qualifier: str) -> None:
    """Remove function NAME's URL (it answers 404 from then on)."""
    client.call("DELETE", f"/api/v1/functions/{name}/url", params={"qualifier": qualifier})
    console.print(f"removed the URL of {name} ({qualifier})")


@main.group()
def schedules() -> None:
    """Schedules: fire a function on a timetable (rate(...), cron(...), five-field cron)."""


def _print_schedule(schedule: dict[str, Any], as_json: bool, action: str) -> None:
    if as_json:
        click.echo(json.dumps(schedule, indent=2))
        return
    state = f"next {schedule['next_slot']}" if schedule["enabled"] else "disabled"
    console.print(f"{action} schedule [bold]{schedule['function_name']}:{schedule['name']}[/bold] "
                  f"{schedule['expression']} ({schedule['timezone']}, {state})", highlight=False)


@schedules.command("add")
@click.argument("name")
@click.argument("schedule_name", metavar="SCHEDULE")
@click.option("--expression", required=True,
              help="rate(5 minutes), cron(0 12 * * ? *) (EventBridge) or '*/5 * * * *' (five fields)")
@click.option("--timezone", default="UTC", show_default=True, help="an IANA time zone for cron expressions")
@click.option("--payload", default=None, help="the event as JSON (default: EventBridge's scheduled event)")
@click.option("--catch-up", type=click.Choice(["one", "none"]), default="one", show_default=True,
              help="slots missed while the server was down: one event for the newest, or none")
@click.option("--disabled", is_flag=True, help="create it disabled")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def schedules_add(client: Client, name: str, schedule_name: str, expression: str, timezone: str,
                  payload: str | None, catch_up: str, disabled: bool, as_json: bool) -> None:
    """Add SCHEDULE to function NAME."""
    body: dict[str, Any] = {"name": schedule_name, "expression": expression, "timezone": timezone,
                            "catch_up": catch_up, "enabled": not disabled}
    if payload is not None:
        try:
            body["payload"] = json.loads(payload)
        except ValueError as exc:
            fail(f"--payload: not valid JSON ({exc})")
    _print_schedule(client.call("POST", f"/api/v1/functions/{name}/schedules", json=body), as_json, "added")


@schedules.command("ls")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def schedules_ls(client: Client, name: str, as_json: bool) -> None:
    """List function NAME's schedules."""
    data = client.call("GET", f"/api/v1/functions/{name}/schedules")["schedules"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("SCHEDULE", "EXPRESSION", "TIMEZONE", "ENABLED", "CATCH UP", "NEXT SLOT", "LAST SLOT")
    for s in data:
        table.add_row(s["name"], s["expression"], s["timezone"], "yes" if s["enabled"] else "no",
                      s["catch_up"], s["next_slot"] or "-", s["last_slot"] or "-")
    console.print(table)


@schedules.command("rm")
@click.argument("name")
@click.argument("schedule_name", metavar="SCHEDULE")
@pass_client
def schedules_rm(client: Client, name: str, schedule_name: str) -> None:
    """Delete SCHEDULE of function NAME."""
    client.call("DELETE", f"/api/v1/functions/{name}/schedules/{schedule_name}")
    console.print(f"deleted schedule {name}:{schedule_name}")


@main.group()
def keys() -> None:
    """API keys (admin scope): create, list, revoke."""


@keys.command("create")
@click.argument("name")
@click.option("--scope", required=True, type=click.Choice(["admin", "deploy", "invoke", "read"]),
              help="read: list, get, logs; invoke: + invoke; deploy: + create, update, delete; "
                   "admin: + keys, audit")
@click.option("--functions", default="*", show_default=True,
              help="a glob of the function names the key may touch (e.g. 'orders-*')")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def keys_create(client: Client, name: str, scope: str, functions: str, as_json: bool) -> None:
    """Create key NAME; prints the key and its AWS-style credentials, this once."""
    new = client.call("POST", "/api/v1/keys", json={"name": name, "scope": scope, "functions": functions})
    if as_json:
        click.echo(json.dumps(new, indent=2))
        return
    console.print(f"key [bold]{new['name']}[/bold] (scope {new['scope']}, functions "
                  f"{new['functions']}) — shown once, store it now:", highlight=False)
    click.echo(f"  key:                   {new['key']}")
    click.echo(f"  aws_access_key_id:     {new['access_key_id']}")
    click.echo(f"  aws_secret_access_key: {new['secret_access_key']}")


@keys.command("ls")
@click.option("--json", "as_json", is_flag=True)
@pass_client
def keys_ls(client: Client, as_json: bool) -> None:
    """List keys (never their secrets)."""
    data = client.call("GET", "/api/v1/keys")["keys"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("NAME", "SCOPE", "FUNCTIONS", "ACCESS KEY ID", "CREATED", "REVOKED")
    for k in data:
        table.add_row(k["name"], k["scope"], k["functions"], k["access_key_id"], k["created_at"],
                      k["revoked_at"] or "-")
    console.print(table)


@keys.command("revoke")
@click.argument("name")
@pass_client
def keys_revoke(client: Client, name: str) -> None:
    """Revoke key NAME (it stops working within a second)."""
    client.call("DELETE", f"/api/v1/keys/{name}")
    console.print(f"revoked {name}")


@main.command()
@click.option("--limit", type=int, default=50)
@click.option("--json", "as_json", is_flag=True)
@pass_client
def audit(client: Client, limit: int, as_json: bool) -> None:
    """The audit log (admin scope): who changed what, newest first."""
    data = client.call("GET", "/api/v1/audit", params={"limit": limit})
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("TIME", "KEY", "SOURCE", "ACTION", "TARGET")
    for e in data["entries"]:
        table.add_row(e["at"], e["key_name"], e["source"], e["action"], e["target"])
    console.print(table)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@pass_client
def nodes(client: Client, as_json: bool) -> None:
    """The nodes sharing the server's store (admin scope): address, state, heartbeat, work."""
    data = client.call("GET", "/api/v1/nodes")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("NODE", "ADDRESS", "STATE", "LAST BEAT", "SANDBOX", "INSTANCES", "IN FLIGHT", "EVENTS HELD")
    for n in data["nodes"]:
        name = n["id"] + (" (this one)" if n["id"] == data["node"] else "")
        table.add_row(name, n["address"], n["state"], f"{n['seconds_since_heartbeat']:.1f}s ago",
                      n["sandbox"], str(n["instances"]), str(n["inflight"]), str(n["events_held"]))
    console.print(table)
    console.print(f"a node is down after {data['down_after_seconds']:g}s without a heartbeat "
                  f"(one every {data['heartbeat_seconds']:g}s)", highlight=False)


@main.group()
def images() -> None:
    """Guest images of the microvm sandbox: kernel, initramfs, a root filesystem per runtime."""


_IMAGES_DIR = click.option("--images-dir", type=click.Path(path_type=Path), default=None,
                           help="where the images live (IMPULS_IMAGES_DIR, default <data dir>/images)")
_DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                         help="data directory (IMPULS_DATA_DIR, default ./.impuls)")


def _images_settings(images_dir: Path | None, data_dir: Path | None) -> Settings:
    from impuls import config

    return config.load({"images_dir": images_dir, "data_dir": data_dir})


@images.command("build")
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(list(GUEST_RUNTIMES)),
              help="build only these guest runtimes (repeatable; default: all)")
@click.option("--force", is_flag=True, help="rebuild even what is up to date")
@_IMAGES_DIR
@_DATA_DIR
def images_build(runtimes: tuple[str, ...], force: bool, images_dir: Path | None,
                 data_dir: Path | None) -> None:
    """Build the guest images from Debian packages (idempotent: rebuilds only what changed)."""
    from impuls.images import cli as images_cli
    from impuls.images.builder import ImageBuildFailed

    try:
        images_cli.build(console, _images_settings(images_dir, data_dir), runtimes, force)
    except (ImageBuildFailed, ImpulsError) as exc:
        fail(str(exc))


@images.command("ls")
@_IMAGES_DIR
@_DATA_DIR
def images_ls(images_dir: Path | None, data_dir: Path | None) -> None:
    """List the built guest images and snapshots with their sizes."""
    from impuls.images import cli as images_cli

    try:
        root = _images_settings(images_dir, data_dir).images_path
    except ImpulsError as exc:
        fail(str(exc))
    images_cli.listing(console, root)
