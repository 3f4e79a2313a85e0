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
        return self.group_version(self.versions[0])

    def group_version(self, version: str) -> str:
        """``networking.istio.io/v1``; a core kind's is just ``v1``."""
        return f"{self.group}/{version}" if self.group else version

    def serves(self, api_version: str) -> bool:
        return api_version in {self.group_version(v) for v in self.versions}

    def base_path(self, version: str | None = None) -> str:
        """Where its group/version is served: ``/apis/<group>/<version>``, core ``/api/v1``."""
        version = version or self.versions[0]
        return f"/apis/{self.group}/{version}" if self.group else f"/api/{version}"


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
# core v1 kinds (served under /api/v1): TLS Secrets for Gateway credentialName.  Their data is
# stored and pushed to the gateways that reference them, and never shown: see :func:`redacted`
CORE_GROUP = ""
SECRET = Kind("Secret", "secrets", (), CORE_GROUP, ("v1",), columns=(
    Column("Type", "string", ".type", "Used to facilitate programmatic handling of secret data."),
    Column("Data", "integer", ".data", "The number of keys in the secret's data."), AGE), categories=())
CORE_KINDS: tuple[Kind, ...] = (SECRET,)
KINDS = KINDS + CORE_KINDS
BY_PLURAL = {k.plural: k for k in KINDS}
BY_KIND = {k.kind: k for k in KINDS}
# kinds of other groups, served by their own modules (controlplane/delivery) and never pushed to proxies
DELIVERY_GROUP = "delivery.meshproxy.io"
OTHER_KINDS: tuple[Kind, ...] = (
    Kind("Canary", "canaries", (), DELIVERY_GROUP, versions=("v1",), categories=("meshproxy-io",),
         verbs=("create", "delete", "get", "list", "update")),
)
BY_ANY_NAME = {name: k for k in KINDS + OTHER_KINDS for name in (k.plural, k.singular, *k.short)}
GROUPS: dict[str, tuple[Kind, ...]] = {       # the named API groups (/apis); the core group is /api
    group: tuple(k for k in KINDS + OTHER_KINDS if k.group == group)
    for group in dict.fromkeys(k.group for k in KINDS + OTHER_KINDS) if group != CORE_GROUP}


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


# what a kind holds besides apiVersion, kind and metadata (a Secret has no spec)
CONTENT_FIELDS = {"Secret": ("type", "data", "immutable")}
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def content_of(obj: dict) -> dict:
    """The user's content of an object: ``{"spec": ...}``, or a Secret's type, data, immutable."""
    fields = CONTENT_FIELDS.get(obj.get("kind", ""))
    if fields is None:
        return {"spec": obj.get("spec") or {}}
    return {k: obj[k] for k in fields if obj.get(k) not in (None, {}, "")}


def proxy_view(obj: dict) -> dict:
    """The object as a proxy (and the decoder) sees it: no server-owned metadata."""
    md = obj.get("metadata") or {}
    out_md = {k: md[k] for k in PROXY_METADATA if k in md and md[k] not in (None, {}, "")}
    if obj.get("kind") in CONTENT_FIELDS:
        out_md.pop("annotations", None)          # a Secret's annotations may hold kubectl's copy of the data
    return {"apiVersion": obj.get("apiVersion", DEFAULT_API_VERSION), "kind": obj["kind"],
            "metadata": out_md, **content_of(obj)}


def user_view(obj: dict) -> dict:
    """What the user controls: equal user views = a no-op write."""
    md = obj.get("metadata") or {}
    return {"apiVersion": obj.get("apiVersion", DEFAULT_API_VERSION), "kind": obj["kind"],
            "metadata": {k: md[k] for k in CLIENT_METADATA if k != "resourceVersion" and md.get(k) not in (None, {}, "")},
            **content_of(obj)}


def is_secret(obj: dict | None) -> bool:
    return isinstance(obj, dict) and obj.get("kind") == "Secret"


def redacted(obj: dict | None) -> dict | None:
    """What anyone reading the API sees of an object: a Secret without its data (metadata, type,
    immutable); others unchanged."""
    if not is_secret(obj):
        return obj
    out = {k: v for k, v in obj.items() if k not in ("data", "stringData")}
    md = dict(out.get("metadata") or {})
    if md.get("annotations"):
        md["annotations"] = scrub_annotations(md["annotations"])
    out["metadata"] = md
    return out


def scrub_annotations(annotations) -> dict:
    """A Secret's annotations without data: kubectl's last-applied copy loses data/stringData."""
    if not isinstance(annotations, dict):
        return {}
    out = dict(annotations)
    if LAST_APPLIED in out:
        try:
            applied = json.loads(out[LAST_APPLIED])
        except (TypeError, ValueError):
            applied = None
        if isinstance(applied, dict):
            applied.pop("data", None)
            applied.pop("stringData", None)
            out[LAST_APPLIED] = json.dumps(applied, sort_keys=True, separators=(",", ":")) + "\n"
        else:
            del out[LAST_APPLIED]
    return out


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def content_hash(value) -> str:
    """Stable short hash of JSON-able content: equal content -> equal version, across restarts."""
    return hashlib.sha256(canonical_json(value)).hexdigest()[:16]
