"""Real web frameworks behind function URLs: each is deployed as a real package (a zip with its
own dependency file, built by Impuls at deploy: ``requirements.txt`` pip-installed from PyPI,
``package.json`` npm-installed from the npm registry, exact versions pinned) and driven over
its URL as a browser or curl would.

- AWS Lambda Powertools for Python: ``LambdaFunctionUrlResolver``;
- FastAPI behind Mangum;
- Express behind serverless-http.

Each app has the same routes: ``GET /hello?name=`` (a query parameter), ``GET /items/{id}?q=``
(a path parameter), ``POST /items`` (a JSON body, answered 201) and nothing else (the
framework's own 404).  One module-scoped server; one deploy per framework.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Server, make_zip, unique
from tests.url_fixtures import TIMEOUT, public_client, url_config_path

#: the exact versions the packages pin (checked to exist and to run on Python 3.11 / Node.js 20)
POWERTOOLS = "aws-lambda-powertools==3.37.0"
FASTAPI_REQUIREMENTS = "fastapi==0.163.2\nmangum==0.22.0\nstarlette==1.10.0\npydantic==2.14.3\n"
EXPRESS_DEPENDENCIES = {"express": "5.3.0", "serverless-http": "4.0.0"}
URL_DOMAIN = "fn.example.com"
#: a build installs from a registry: minutes are allowed, never asserted
BUILD_TIMEOUT = 900.0

POWERTOOLS_APP = """
from aws_lambda_powertools.event_handler import LambdaFunctionUrlResolver

app = LambdaFunctionUrlResolver()


@app.get("/hello")
def hello():
    name = app.current_event.get_query_string_value(name="name", default_value="world")
    return {"message": f"hello {name}", "framework": "powertools"}


@app.get("/items/<item_id>")
def get_item(item_id: str):
    return {"item_id": item_id, "q": app.current_event.get_query_string_value(name="q")}


@app.post("/items")
def create_item():
    return {"created": app.current_event.json_body}, 201


def handler(event, context):
    return app.resolve(event, context)
"""

FASTAPI_APP = """
from fastapi import FastAPI
from mangum import Mangum
from pydantic import BaseModel

app = FastAPI()


class Item(BaseModel):
    name: str
    price: float


@app.get("/hello")
def hello(name: str = "world"):
    return {"message": f"hello {name}", "framework": "fastapi"}


@app.get("/items/{item_id}")
def get_item(item_id: int, q: str | None = None):
    return {"item_id": item_id, "q": q}


@app.post("/items", status_code=201)
def create_item(item: Item):
    return {"created": item.model_dump()}


handler = Mangum(app, lifespan="off")
"""

EXPRESS_APP = """
const express = require("express");
const serverless = require("serverless-http");

const app = express();
app.use(express.json());
app.get("/hello", (req, res) =>
  res.json({ message: `hello ${req.query.name || "world"}`, framework: "express" }));
app.get("/items/:id", (req, res) => res.json({ item_id: req.params.id, q: req.query.q ?? null }));
app.post("/items", (req, res) => res.status(201).json({ created: req.body }));
app.get("/login", (req, res) => {
  res.cookie("session", "abc123", { httpOnly: true });
  res.cookie("theme", "dark");
  res.json({ ok: true });
});
app.get("/whoami", (req, res) => res.json({ cookie: req.headers.cookie ?? null }));

exports.handler = serverless(app);
"""


def _not_found_powertools(r: httpx.Response) -> None:
    assert r.json()["message"] == "Not found", r.text


def _not_found_fastapi(r: httpx.Response) -> None:
    assert r.json() == {"detail": "Not Found"}, r.text


def _not_found_express(r: httpx.Response) -> None:
    assert "Cannot GET /no/such/route" in r.text, r.text


@dataclass(frozen=True)
class Framework:
    id: str
    runtime: str
    handler: str
    files: dict[str, str]
    #: the path parameter as the framework gives it back ("42", or 42 once FastAPI converted it)
    item_id: Any
    not_found: Callable[[httpx.Response], None]


FRAMEWORKS = [
    Framework("powertools", "python3.11", "app.handler",
              {"app.py": POWERTOOLS_APP, "requirements.txt": POWERTOOLS + "\n"}, "42", _not_found_powertools),
    Framework("fastapi", "python3.11", "main.handler",
              {"main.py": FASTAPI_APP, "requirements.txt": FASTAPI_REQUIREMENTS}, 42, _not_found_fastapi),
    Framework("express", "nodejs20", "index.handler",
              {"index.js": EXPRESS_APP,
               "package.json": json.dumps({"name": "express-url-app", "version": "1.0.0", "private": True,
                                           "dependencies": EXPRESS_DEPENDENCIES})},
              "42", _not_found_express),
]
BY_ID = {f.id: f for f in FRAMEWORKS}


@pytest.fixture(scope="module")
def fw_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module (builds take a while), with routing by Host under URL_DOMAIN."""
    data: Path = tmp_path_factory.mktemp("frameworks") / "data"
    srv = Server(data, env={"IMPULS_URL_DOMAIN": URL_DOMAIN}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(fw_server: Server) -> Iterator[httpx.Client]:
    """No credentials, no cookie jar: requests carry exactly the headers a test gives."""
    with public_client(fw_server) as client:
        yield client


def deploy_package(server: Server, fw: Framework) -> str:
    """The framework's package, built by Impuls (its dependencies installed from the registry),
    with a public URL; returns the function's name."""
    body = {"name": unique(fw.id), "runtime": fw.runtime, "handler": fw.handler,
            "code_zip": make_zip(fw.files), "memory_mb": 512, "timeout_sec": 60}
    r = server.client.post("/api/v1/functions", json=body, timeout=BUILD_TIMEOUT)
    assert r.status_code == 201, r.text
    fn = r.json()
    assert fn["build"]["status"] == "success", fn["build"]
    r = server.request("POST", url_config_path(fn["name"]), json={"auth_type": "NONE"})
    assert r.status_code == 201, r.text
    return str(fn["name"])


@pytest.fixture(scope="module")
def deploy(fw_server: Server) -> Callable[[str], str]:
    """``deploy(framework id)`` → the function's name; each framework is deployed once (a
    failed build fails every test of that framework at once, without building again)."""
    done: dict[str, str] = {}
    failed: dict[str, str] = {}

    def get(fw_id: str) -> str:
        if fw_id in failed:
            pytest.fail(f"the {fw_id} package did not deploy: {failed[fw_id]}")
        if fw_id not in done:
            try:
                done[fw_id] = deploy_package(fw_server, BY_ID[fw_id])
            except (AssertionError, httpx.HTTPError) as exc:
                failed[fw_id] = str(exc)
                raise
        return done[fw_id]

    return get


@pytest.fixture(params=[f.id for f in FRAMEWORKS])
def deployed(request: pytest.FixtureRequest, deploy: Callable[[str], str]) -> tuple[Framework, str]:
    return BY_ID[request.param], deploy(request.param)


def test_routes_and_query_parameter(browser: httpx.Client, deployed: tuple[Framework, str]) -> None:
    fw, name = deployed
    r = browser.get(f"/fn/{name}/hello")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert r.json() == {"message": "hello world", "framework": fw.id}
    r = browser.get(f"/fn/{name}/hello", params={"name": "ada"})
    assert r.status_code == 200 and r.json() == {"message": "hello ada", "framework": fw.id}, r.text


def test_path_parameter(browser: httpx.Client, deployed: tuple[Framework, str]) -> None:
    fw, name = deployed
    r = browser.get(f"/fn/{name}/items/42", params={"q": "blue"})
    assert r.status_code == 200, r.text
    assert r.json() == {"item_id": fw.item_id, "q": "blue"}
    r = browser.get(f"/fn/{name}/items/42")
    assert r.status_code == 200 and r.json() == {"item_id": fw.item_id, "q": None}, r.text


def test_post_body(browser: httpx.Client, deployed: tuple[Framework, str]) -> None:
    _, name = deployed
    item = {"name": "fountain pen", "price": 12.5}
    r = browser.post(f"/fn/{name}/items", json=item)
    assert r.status_code == 201, r.text
    assert r.json() == {"created": item}


def test_framework_404(browser: httpx.Client, deployed: tuple[Framework, str]) -> None:
    fw, name = deployed
    r = browser.get(f"/fn/{name}/no/such/route")
    assert r.status_code == 404, r.text
    fw.not_found(r)


def test_fastapi_validation_error(browser: httpx.Client, deploy: Callable[[str], str]) -> None:
    name = deploy("fastapi")
    r = browser.post(f"/fn/{name}/items", json={"name": "no price"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "price"], r.text


def test_fastapi_at_the_root_of_its_own_host(fw_server: Server, deploy: Callable[[str], str]) -> None:
    name = deploy("fastapi")
    with httpx.Client(base_url=fw_server.url, timeout=TIMEOUT) as client:  # to 127.0.0.1
        r = client.get("/hello", params={"name": "host"}, headers={"Host": f"{name}.{URL_DOMAIN}"})
        assert r.status_code == 200, r.text
        assert r.json() == {"message": "hello host", "framework": "fastapi"}
        r = client.get("/items/7", headers={"Host": f"{name}.{URL_DOMAIN}"})
        assert r.status_code == 200 and r.json() == {"item_id": 7, "q": None}, r.text


def test_express_cookies(browser: httpx.Client, deploy: Callable[[str], str]) -> None:
    name = deploy("express")
    r = browser.get(f"/fn/{name}/login")
    assert r.status_code == 200 and r.json() == {"ok": True}, r.text
    assert r.headers.get_list("set-cookie") == ["session=abc123; Path=/; HttpOnly", "theme=dark; Path=/"]
    r = browser.get(f"/fn/{name}/whoami", headers={"Cookie": "session=abc123; theme=dark"})
    assert r.status_code == 200 and r.json() == {"cookie": "session=abc123; theme=dark"}, r.text
