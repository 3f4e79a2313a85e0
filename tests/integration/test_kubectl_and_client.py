"""The real kubectl and the official Kubernetes Python client against a running `meshctl serve`.

Every step is what a user types: discovery (`api-resources`, `get vs -A`), client-side apply of a
file and of a changed file, `diff` (a server-side dry run), `label`, `get -l`, server-side apply
with a conflict and with `--force-conflicts`, `get -w` seeing changes, `delete`, `explain`.  The
Python client does merge and JSON patches, selectors, `limit`/`continue` and watches with
`timeout_seconds` and bookmarks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from controlplane.testing import ControlPlaneProcess

G, V, PLURAL = "networking.istio.io", "v1", "virtualservices"


def vs_yaml(hosts=("reviews",), labels=None) -> str:
    return yaml.safe_dump({"apiVersion": f"{G}/{V}", "kind": "VirtualService",
                           "metadata": {"name": "reviews", "labels": labels or {"app": "reviews"}},
                           "spec": {"hosts": list(hosts), "http": [{"route": [{"destination": {"host": "reviews"}}]}]}})


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    with ControlPlaneProcess(f"sqlite:{tmp_path_factory.mktemp('kube') / 'cp.db'}") as proc:
        yield proc


@pytest.fixture(scope="module")
def kubectl(cp, tmp_path_factory):
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.fail("kubectl is not installed: scripts/setup.sh installs it (Debian package kubectl)")
    home = tmp_path_factory.mktemp("kubehome")
    env = {**os.environ, "KUBECONFIG": str(home / "none"), "HOME": str(home)}

    def run(*args, stdin: str | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        done = subprocess.run([binary, "--server", cp.url, *args], input=stdin, capture_output=True, text=True,
                              env=env, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done

    run.binary, run.env, run.server = binary, env, cp.url
    return run


@pytest.fixture(scope="module")
def client(cp):
    from kubernetes import client as k8s
    config = k8s.Configuration()
    config.host = cp.url
    return k8s.CustomObjectsApi(k8s.ApiClient(config))


def test_kubectl_discovers_the_istio_kinds_and_lists_them(kubectl):
    resources = kubectl("api-resources", "--api-group", G).stdout.splitlines()
    assert resources[0].split() == ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
    assert ["virtualservices", "vs", f"{G}/v1", "true", "VirtualService"] in [r.split() for r in resources]
    listed = kubectl("get", "vs", "-A")
    assert listed.stderr.strip() == "No resources found" and listed.stdout == ""
    assert kubectl("version", "-o", "json", check=False).stdout and \
        json.loads(kubectl("get", "--raw", "/version").stdout)["major"] == "1"


def test_kubectl_apply_diff_label_server_side_apply_and_delete(kubectl, tmp_path):
    original, changed = tmp_path / "vs.yaml", tmp_path / "vs2.yaml"
    original.write_text(vs_yaml())
    changed.write_text(vs_yaml(hosts=("reviews", "reviews.example.com")))

    assert kubectl("apply", "-f", str(original)).stdout.strip() == f"virtualservice.{G}/reviews created"
    table = kubectl("get", "vs").stdout.splitlines()
    assert table[0].split() == ["NAME", "GATEWAYS", "HOSTS", "AGE"]
    name, hosts, age = table[1].split()
    assert (name, hosts) == ("reviews", '["reviews"]') and age.endswith("s")

    diff = kubectl("diff", "-f", str(changed), check=False)
    assert diff.returncode == 1, diff.stderr                 # 1: differences found
    assert "+  - reviews.example.com" in diff.stdout
    assert kubectl("get", "vs", "reviews", "-o", "jsonpath={.spec.hosts}").stdout == '["reviews"]'   # dry run only

    assert kubectl("apply", "-f", str(changed)).stdout.strip() == f"virtualservice.{G}/reviews configured"
    assert kubectl("diff", "-f", str(changed), check=False).returncode == 0
    kubectl("label", "vs", "reviews", "tier=backend")
    assert kubectl("get", "vs", "-l", "tier=backend", "-o", "name").stdout.strip() == f"virtualservice.{G}/reviews"
    assert kubectl("get", "vs", "-l", "tier!=backend", "-o", "name").stdout.strip() == ""
    assert kubectl("get", "vs", "--field-selector", "metadata.name=reviews", "-o", "name").stdout.strip() \
        == f"virtualservice.{G}/reviews"

    # server-side apply: the client-side apply owns spec.hosts with another value -> a conflict
    conflict = kubectl("apply", "--server-side", "-f", str(original), check=False)
    assert conflict.returncode != 0 and "conflict" in conflict.stderr.lower() and ".spec.hosts" in conflict.stderr
    assert kubectl("get", "vs", "reviews", "-o", "jsonpath={.spec.hosts}").stdout == '["reviews","reviews.example.com"]'
    forced = kubectl("apply", "--server-side", "--force-conflicts", "-f", str(original))
    assert forced.stdout.strip() == f"virtualservice.{G}/reviews serverside-applied"
    obj = json.loads(kubectl("get", "vs", "reviews", "-o", "json", "--show-managed-fields").stdout)
    assert obj["spec"]["hosts"] == ["reviews"]
    owners = {e["manager"]: e for e in obj["metadata"]["managedFields"]}
    assert owners["kubectl"]["operation"] == "Apply" and "f:hosts" in owners["kubectl"]["fieldsV1"]["f:spec"]
    assert "f:hosts" not in owners["kubectl-client-side-apply"]["fieldsV1"].get("f:spec", {})
    assert owners["kubectl-label"]["fieldsV1"] == {"f:metadata": {"f:labels": {"f:tier": {}}}}

    assert kubectl("delete", "vs", "reviews").stdout.strip() == f'virtualservice.{G} "reviews" deleted'
    gone = kubectl("get", "vs", "reviews", check=False)
    assert gone.returncode == 1 and f'virtualservices.{G} "reviews" not found' in gone.stderr


def test_kubectl_get_watch_prints_each_change(kubectl, tmp_path):
    import queue
    import threading
    manifest = tmp_path / "vs.yaml"
    manifest.write_text(vs_yaml())
    kubectl("apply", "-f", str(manifest))
    watcher = subprocess.Popen([kubectl.binary, "--server", kubectl.server, "get", "vs", "-w", "--output-watch-events"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kubectl.env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in watcher.stdout], daemon=True).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=15)
        except queue.Empty:
            raise AssertionError(f"kubectl get -w printed nothing more within 15 s; stderr: {watcher.stderr.read()}")

    try:
        seen = [next_line(), next_line()]
        kubectl("label", "vs", "reviews", "tier=web")
        seen.append(next_line())
        kubectl("delete", "vs", "reviews")
        seen.append(next_line())
    finally:
        watcher.kill()
        watcher.wait(5)
    assert [line.split()[:2] for line in seen] == [
        ["EVENT", "NAME"], ["ADDED", "reviews"], ["MODIFIED", "reviews"], ["DELETED", "reviews"]], seen


def test_kubectl_explain_reads_the_schema_the_decoder_enforces(kubectl):
    explained = kubectl("explain", "virtualservice.spec").stdout
    assert "GROUP:      networking.istio.io" in explained and "KIND:       VirtualService" in explained
    assert "FIELD: spec <Object>" in explained
    fields = {line.split()[0] for line in explained.split("FIELDS:", 1)[1].splitlines() if line.strip()
              and not line.startswith("    ")}
    assert {"hosts", "gateways", "http", "tcp", "tls", "exportTo"} <= fields, explained
    retries = kubectl("explain", "virtualservice.spec.http.retries").stdout
    assert "attempts" in retries and "perTryTimeout" in retries, retries


def _body(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "VirtualService", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"hosts": [name], "http": [{"route": [{"destination": {"host": name}}]}]}}


def test_python_client_patches_selects_pages_and_watches(client):
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException
    for name in ("pc-a", "pc-b", "pc-c"):
        client.create_namespaced_custom_object(G, V, "pyclient", PLURAL, _body(name, {"team": "blue"}))

    merged = client.patch_namespaced_custom_object(G, V, "pyclient", PLURAL, "pc-a",
                                                   {"metadata": {"labels": {"team": "red"}}})
    assert merged["metadata"]["labels"] == {"team": "red"}
    client.api_client.set_default_header("Content-Type", "application/json-patch+json")
    try:
        patched = client.patch_namespaced_custom_object(
            G, V, "pyclient", PLURAL, "pc-b", [{"op": "add", "path": "/spec/hosts/-", "value": "pc-b.example.com"}])
    finally:
        client.api_client.default_headers.pop("Content-Type")
    assert patched["spec"]["hosts"] == ["pc-b", "pc-b.example.com"]
    with pytest.raises(ApiException) as invalid:
        client.patch_namespaced_custom_object(G, V, "pyclient", PLURAL, "pc-c", {"spec": {"http": [
            {"route": [{"destination": {"host": "pc-c"}, "weight": -5}]}]}})
    assert invalid.value.status == 422 and "spec.http[0].route[0].weight" in invalid.value.body
    assert client.get_namespaced_custom_object(G, V, "pyclient", PLURAL, "pc-c")["spec"]["http"][0]["route"] == [
        {"destination": {"host": "pc-c"}}]

    names = lambda listing: [o["metadata"]["name"] for o in listing["items"]]
    assert names(client.list_namespaced_custom_object(G, V, "pyclient", PLURAL, label_selector="team=blue")) == ["pc-b", "pc-c"]
    assert names(client.list_namespaced_custom_object(G, V, "pyclient", PLURAL, label_selector="team notin (blue)")) == ["pc-a"]
    first = client.list_namespaced_custom_object(G, V, "pyclient", PLURAL, limit=2)
    assert names(first) == ["pc-a", "pc-b"] and first["metadata"]["remainingItemCount"] == 1
    rest = client.list_namespaced_custom_object(G, V, "pyclient", PLURAL, limit=2, _continue=first["metadata"]["continue"])
    assert names(rest) == ["pc-c"] and not rest["metadata"].get("continue")
    with pytest.raises(ApiException) as bad:
        client.list_namespaced_custom_object(G, V, "pyclient", PLURAL, field_selector="spec.hosts=x")
    assert bad.value.status == 400

    # a watch without bookmarks never sees one, and ends when timeout_seconds says
    started = time.monotonic()
    events = list(watch.Watch().stream(client.list_namespaced_custom_object, G, V, "pyclient", PLURAL,
                                       label_selector="team=blue", timeout_seconds=2))
    assert 1.5 < time.monotonic() - started < 6
    # in resourceVersion order: pc-b was patched after pc-c was created
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "pc-c"), ("ADDED", "pc-b")]

    # resume from a resourceVersion: only what changed after it
    since = client.list_namespaced_custom_object(G, V, "pyclient", PLURAL)["metadata"]["resourceVersion"]
    client.delete_namespaced_custom_object(G, V, "pyclient", PLURAL, "pc-c")
    client.patch_namespaced_custom_object(G, V, "pyclient", PLURAL, "pc-a", {"metadata": {"labels": {"team": "blue"}}})
    resumed = list(watch.Watch().stream(client.list_namespaced_custom_object, G, V, "pyclient", PLURAL,
                                        resource_version=since, timeout_seconds=1, allow_watch_bookmarks=True))
    changes = [(e["type"], e["object"]["metadata"].get("name")) for e in resumed if e["type"] != "BOOKMARK"]
    assert changes == [("DELETED", "pc-c"), ("MODIFIED", "pc-a")]
    assert all(e["object"]["metadata"].get("resourceVersion") for e in resumed)


def test_kubectl_over_the_tls_api_with_a_bearer_token(kubectl, tmp_path):
    """The secured control plane (TLS from the mesh CA, bearer tokens): kubectl with the CA
    bundle and the admin token from meshctl's credentials file; without a token it is refused."""
    with ControlPlaneProcess(f"sqlite:{tmp_path / 'tls.db'}", tls=True) as cp:
        creds = cp.credentials_data()
        ca = tmp_path / "ca.pem"
        ca.write_text(creds["ca"])
        base = [kubectl.binary, "--server", cp.url, "--certificate-authority", str(ca)]
        manifest = tmp_path / "vs.yaml"
        manifest.write_text(vs_yaml())
        run = lambda *args: subprocess.run([*base, *args], capture_output=True, text=True, env=kubectl.env, timeout=30)
        applied = run("--token", creds["token"], "apply", "-f", str(manifest))
        assert applied.returncode == 0 and applied.stdout.strip() == f"virtualservice.{G}/reviews created", applied.stderr
        listed = run("--token", creds["token"], "get", "vs", "-o", "name")
        assert listed.stdout.strip() == f"virtualservice.{G}/reviews"
        anonymous = run("get", "vs")                  # kubectl answers a 401 by asking for a user name
        assert anonymous.returncode != 0 and "Please enter Username" in anonymous.stdout, anonymous


def test_kubectl_applies_a_tls_secret_and_never_reads_its_data_back(kubectl, tmp_path):
    """core v1 Secrets (Gateway credentialName): kubectl's discovery, validation and client-side
    apply (a strategic merge patch the second time), `get` with Istio's TYPE/DATA columns, and
    no data in what it reads back."""
    from mtls import MeshCA
    issued = MeshCA("kubectl secret root").issue(dns=("shop.example.com",))
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    crt.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    made = kubectl("create", "secret", "tls", "shop-cred", f"--cert={crt}", f"--key={key}", "--dry-run=client",
                   "-o", "yaml").stdout
    (tmp_path / "secret.yaml").write_text(made)
    assert kubectl("apply", "-f", str(tmp_path / "secret.yaml")).stdout.strip() == "secret/shop-cred created"
    again = kubectl("apply", "-f", str(tmp_path / "secret.yaml")).stdout.strip()
    assert again in ("secret/shop-cred configured", "secret/shop-cred unchanged"), again
    table = kubectl("get", "secrets").stdout.split()
    assert table[:8] == ["NAME", "TYPE", "DATA", "AGE", "shop-cred", "kubernetes.io/tls", "2", table[7]], table
    shown = kubectl("get", "secret", "shop-cred", "-o", "yaml").stdout
    assert "type: kubernetes.io/tls" in shown and "\ndata:" not in shown and "LS0tLS1CRUdJTi" not in shown, shown
    assert kubectl("delete", "secret", "shop-cred").stdout.strip() == 'secret "shop-cred" deleted'
