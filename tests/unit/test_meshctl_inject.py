"""``meshctl inject``: its output checked against the Kubernetes object schema (the official
Kubernetes Python client's models, generated from the API's OpenAPI: every field must exist with
the right type, required fields must be there) and its commands against meshproxy's own CLI."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes.client
import yaml
from kubernetes.client import ApiClient

from controlplane.cli import main
from meshproxy.capture.pod import parse_app_probers

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "kubernetes" / "reviews.yaml"
MODELS = {"Deployment": "V1Deployment", "Service": "V1Service", "CronJob": "V1CronJob"}


def schema_errors(value, type_name: str, path: str) -> list[str]:
    """Every field of ``value`` not in the schema of ``type_name``, or of the wrong type."""
    listed = re.match(r"(?:list\[|List\[)(.*)\]$", type_name)
    if listed:
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, listed.group(1), f"{path}[{i}]")]
    mapped = re.match(r"(?:dict\(str, (.*)\)|Dict\[str, (.*)\])$", type_name)
    if mapped:
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        inner = mapped.group(1) or mapped.group(2)
        return [e for k, v in value.items() for e in schema_errors(v, inner, f"{path}.{k}")]
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name == "object":
        return []
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object"]
    by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        attr = by_json.get(key)
        if attr is None:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors += schema_errors(item, model.openapi_types[attr], f"{path}.{key}")
    return errors


def run_inject(*args: str) -> list[dict]:
    """``meshctl inject -f FIXTURE ARGS`` (in this process: the CLI's own entry point)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inject", "-f", str(FIXTURE), *args]) == 0
    return list(yaml.safe_load_all(out.getvalue()))


def test_injected_objects_are_valid_kubernetes_objects():
    docs = run_inject("--image", "registry.example/meshproxy:1")
    assert [d["kind"] for d in docs] == ["Service", "Deployment", "CronJob"]
    client = ApiClient()
    for doc in docs:
        model = MODELS[doc["kind"]]
        assert schema_errors(doc, model, doc["kind"]) == []
        client._ApiClient__deserialize(doc, model)       # required fields (raises ValueError if missing)


def test_the_schema_check_can_fail():
    docs = run_inject()
    bad = docs[1]
    bad["spec"]["template"]["spec"]["initContainers"][1]["restartPolicyy"] = "Always"
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9080"
    errors = schema_errors(bad, "V1Deployment", "Deployment")
    assert len(errors) == 2
    assert any("restartPolicyy: not a field of V1Container" in e for e in errors)
    assert any("containerPort: expected int" in e for e in errors)


def test_deployment_gets_init_step_native_sidecar_probe_rewrite_and_ports():
    deployment = run_inject("--control-plane", "http://cp.mesh:15010")[1]
    pod = deployment["spec"]["template"]
    init, sidecar = pod["spec"]["initContainers"]
    assert init["args"][:3] == ["pod-init", "--proxy-uid", "1337"]
    assert init["args"][init["args"].index("--exclude-outbound-ports") + 1] == "5432"
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert init["securityContext"]["runAsUser"] == 0
    assert sidecar["restartPolicy"] == "Always"                       # a native sidecar
    assert sidecar["securityContext"]["runAsUser"] == 1337 and sidecar["securityContext"]["runAsNonRoot"]
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    # the commands are ones meshproxy accepts
    from meshproxy.cli import _parser
    run = _parser().parse_args(sidecar["args"])
    assert run.capture and run.service == "reviews" and run.namespace == "shop"
    assert run.control_plane == "http://cp.mesh:15010"
    assert run.app_port == [("http", 9080), ("tcp-admin", 9090)]
    assert run.labels == {"app": "reviews", "version": "v1"}
    assert _parser().parse_args(init["args"]).capture_dns
    app = pod["spec"]["containers"][0]
    assert app["readinessProbe"] == {"httpGet": {"path": "/app-health/reviews/readyz", "port": 15021, "scheme": "HTTP"},
                                     "periodSeconds": 5}
    assert app["livenessProbe"]["httpGet"]["path"] == "/app-health/reviews/livez"
    assert app["startupProbe"] == {"exec": {"command": ["cat", "/tmp/started"]}}         # exec stays
    probers = parse_app_probers(run.app_probers)
    assert probers == {"/app-health/reviews/readyz": ("http", 9080, "/ready", 1.0),
                       "/app-health/reviews/livez": ("tcp", 9080, "", 2.0)}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "15021"


def test_injecting_twice_changes_nothing(tmp_path):
    once = tmp_path / "once.yaml"
    run_inject("-o", str(once))
    second = subprocess.run([sys.executable, "-m", "controlplane.cli", "inject", "-f", "-"], input=once.read_text(),
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert list(yaml.safe_load_all(second.stdout)) == list(yaml.safe_load_all(once.read_text()))


def test_cronjob_template_is_injected_and_named_from_its_label():
    cron = run_inject()[2]
    sidecar = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][1]
    assert sidecar["args"][sidecar["args"].index("--service") + 1] == "report"
    assert json.dumps(sidecar).count("--app-port") == 0
