"""The Kubernetes-style API and meshctl, against a real `meshctl serve` process on SQLite."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controlplane import cli
from controlplane.cli import Client
from controlplane.testing import ControlPlaneProcess

REPO = Path(__file__).resolve().parents[2]
VS_PATH = "/apis/networking.istio.io/v1/namespaces/default/virtualservices"


def vs(name="reviews", weights=(90, 10), **extra_md) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, **extra_md},
            "spec": {"hosts": [name], "http": [{"route": [
                {"destination": {"host": name, "subset": "v1"}, "weight": weights[0]},
                {"destination": {"host": name, "subset": "v2"}, "weight": weights[1]}]}]}}


@pytest.fixture
def cp(tmp_path):
    with ControlPlaneProcess(f"sqlite:{tmp_path / 'cp.db'}") as proc:
        yield proc


@pytest.fixture
def api(cp):
    return Client(cp.url)


def meshctl(cp, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "MESHCTL_SERVER": cp.url}, cwd=REPO)


def test_put_creates_and_get_returns_the_object_with_its_resource_version(api):
    code, created = api.call("PUT", f"{VS_PATH}/reviews", vs())
    assert code == 201
    assert created["metadata"]["resourceVersion"] == "1"
    code, fetched = api.call("GET", f"{VS_PATH}/reviews")
    assert code == 200
    assert fetched == created
    assert fetched["spec"]["http"][0]["route"][0]["weight"] == 90


def test_update_with_stale_resource_version_gets_409_conflict_and_changes_nothing(api):
    _, first = api.call("PUT", f"{VS_PATH}/reviews", vs())
    _, second = api.call("PUT", f"{VS_PATH}/reviews", vs(weights=(50, 50), resourceVersion=first["metadata"]["resourceVersion"]))
    assert second["metadata"]["resourceVersion"] == "2"
    code, status = api.call("PUT", f"{VS_PATH}/reviews", vs(weights=(0, 100), resourceVersion="1"))
    assert code == 409
    assert status["kind"] == "Status" and status["reason"] == "Conflict"
    _, current = api.call("GET", f"{VS_PATH}/reviews")
    assert current["spec"]["http"][0]["route"][0]["weight"] == 50


def test_post_of_an_existing_name_gets_409_already_exists(api):
    assert api.call("POST", VS_PATH, vs())[0] == 201
    code, status = api.call("POST", VS_PATH, vs())
    assert (code, status["reason"]) == (409, "AlreadyExists")


def test_invalid_resource_is_rejected_with_422_status_naming_every_error_path(api):
    bad = {"apiVersion": "networking.istio.io/v9", "kind": "VirtualService",
           "metadata": {"name": "Bad_Name", "labels": {"a": 1}}, "spec": 3}
    code, status = api.call("POST", VS_PATH, bad)
    assert code == 422
    assert status["reason"] == "Invalid"
    fields = [c["field"] for c in status["details"]["causes"]]
    assert fields == ["apiVersion", "metadata.name", "metadata.labels", "spec"]
    assert all(c["message"].startswith("VirtualService default/Bad_Name: ") for c in status["details"]["causes"])
    assert api.call("GET", VS_PATH)[1]["items"] == []


def test_spec_errors_from_the_proxy_decoder_are_all_returned_with_their_paths(api):
    bad = vs()
    bad["spec"]["http"][0]["route"][0]["weight"] = -5
    bad["spec"]["http"][0]["route"][1]["wieght"] = bad["spec"]["http"][0]["route"][1].pop("weight")
    code, status = api.call("PUT", f"{VS_PATH}/reviews", bad)
    assert code == 422
    causes = status["details"]["causes"]
    assert [c["field"] for c in causes][:2] == ["spec.http[0].route[0].weight", "spec.http[0].route[1].wieght"]
    assert causes[0]["message"] == "VirtualService default/reviews: spec.http[0].route[0].weight: must be >= 0, got -5"
    assert "unknown field" in causes[1]["message"]
    assert api.call("GET", f"{VS_PATH}/reviews")[0] == 404          # nothing stored, nothing pushed


def test_yaml_body_is_accepted_like_json(cp):
    import urllib.request
    body = b"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: ratings\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - destination: {host: ratings}\n"
    req = urllib.request.Request(f"{cp.url}{VS_PATH}/ratings", data=body, method="PUT",
                                 headers={"content-type": "application/yaml"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 201
        assert json.loads(resp.read())["spec"]["hosts"] == ["ratings"]


def test_reapplying_identical_content_creates_no_new_revision(api):
    api.call("PUT", f"{VS_PATH}/reviews", vs())
    _, again = api.call("PUT", f"{VS_PATH}/reviews", vs())
    assert again["metadata"]["resourceVersion"] == "1"
    assert len(api.call("GET", "/history")[1]["items"]) == 1


def test_history_lists_each_change_and_rollback_restores_the_earlier_resources(api):
    api.call("PUT", f"{VS_PATH}/reviews", vs())                       # rev 1
    api.call("PUT", f"{VS_PATH}/reviews", vs(weights=(0, 100)))       # rev 2
    api.call("PUT", f"{VS_PATH}/ratings", vs("ratings"))              # rev 3
    history = api.call("GET", "/history")[1]["items"]
    assert [(e["revision"], e["op"], e["name"]) for e in history] == [
        (3, "create", "ratings"), (2, "update", "reviews"), (1, "create", "reviews")]
    code, result = api.call("POST", "/history/1/rollback")
    assert (code, result["revision"]) == (200, 4)
    _, reviews = api.call("GET", f"{VS_PATH}/reviews")
    assert reviews["spec"]["http"][0]["route"][0]["weight"] == 90
    assert api.call("GET", f"{VS_PATH}/ratings")[0] == 404          # did not exist at revision 1
    assert api.call("POST", "/history/99/rollback")[0] == 400


def test_meshctl_apply_get_diff_delete_round_trip(cp):
    applied = meshctl(cp, "apply", "-f", "configs/")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == [
        "authorizationpolicy.security.istio.io/demo-callers created (resourceVersion 1)",
        "destinationrule.networking.istio.io/demo created (resourceVersion 2)",
        "gateway.networking.istio.io/ingress created (resourceVersion 3)",
        "peerauthentication.security.istio.io/default created (resourceVersion 4)",
        "serviceentry.networking.istio.io/demo created (resourceVersion 5)",
        "virtualservice.networking.istio.io/demo created (resourceVersion 6)"]
    wide = meshctl(cp, "get", "vs", "-o", "wide")
    assert "demo.default.svc.cluster.local:v1=90" in wide.stdout
    diff = meshctl(cp, "diff", "-f", "configs/steps/demo-virtualservice-50-50.yaml")
    assert diff.returncode == 1                                      # like kubectl diff: 1 = differences
    assert "-      weight: 90\n+      weight: 50" in diff.stdout
    assert meshctl(cp, "diff", "-f", "configs/").returncode == 0
    as_json = json.loads(meshctl(cp, "get", "dr", "demo", "-o", "json").stdout)
    assert [s["name"] for s in as_json["spec"]["subsets"]] == ["v1", "v2"]
    deleted = meshctl(cp, "delete", "gateway", "ingress")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    missing = meshctl(cp, "get", "gw", "ingress")
    assert missing.returncode == 1
    assert missing.stderr.strip() == 'error: gateways.networking.istio.io "ingress" not found'


def test_meshctl_apply_of_invalid_input_prints_one_line_per_problem_and_exits_1(cp):
    text = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: Bad_Name}\nspec: 3\n"
            "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n")
    result = meshctl(cp, "apply", "-f", "-", stdin=text)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: <stdin>[1]: kind 'Deployment' is not served by meshctl "
        "(VirtualService, DestinationRule, ServiceEntry, Gateway, Sidecar, AuthorizationPolicy, PeerAuthentication, "
        "Secret, Canary)",
        "error: VirtualService default/Bad_Name: metadata.name: must be a lower-case DNS-1123 subdomain, got 'Bad_Name'",
        "error: VirtualService default/Bad_Name: spec: required, must be a mapping"]


def test_meshctl_reports_an_unreachable_server_in_one_line():
    result = subprocess.run([sys.executable, "-m", "controlplane.cli", "--server", "http://127.0.0.1:1", "history"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: cannot reach the control plane at http://127.0.0.1:1")


def test_meshctl_history_and_rollback(cp, capsys):
    def rollback(*args) -> tuple[int, list[str], str]:     # meshctl in-process: no interpreter start per call
        code = cli.main(["--server", cp.url, "rollback", *args])
        out = capsys.readouterr()
        return code, out.out.splitlines(), out.err.strip()

    meshctl(cp, "apply", "-f", "configs/")
    meshctl(cp, "apply", "-f", "configs/steps/")              # widens the AuthorizationPolicy (7), VS 50/50 (8)
    history = meshctl(cp, "history").stdout.splitlines()
    newest = history[1].split()
    assert (newest[0], newest[3], newest[4], newest[5]) == ("8", "update", "VirtualService", "default/demo")
    rolled = meshctl(cp, "rollback", "7")                     # networking only: no flag, the plan printed
    assert rolled.stdout.splitlines() == ["update virtualservice.networking.istio.io/demo -n default",
                                          "rolled back to revision 7: now at revision 9"], rolled.stderr
    assert "v1=90" in meshctl(cp, "get", "vs", "-o", "wide").stdout

    # STRICT mTLS for a new namespace (10), the shift again (11); undoing the shift must not quietly
    # undo the policies: refused, naming each, nothing written
    api = Client(cp.url)
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "default", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}}
    pa = "/apis/security.istio.io/v1/namespaces/shop/peerauthentications/default"
    assert api.call("PUT", pa, strict)[0] == 201
    assert api.call("PUT", f"{VS_PATH}/demo", yaml.safe_load(
        (REPO / "configs/steps/demo-virtualservice-50-50.yaml").read_text()))[0] == 200
    assert rollback("6") == (1, [], "error: rollback to revision 6 would change security policies (update "
                             "AuthorizationPolicy default/demo-callers; delete PeerAuthentication shop/default); "
                             "nothing was changed: to restore them too, ask with includeSecurity=true "
                             "(meshctl rollback --include-security)")
    plan = ["update authorizationpolicy.security.istio.io/demo-callers -n default",
            "update virtualservice.networking.istio.io/demo -n default",
            "delete peerauthentication.security.istio.io/default -n shop"]
    assert rollback("6", "--include-security", "--dry-run") == (0, plan + [
        "would roll back to revision 6 (dry run: nothing changed, still at revision 11)"], "")
    assert api.call("GET", "/history?limit=1")[1]["items"][0]["revision"] == 11
    assert api.call("GET", pa)[1]["spec"]["mtls"]["mode"] == "STRICT"
    assert rollback("6", "--include-security") == (0, plan + ["rolled back to revision 6: now at revision 12"], "")
    assert api.call("GET", f"{VS_PATH}/demo")[1]["spec"]["http"][0]["route"][0]["weight"] == 90
    assert api.call("GET", pa)[0] == 404


def test_watch_streams_added_modified_and_deleted_events(cp, api):
    import http.client
    api.call("PUT", f"{VS_PATH}/reviews", vs())
    conn = http.client.HTTPConnection("127.0.0.1", cp.port, timeout=5)
    conn.request("GET", f"{VS_PATH}?watch=true")
    resp = conn.getresponse()
    assert resp.status == 200
    events = [json.loads(resp.readline())]
    api.call("PUT", f"{VS_PATH}/reviews", vs(weights=(50, 50)))
    events.append(json.loads(resp.readline()))
    api.call("DELETE", f"{VS_PATH}/reviews")
    events.append(json.loads(resp.readline()))
    conn.close()
    assert [(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in events] == [
        ("ADDED", "1"), ("MODIFIED", "2"), ("DELETED", "3")]


def test_route_to_an_undefined_subset_is_accepted_with_a_warning_naming_the_503(cp, api):
    api.call("POST", "/registry/v1/workloads", {"service": "reviews", "address": "10.0.0.1", "ports": {"http": 9080},
                                               "labels": {"version": "v1"}, "ttl": 60})
    applied = meshctl(cp, "apply", "-f", "-", stdin=yaml_text(vs()))       # subsets v1/v2, but no DestinationRule
    assert applied.returncode == 0
    assert applied.stdout.startswith("virtualservice.networking.istio.io/reviews created")
    warnings = applied.stderr.splitlines()
    assert warnings[0] == ("Warning: VirtualService default/reviews: spec.http[0].route[0].destination.subset: "
                           "subset 'v1' not found in any DestinationRule for host reviews.default.svc.cluster.local; "
                           "requests get 503 NR")
    assert len(warnings) == 2 and "subset 'v2'" in warnings[1]
    nothing_to_say = meshctl(cp, "apply", "-f", "configs/")
    assert nothing_to_say.returncode == 0 and nothing_to_say.stderr == ""


def yaml_text(obj: dict) -> str:
    import yaml
    return yaml.safe_dump(obj)


def test_fields_not_applied_come_back_as_warning_headers_and_unapplied_security_is_refused(cp):
    import urllib.error
    import urllib.request
    path = "/apis/networking.istio.io/v1/namespaces/default/destinationrules/reviews"
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews"},
          "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN",
                                                                         "localityLbSetting": {"enabled": True}}}}}

    def put(body):
        req = urllib.request.Request(cp.url + path, data=json.dumps(body).encode(), method="PUT",
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers.get_all("warning") or [], json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get_all("warning") or [], json.loads(err.read())

    code, warnings, _ = put(dr)
    assert code == 201
    assert warnings == ['299 - "DestinationRule default/reviews: spec.trafficPolicy.loadBalancer.localityLbSetting: '
                        'locality-weighted load balancing is not supported; endpoints are picked regardless of '
                        'locality"']
    dr["spec"]["trafficPolicy"]["tls"] = {"mode": "SIMPLE", "caCrl": "/etc/crl.pem"}
    code, _, status = put(dr)
    assert code == 422
    assert [c["field"] for c in status["details"]["causes"]] == ["spec.trafficPolicy.tls.caCrl"]
    assert "certificate revocation lists are not checked" in status["details"]["causes"][0]["message"]
