"""The Istio kinds the control plane serves, and the shape of a stored object.

One table maps the URL plural (``virtualservices``) to the kind (``VirtualService``) and
its short names; everything else (API routing, the CLI's ``get vs``) looks kinds up here.

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
API_VERSIONS = ("v1", "v1beta1", "v1alpha3")
DEFAULT_API_VERSION = f"{GROUP}/v1"


@dataclass(frozen=True, slots=True)
class Kind:
    kind: str
    plural: str
    short: tuple[str, ...]
    group: str = GROUP


KINDS: tuple[Kind, ...] = (
    Kind("VirtualService", "virtualservices", ("vs", "virtualservice")),
    Kind("DestinationRule", "destinationrules", ("dr", "destinationrule")),
    Kind("ServiceEntry", "serviceentries", ("se", "serviceentry")),
    Kind("Gateway", "gateways", ("gw", "gateway")),
    Kind("Sidecar", "sidecars", ("sidecar",)),
)
BY_PLURAL = {k.plural: k for k in KINDS}
BY_KIND = {k.kind: k for k in KINDS}
# kinds of other groups, served by their own modules (controlplane/delivery) and never pushed to proxies
DELIVERY_GROUP = "delivery.meshproxy.io"
OTHER_KINDS: tuple[Kind, ...] = (Kind("Canary", "canaries", ("canary",), DELIVERY_GROUP),)
BY_ANY_NAME = {name: k for k in KINDS + OTHER_KINDS for name in (k.plural, k.kind.lower(), *k.short)}

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
