"""SPIFFE ids as Istio uses them: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

Pure functions and one frozen value, part of the config contract: shared by the data plane
(certificate manager, peer checks, policy principals) and the control plane (the CA, tokens,
registrations).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"

# Kubernetes DNS-1123 labels for namespaces and service accounts (subdomains allow dots).
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


class InvalidSpiffeId(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        problems = identity_errors(self.namespace, self.service_account, self.trust_domain)
        if problems:
            raise InvalidSpiffeId("; ".join(problems))

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy ``principals`` use (no ``spiffe://``)."""
        return self.uri[len("spiffe://"):]

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> "SpiffeId":
        if not isinstance(uri, str) or not uri.startswith("spiffe://"):
            raise InvalidSpiffeId(f"not a SPIFFE id (want spiffe://TRUST-DOMAIN/ns/NS/sa/SA): {uri!r}")
        parts = uri[len("spiffe://"):].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise InvalidSpiffeId(f"not a workload SPIFFE id (want spiffe://TRUST-DOMAIN/ns/NS/sa/SA): {uri!r}")
        return cls(parts[0], parts[2], parts[4])


def identity_errors(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> list[str]:
    errors = []
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.match(trust_domain or "") or len(trust_domain) > 255:
        errors.append(f"trust domain {trust_domain!r}: must be lower-case letters, digits, '.', '-', '_'")
    if not isinstance(namespace, str) or not _LABEL.match(namespace or "") or len(namespace) > 63:
        errors.append(f"namespace {namespace!r}: must be a DNS-1123 label (a-z, 0-9, '-', at most 63)")
    if not isinstance(service_account, str) or not _SUBDOMAIN.match(service_account or "") \
            or len(service_account) > 253:
        errors.append(f"service account {service_account!r}: must be a DNS-1123 subdomain")
    return errors
