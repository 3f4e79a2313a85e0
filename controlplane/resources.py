"""The kinds the control plane serves, and the shape of a stored object.

One table (:data:`KINDS`) says, per kind: its API group and versions (preferred first), the URL
plural (``virtualservices``), short names, discovery categories and the columns ``kubectl get``
prints.  Everything else (API routing, discovery, OpenAPI, Table output, the CLI's ``get vs``)
looks kinds up here: a new kind (another group included) is one more row.

A stored object is a plain dict in Kubernetes shape::

    {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
     "metadata": {"name", "namespace", "resourceVersion", "generation",
                  "creationTimestamp", "labels", "annotations"},
     "spec": {...}}

``resourceVersion`` is the store revision of the object's last change (a decimal string,
as in Kubernetes).  What a proxy receives is :func:`proxy_view`: the same object with only
the metadata that changes traffic, so that its content hash does not move when an
identical spec is re-applied or rolled back.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

GROUP = "networking.istio.io"
SECURITY_GROUP = "security.istio.io"
API_VERSIONS = ("v1", "v1beta1", "v1alpha3")
DEFAULT_API_VERSION = f"{GROUP}/v1"


@dataclass(frozen=True, slots=True)
class Column:
    """A ``kubectl get`` column: a JSONPath-like dotted path into the object (Istio's CRD
    ``additionalPrinterColumns``); type ``date`` prints as an age."""
    name: str
    type: str
    path: str
    description: str = ""


AGE = Column("Age", "date", ".metadata.creationTimestamp",
             "CreationTimestamp is a timestamp representing the server time when this object was created.")


@dataclass(frozen=True, slots=True)
class Kind:
    kind: str
    plural: str
    short: tuple[str, ...]                   # kubectl short names (the lower-case kind is added)
    group: str = GROUP
    versions: tuple[str, ...] = API_VERSIONS  # served; the first is preferred and stored
    columns: tuple[Column, ...] = (AGE,)
    categories: tuple[str, ...] = ("istio-io", "networking-istio-io")
    verbs: tuple[str, ...] = ("create", "delete", "get", "list", "patch", "update", "watch")

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.versions[0]}"

    def serves(self, api_version: str) -> bool:
        return api_version in {f"{self.group}/{v}" for v in self.versions}


KINDS: tuple[Kind, ...] = (
    Kind("VirtualService", "virtualservices", ("vs",), columns=(
        Column("Gateways", "string", ".spec.gateways", "The names of gateways and sidecars that should apply these routes"),
        Column("Hosts", "string", ".spec.hosts", "The destination hosts to which traffic is being sent"), AGE)),
    Kind("DestinationRule", "destinationrules", ("dr",), columns=(
        Column("Host", "string", ".spec.host", "The name of a service from the service registry"), AGE)),
    Kind("ServiceEntry", "serviceentries", ("se",), columns=(
        Column("Hosts", "string", ".spec.hosts", "The hosts associated with the ServiceEntry"),
        Column("Location", "string", ".spec.location", "Whether the service is external to the mesh or part of the mesh (MESH_EXTERNAL or MESH_INTERNAL)"),
        Column("Resolution", "string", ".spec.resolution", "Service resolution mode for the hosts (NONE, STATIC, or DNS)"),
        AGE)),
    Kind("Gateway", "gateways", ("gw",)),
    Kind("Sidecar", "sidecars", ()),
    # security.istio.io: decoded, validated and pushed like the networking kinds
    Kind("AuthorizationPolicy", "authorizationpolicies", ("ap",), SECURITY_GROUP, ("v1", "v1beta1"), columns=(
        Column("Action", "string", ".spec.action", "The operation to take."), AGE),
        categories=("istio-io", "security-istio-io")),
    Kind("PeerAuthentication", "peerauthentications", ("pa",), SECURITY_GROUP, ("v1", "v1beta1"), columns=(
        Column("Mode", "string", ".spec.mtls.mode", "Defines the mTLS mode used for peer authentication."), AGE),
        categories=("istio-io", "security-istio-io")),
)
BY_PLURAL = {k.plural: k for k in KINDS}
BY_KIND = {k.kind: k for k in KINDS}
# kinds of other groups, served by their own modules (controlplane/delivery) and never pushed to proxies
DELIVERY_GROUP = "delivery.meshproxy.io"
OTHER_KINDS: tuple[Kind, ...] = (
    Kind("Canary", "canaries", (), DELIVERY_GROUP, versions=("v1",), categories=("meshproxy-io",),
         verbs=("create", "delete", "get", "list", "update")),
)
BY_ANY_NAME = {name: k for k in KINDS + OTHER_KINDS for name in (k.plural, k.singular, *k.short)}
GROUPS: dict[str, tuple[Kind, ...]] = {
    group: tuple(k for k in KINDS + OTHER_KINDS if k.group == group)
    for group in dict.fromkeys(k.group for k in KINDS + OTHER_KINDS)}


def kind_for(group: str, version: str, plural: str) -> Kind | None:
    """The networking kind a URL names (``/apis/<group>/<version>/.../<plural>``); None if not
    one (other groups are answered by their own modules before the generic API)."""
    kind = BY_PLURAL.get(plural)
    return kind if kind is not None and kind.group == group and version in kind.versions else None

# metadata keys a client may set; the rest of metadata is owned by the server
CLIENT_METADATA = ("name", "namespace", "labels", "annotations", "resourceVersion")
# metadata keys that reach proxies (and therefore the content hash); creationTimestamp
# decides which of two VirtualServices for one host wins (Istio: the oldest)
PROXY_METADATA = ("name", "namespace", "labels", "annotations", "creationTimestamp")


def lookup_kind(name: str) -> Kind | None:
    """``vs``, ``VirtualService``, ``virtualservices`` -> the Kind; None if unknown."""
    return BY_ANY_NAME.get(name.lower()) or BY_KIND.get(name)


def is_proxy_kind(kind: str) -> bool:
    """True for the Istio kinds proxies receive (not the control plane's own kinds, e.g. Canary)."""
    return kind in BY_KIND


def object_key(obj: dict) -> tuple[str, str, str]:
    md = obj.get("metadata") or {}
    return (obj.get("kind", ""), md.get("namespace") or "default", md.get("name", ""))


def describe(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}"


def proxy_view(obj: dict) -> dict:
    """The object as a proxy (and the decoder) sees it: no server-owned metadata."""
    md = obj.get("metadata") or {}
    out_md = {k: md[k] for k in PROXY_METADATA if k in md and md[k] not in (None, {}, "")}
    return {"apiVersion": obj.get("apiVersion", DEFAULT_API_VERSION), "kind": obj["kind"],
            "metadata": out_md, "spec": obj.get("spec") or {}}


def user_view(obj: dict) -> dict:
    """What the user controls: equal user views = a no-op write."""
    md = obj.get("metadata") or {}
    return {"apiVersion": obj.get("apiVersion", DEFAULT_API_VERSION), "kind": obj["kind"],
            "metadata": {k: md[k] for k in CLIENT_METADATA if k != "resourceVersion" and md.get(k) not in (None, {}, "")},
            "spec": obj.get("spec") or {}}


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def content_hash(value) -> str:
    """Stable short hash of JSON-able content: equal content -> equal version, across restarts."""
    return hashlib.sha256(canonical_json(value)).hexdigest()[:16]
