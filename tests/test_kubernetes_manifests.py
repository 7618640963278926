"""deploy/kubernetes/ is valid Kubernetes, by the schemas kubernetes-validate bundles (offline),
for the oldest and the newest release it knows, strictly (an unknown field is an error); and
the manifests hold together: what the pods reference exists, the Service reaches the nodes,
the probes ask /health, and the nodes get no host namespace, host path or API token."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

validate = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is a dev "
                               "dependency (pip install -e '.[dev]')")

MANIFESTS = ROOT / "deploy" / "kubernetes"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in _documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_every_manifest_is_valid_for_the_oldest_and_newest_kubernetes_known() -> None:
    docs = _documents()
    assert {doc["kind"] for _, doc in docs} >= {"Namespace", "Secret", "Deployment", "Service", "StatefulSet",
                                                "ServiceAccount"}
    versions = validate.all_versions()
    for version in (versions[0], versions[-1]):
        for filename, doc in docs:
            try:
                validate.validate(doc, version, strict=True)
            except validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']} is not valid for "
                            f"Kubernetes {version}: {path}: {exc.message}")


def test_the_nodes_get_what_the_sandbox_needs_and_what_they_share() -> None:
    deployment = _one("Deployment", "impuls")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in volume for volume in pod.get("volumes", []))
    assert pod["automountServiceAccountToken"] is False

    secret = _one("Secret", "impuls")
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("IMPULS_DATABASE_URL", "database-url"), ("IMPULS_ADMIN_KEY", "admin-key"),
                      ("IMPULS_SERVER_SECRET", "server-secret")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "impuls" and ref["key"] == key and key in secret["stringData"], name
    assert env["IMPULS_SANDBOX"]["value"] == "namespace" and env["IMPULS_HOST"]["value"] == "0.0.0.0"
    assert "$(POD_IP)" in env["IMPULS_ADVERTISE_ADDRESS"]["value"]

    service = _one("Service", "impuls")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert [p["name"] for p in container["ports"]] == ["http"]

    postgres = _one("StatefulSet", "impuls-postgres")
    db_service = _one("Service", postgres["spec"]["serviceName"])
    assert db_service["spec"]["selector"] == postgres["spec"]["template"]["metadata"]["labels"]
    assert "@impuls-postgres:5432/" in secret["stringData"]["database-url"]
    namespaces = {doc["metadata"].get("namespace") for _, doc in _documents() if doc["kind"] != "Namespace"}
    assert namespaces == {_one("Namespace", "impuls")["metadata"]["name"]}
