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
MODELS = {"Deployment": "V1Deployment", "Service": "V1Service", "CronJob": "V1CronJob", "Namespace": "V1Namespace",
          "ServiceAccount": "V1ServiceAccount", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
          "ConfigMap": "V1ConfigMap", "Secret": "V1Secret"}
MANIFESTS = FIXTURE.parent.parent.parent.parent / "configs" / "kubernetes"


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


def _mounted(pod_spec: dict, container: dict, path: str) -> tuple[str, str, str]:
    """(volume kind, its ConfigMap/Secret name, key) of the file ``path`` in ``container``."""
    for mount in container.get("volumeMounts") or []:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
            rest = path[len(mount["mountPath"].rstrip("/")) + 1:]
            if "configMap" in volume:
                source, name = volume["configMap"], volume["configMap"]["name"]
            else:
                source, name = volume["secret"], volume["secret"]["secretName"]
            key = next(i["key"] for i in source.get("items") or [{"key": rest, "path": rest}] if i["path"] == rest)
            return ("configMap" if "configMap" in volume else "secret"), name, key
    raise AssertionError(f"{path} is not under any volumeMount of {container['name']}")


def _kubectl(*args: str, stdin: str = "") -> dict:
    """An offline kubectl generator (what the operator runs), its object."""
    out = subprocess.run(["kubectl", *args, "--dry-run=client", "-o", "yaml"], input=stdin, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_https_control_plane_gives_the_pod_its_root_token_and_service_account(tmp_path):
    deployment = run_inject()[1]
    pod = deployment["spec"]["template"]
    sidecar = pod["spec"]["initContainers"][1]
    from meshproxy.cli import _parser
    run = _parser().parse_args(sidecar["args"])
    assert run.control_plane == "https://meshctl.mesh-system.svc:15010"
    assert run.service_account == "bookinfo-reviews" and run.namespace == "shop"
    assert pod["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
    assert all(m["readOnly"] for m in sidecar["volumeMounts"])
    ca = _mounted(pod["spec"], sidecar, run.ca_file)
    token = _mounted(pod["spec"], sidecar, run.token_file)
    assert ca == ("configMap", "meshproxy-ca-root-cert", "root-cert.pem")
    assert token == ("secret", "meshproxy-bootstrap-bookinfo-reviews", "token")
    # what the documented commands make (kubectl, offline) is what the pod mounts
    root = tmp_path / "root-cert.pem"
    root.write_text("-----BEGIN CERTIFICATE-----\n")
    configmap = _kubectl("create", "configmap", ca[1], "-n", "shop", f"--from-file={root}")
    secret = _kubectl("create", "secret", "generic", token[1], "-n", "shop", "--from-literal=token=mpb.x.y")
    assert ca[2] in configmap["data"] and token[2] in secret["data"]
    # the CronJob's pod has no serviceAccountName: the namespace's default account
    cron = run_inject()[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    cron_run = _parser().parse_args(cron["initContainers"][1]["args"])
    assert cron_run.service_account == "default"
    assert _mounted(cron, cron["initContainers"][1], cron_run.token_file)[1] == "meshproxy-bootstrap-default"
    # a plaintext control plane (the local demo's --insecure-loopback) needs none of it
    plain = run_inject("--control-plane", "http://127.0.0.1:15010")[1]["spec"]["template"]["spec"]
    assert "volumes" not in plain and "--token-file" not in plain["initContainers"][1]["args"]


def test_the_kubernetes_manifests_run_the_control_plane_over_tls_and_give_proxies_their_identity():
    from controlplane.cli import build_parser
    from meshproxy.cli import _parser
    client = ApiClient()
    proxies = servers = 0
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            assert schema_errors(doc, MODELS[doc["kind"]], f"{path.name}: {doc['kind']}") == []
            client._ApiClient__deserialize(doc, MODELS[doc["kind"]])
            if doc["kind"] != "Deployment":
                continue
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                command = container.get("command") or []
                if command[:2] == ["meshctl", "serve"]:
                    servers += 1
                    serve = build_parser().parse_args(command[1:])
                    assert not serve.insecure_loopback
                    namespace = doc["metadata"]["namespace"]
                    assert {"meshctl." + namespace + ".svc", f"meshctl.{namespace}.svc.cluster.local"} <= set(serve.san)
                    for probe in ("readinessProbe", "livenessProbe"):
                        assert container[probe]["httpGet"]["scheme"] == "HTTPS", path.name
                elif command[:2] == ["meshproxy", "run"]:
                    proxies += 1
                    run = _parser().parse_args(command[1:])
                    assert run.control_plane.startswith("https://meshctl.mesh-system.svc:"), path.name
                    assert run.namespace == doc["metadata"]["namespace"], path.name
                    assert run.service_account == pod["serviceAccountName"], path.name
                    assert _mounted(pod, container, run.ca_file) == ("configMap", "meshproxy-ca-root-cert",
                                                                     "root-cert.pem")
                    assert _mounted(pod, container, run.token_file) == (
                        "secret", f"meshproxy-bootstrap-{run.service_account}", "token")
    assert servers == 1 and proxies == 3
