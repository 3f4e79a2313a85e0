"""``meshctl inject``: a workload's Kubernetes YAML with the meshproxy sidecar added (like
``istioctl kube-inject``).  Pure: objects in, objects out.

For every Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and Pod, the pod template
gets:

* ``meshproxy-init``, an init container running ``meshproxy pod-init`` as root with NET_ADMIN and
  NET_RAW only (the capture rules; exclusions from Istio's ``traffic.sidecar.istio.io/*``
  annotations);
* ``meshproxy``, the sidecar as a *native sidecar* (an init container with ``restartPolicy:
  Always``, Kubernetes >= 1.29): ``meshproxy run --capture`` as uid/gid 1337 with no capabilities,
  registering the workload (service = label ``app`` or ``app.kubernetes.io/name``, else the
  object's name) with its container ports; a startup and readiness probe on
  ``:15021/healthz/ready``, so the application containers start after it is ready;
* the probe rewrite: every HTTP or TCP probe of an application container becomes an HTTP GET of
  ``:15021/app-health/<container>/<livez|readyz|startupz>``, the original going to the sidecar's
  ``--app-probers`` (Istio's ``ISTIO_KUBE_APP_PROBERS`` format), so probes keep working when the
  application's ports require mTLS; exec and gRPC probes are left alone;
* annotations for Prometheus (``:15021/stats/prometheus``) and ``sidecar.meshproxy.io/status``
  (injecting twice changes nothing);
* with an ``https://`` control plane (its default: TLS with the mesh CA), the workload identity:
  ``--ca-file`` from the ConfigMap ``meshproxy-ca-root-cert`` (key ``root-cert.pem``, the output
  of ``meshctl ca root``, as Istio mounts ``istio-ca-root-cert`` into every pod),
  ``--token-file`` from the Secret ``meshproxy-bootstrap-<service account>`` (key ``token``, a
  ``meshctl token create --reusable`` token for the pod's namespace and service account: the
  part a projected service-account token plays in Istio), ``--service-account`` from the pod's
  ``serviceAccountName`` (``default`` when unset), and the pod label
  ``security.istio.io/tlsMode: istio`` (its peers' auto mTLS).  Both volumes are read-only.

Other objects pass through unchanged.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
STATUS_ANNOTATION = "sidecar.meshproxy.io/status"
PROXY_UID = 1337
HEALTH_PORT = 15021
PROBE_KINDS = (("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz"))
_ANNOTATION_FLAGS = {
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "--exclude-outbound-cidrs",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "--exclude-outbound-ports",
    "traffic.sidecar.istio.io/excludeInboundPorts": "--exclude-inbound-ports",
}


class InjectError(Exception):
    pass


CA_CONFIGMAP = "meshproxy-ca-root-cert"
CA_KEY = "root-cert.pem"
TOKEN_SECRET = "meshproxy-bootstrap-{service_account}"
TOKEN_KEY = "token"
CA_DIR = "/var/run/secrets/meshproxy/ca"
TOKEN_DIR = "/var/run/secrets/meshproxy/bootstrap"
TLS_MODE_LABEL = "security.istio.io/tlsMode"


@dataclass(frozen=True)
class InjectOptions:
    image: str = "meshproxy:0.1.0"
    control_plane: str = "https://meshctl.mesh-system.svc:15010"
    capture_dns: bool = True
    ca_configmap: str = CA_CONFIGMAP
    token_secret: str = TOKEN_SECRET          # {service_account} is the pod's

    @property
    def secure(self) -> bool:
        return self.control_plane.startswith("https://")


def inject_documents(docs: list[dict], options: InjectOptions) -> list[dict]:
    return [inject(doc, options) if isinstance(doc, dict) else doc for doc in docs]


def inject(obj: dict, options: InjectOptions) -> dict:
    kind = obj.get("kind")
    if kind == "Pod":
        out = copy.deepcopy(obj)
        _inject_pod(out.setdefault("metadata", {}), out.setdefault("spec", {}), out, options)
        return out
    if kind == "CronJob":
        out = copy.deepcopy(obj)
        template = out.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template")
        if template is None:
            raise InjectError(f"CronJob {obj.get('metadata', {}).get('name')}: spec.jobTemplate.spec.template missing")
        _inject_pod(template.setdefault("metadata", {}), template.setdefault("spec", {}), out, options)
        return out
    if kind in POD_TEMPLATE_KINDS:
        out = copy.deepcopy(obj)
        template = out.get("spec", {}).get("template")
        if template is None:
            raise InjectError(f"{kind} {obj.get('metadata', {}).get('name')}: spec.template missing")
        _inject_pod(template.setdefault("metadata", {}), template.setdefault("spec", {}), out, options)
        return out
    return obj


def _service_and_labels(pod_meta: dict, owner: dict) -> tuple[str, str, dict]:
    labels = dict(pod_meta.get("labels") or {})
    service = labels.get("app") or labels.get("app.kubernetes.io/name") or owner.get("metadata", {}).get("name")
    if not service:
        raise InjectError("cannot tell the service: no label app / app.kubernetes.io/name and no metadata.name")
    namespace = owner.get("metadata", {}).get("namespace") or pod_meta.get("namespace") or "default"
    return service, namespace, labels


def _inject_pod(pod_meta: dict, spec: dict, owner: dict, options: InjectOptions) -> None:
    annotations = pod_meta.setdefault("annotations", {})
    if annotations.get(STATUS_ANNOTATION) == "injected":
        return
    service, namespace, labels = _service_and_labels(pod_meta, owner)
    containers = spec.get("containers") or []
    if not containers:
        raise InjectError(f"{owner.get('kind')} {owner.get('metadata', {}).get('name')}: no containers")
    app_ports: list[str] = []
    probers: dict = {}
    for container in containers:
        for port in container.get("ports") or []:
            if (port.get("protocol") or "TCP") != "TCP":
                continue
            name = port.get("name") or "http"
            app_ports.append(f"{name}:{port['containerPort']}")
        for field, kind in PROBE_KINDS:
            probe = container.get(field)
            if not isinstance(probe, dict):
                continue
            path = f"/app-health/{container['name']}/{kind}"
            original = _original_probe(probe, container)
            if original is None:
                continue                           # exec / grpc probes run as they are
            probers[path] = original
            rewritten = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket")}
            rewritten["httpGet"] = {"path": path, "port": HEALTH_PORT, "scheme": "HTTP"}
            container[field] = rewritten

    init_args = ["pod-init", "--proxy-uid", str(PROXY_UID)]
    if options.capture_dns:
        init_args.append("--capture-dns")
    for annotation, flag in _ANNOTATION_FLAGS.items():
        if annotations.get(annotation):
            init_args += [flag, str(annotations[annotation])]
    init = {
        "name": "meshproxy-init",
        "image": options.image,
        "command": ["meshproxy"],
        "args": init_args,
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }
    label_arg = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    sidecar_args = ["run", "--capture", "--control-plane", options.control_plane, "--service", service,
                    "--namespace", namespace, "--admin", "127.0.0.1:15000", "--health-port", str(HEALTH_PORT)]
    mounts = []
    if options.secure:
        service_account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        sidecar_args += ["--service-account", service_account, "--ca-file", f"{CA_DIR}/{CA_KEY}",
                         "--token-file", f"{TOKEN_DIR}/{TOKEN_KEY}"]
        mounts = [{"name": "meshproxy-ca-root-cert", "mountPath": CA_DIR, "readOnly": True},
                  {"name": "meshproxy-bootstrap-token", "mountPath": TOKEN_DIR, "readOnly": True}]
        volumes = [v for v in spec.get("volumes") or [] if v.get("name") not in {m["name"] for m in mounts}]
        volumes += [
            {"name": "meshproxy-ca-root-cert",
             "configMap": {"name": options.ca_configmap, "items": [{"key": CA_KEY, "path": CA_KEY}]}},
            {"name": "meshproxy-bootstrap-token",
             "secret": {"secretName": options.token_secret.format(service_account=service_account),
                        "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}], "defaultMode": 0o440}},
        ]
        spec["volumes"] = volumes
        pod_labels = pod_meta.setdefault("labels", {})
        pod_labels.setdefault(TLS_MODE_LABEL, "istio")
    if label_arg:
        sidecar_args += ["--labels", label_arg]
    for port in app_ports:
        sidecar_args += ["--app-port", port]
    if probers:
        sidecar_args += ["--app-probers", json.dumps(probers, sort_keys=True)]
    health = {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT}}
    sidecar = {
        "name": "meshproxy",
        "image": options.image,
        "restartPolicy": "Always",
        "command": ["meshproxy"],
        "args": sidecar_args,
        "ports": [{"name": "http-health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "startupProbe": dict(health, periodSeconds=1, failureThreshold=600, timeoutSeconds=3),
        "readinessProbe": dict(health, periodSeconds=15, failureThreshold=4, timeoutSeconds=3),
        "securityContext": {
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": True, "privileged": False,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    }
    if mounts:
        sidecar["volumeMounts"] = mounts
    spec["initContainers"] = [init, sidecar] + list(spec.get("initContainers") or [])
    annotations[STATUS_ANNOTATION] = "injected"
    annotations.setdefault("prometheus.io/scrape", "true")
    annotations.setdefault("prometheus.io/port", str(HEALTH_PORT))
    annotations.setdefault("prometheus.io/path", "/stats/prometheus")


def _original_probe(probe: dict, container: dict) -> dict | None:
    timeout = probe.get("timeoutSeconds", 1)
    if isinstance(probe.get("httpGet"), dict):
        get = probe["httpGet"]
        port = _port_number(get.get("port"), container)
        if (get.get("scheme") or "HTTP").upper() != "HTTP":
            return None
        return {"httpGet": {"path": get.get("path") or "/", "port": port}, "timeoutSeconds": timeout}
    if isinstance(probe.get("tcpSocket"), dict):
        return {"tcpSocket": {"port": _port_number(probe["tcpSocket"].get("port"), container)},
                "timeoutSeconds": timeout}
    return None


def _port_number(port, container: dict) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    if isinstance(port, str) and port.isdigit():
        return int(port)
    raise InjectError(f"container {container.get('name')}: probe port {port!r} is not a number or a port name")
