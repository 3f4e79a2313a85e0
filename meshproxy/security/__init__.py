"""Security of the data plane: workload identity and certificates (this module's API, below),
peer authentication (peer_authn.py, mTLS modes) and authorization policy (authz.py).

Workload identity and certificates: the API other modules use:

    from meshproxy.security import CertificateManager, SpiffeId, check_peer, peer_identity

    manager.current                     -> WorkloadCertificate | None (immutable: identity, chain_pem,
                                           bundle_pem, not_before, not_after, serial, roots)
    manager.server_context(alpn=("istio-http/1.1", "http/1.1"), client_cert="required")
                                        -> ssl.SSLContext: each new connection gets the current
                                           certificate and trust bundle (renewal/root rotation need
                                           no rebind, open connections keep theirs); a new one per
                                           certificate, so ask per connection to resume only sessions
                                           of the current one.  "optional" accepts clients without a
                                           certificate (PERMISSIVE after a peek).
    manager.client_context(alpn=...)    -> ssl.SSLContext presenting the current certificate and
                                           verifying servers against the current bundle; ask for it
                                           per new connection.  Host names are not checked: after
                                           the handshake call check_peer(ssl_object, allowed_ids).
    peer_identity(ssl_object)           -> SpiffeId | None of a verified peer (server side: the caller)
    check_peer(ssl_object, allowed)     -> SpiffeId, or raises PeerIdentityMismatch (an ssl.SSLError)
    manager.subscribe(callback)         -> callback(cert) after each renewal
    manager.status()                    -> dict for /config_dump (state valid|renewal-failing|expired)
    SpiffeId.parse(uri) / .uri / .principal ("cluster.local/ns/NS/sa/SA" for AuthorizationPolicy)

A manager is built by the composition root (``meshproxy run --control-plane https://...
--ca-file ROOT --token-file TOKEN --service-account SA``) and handed to whoever needs TLS.
Tests that need certificates without a control plane sign in-process::

    from controlplane.security.ca import CertificateAuthority, CaState, generate_root
    root = generate_root("cluster.local")
    ca = CertificateAuthority(CaState((root,), root.fingerprint), default_ttl=3600)
    manager = CertificateManager(SpiffeId("cluster.local", "default", "sleep"), ca.issuer())
    await manager.start()
"""
from __future__ import annotations

import importlib

# The names above, loaded on first use (PEP 562): authorization and peer authentication
# (authz.py, peer_authn.py, inbound.py) are on every proxy's path and import this package,
# while the certificate manager needs ``cryptography``, which a proxy without a workload
# certificate never loads.
_EXPORTS = {
    "CertificateIssuer": "manager", "CertificateManager": "manager", "IssuedCertificate": "manager",
    "IssuerError": "manager", "WorkloadCertificate": "manager",
    "DEFAULT_TRUST_DOMAIN": "spiffe", "InvalidSpiffeId": "spiffe", "SpiffeId": "spiffe",
    "PeerIdentityMismatch": "tls", "check_peer": "tls", "peer_identity": "tls", "peer_uris": "tls",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
