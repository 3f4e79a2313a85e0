"""Gateway ``credentialName``: core v1 TLS Secrets at the decode boundary (PEM checked, errors
name the key and never its content), resolution in the gateway proxy's namespace (with the
``<name>-cacert`` convention for MUTUAL), a missing Secret costing only its server, and a
private key that /config_dump never shows; plus the ServerTLSSettings checks that belong to
the MUTUAL modes."""
from __future__ import annotations

import base64
import json

from meshproxy.config.compile import ProxyIdentity, compile_snapshot
from meshproxy.config.decode import decode_documents
from meshproxy.config.dump import snapshot_to_dict
from meshproxy.config.resources import Document, SecretSpec
from mtls import MeshCA

CA = MeshCA("gateway credentials root")
SERVER = CA.issue(dns=("shop.example.com",))
OTHER = CA.issue(dns=("other.example.com",))
GW_NS = "istio-system"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret(name: str, namespace: str = GW_NS, type_: str = "kubernetes.io/tls", **data: bytes) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": type_, "data": {k.replace("_", "."): b64(v) for k, v in data.items()}}


def tls_secret(name: str, namespace: str = GW_NS, issued=SERVER, **extra: bytes) -> dict:
    return secret(name, namespace, tls_crt=issued.cert_pem, tls_key=issued.key_pem, **extra)


def gateway(tls: dict, namespace: str = "default") -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": namespace},
            "spec": {"servers": [{"port": {"number": 8443, "name": "https", "protocol": "HTTPS"},
                                  "hosts": ["shop.example.com"], "tls": tls}]}}


def decode(*bodies):
    return decode_documents([Document("t.yaml", i, b) for i, b in enumerate(bodies)])


def compile_(*bodies, namespace: str = GW_NS):
    result = decode(*bodies)
    assert result.errors == []
    identity = ProxyIdentity(namespace=namespace, mode="gateway", gateway_bind="127.0.0.1")
    return compile_snapshot(result.resources, identity).snapshot


def test_a_tls_secret_decodes_to_its_pem_and_bad_ones_are_refused_by_key():
    result = decode(tls_secret("shop", ca_crt=CA.root_pem))
    assert result.errors == []
    spec = result.resources[0].spec
    assert spec == SecretSpec("kubernetes.io/tls", SERVER.cert_pem, SERVER.key_pem, CA.root_pem)
    assert SERVER.key_pem.decode() not in repr(result.resources[0])
    # stringData (plain PEM) as kubectl writes it before the API server folds it into data
    plain = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "type": "Opaque",
             "stringData": {"cacert": CA.root_pem.decode()}}
    assert decode(plain).resources[0].spec == SecretSpec("Opaque", ca=CA.root_pem)
    bad = [
        (secret("a", tls_crt=SERVER.cert_pem), "Secret istio-system/a: data.tls.key: required for type kubernetes.io/tls"),
        (secret("b", tls_crt=SERVER.cert_pem, tls_key=OTHER.key_pem),
         "Secret istio-system/b: data.tls.key: is not the key of the first certificate in data.tls.crt"),
        (dict(secret("c"), data={"tls.crt": "not base64!", "tls.key": b64(SERVER.key_pem)}),
         "Secret istio-system/c: data.tls.crt: must be base64 (data holds base64; plain text goes in stringData)"),
        (dict(tls_secret("d"), type="kubernetes.io/basic-auth"),
         "Secret istio-system/d: type: must be one of kubernetes.io/tls, Opaque (TLS credentials for Gateway "
         "credentialName), got 'kubernetes.io/basic-auth'"),
        (secret("e", type_="Opaque", ca_crt=b"garbage"), "Secret istio-system/e: data.ca.crt: must hold PEM "
                                                         "certificates (-----BEGIN CERTIFICATE-----)"),
        (dict(tls_secret("f"), spec={}), "Secret istio-system/f: spec: unknown field"),
    ]
    for body, error in bad:
        errors = decode(body).errors
        assert error in errors, errors
        assert not any(SERVER.key_pem.decode()[40:80] in e or OTHER.key_pem.decode()[40:80] in e for e in errors)
    assert decode(dict(tls_secret("g"), apiVersion="networking.istio.io/v1")).errors == [
        "Secret istio-system/g: apiVersion: must be one of v1, got 'networking.istio.io/v1'"]


def test_credential_name_resolves_in_the_gateway_proxys_namespace_with_its_cacert():
    snap = compile_(gateway({"mode": "SIMPLE", "credentialName": "shop"}), tls_secret("shop"),
                    tls_secret("shop", namespace="default", issued=OTHER))
    [listener] = snap.listeners
    [cert] = listener.tls.certificates
    # the gateway proxy's namespace wins over the Gateway's (Istio reads the gateway workload's)
    assert (cert.certificate_pem, cert.key_pem, cert.credential) == (SERVER.cert_pem, SERVER.key_pem, "istio-system/shop")
    dump = json.dumps(snapshot_to_dict(snap))
    assert '"key_pem": "<redacted>"' in dump and SERVER.key_pem.decode()[40:80] not in dump
    # MUTUAL: the CA from the credential's ca.crt, else from <name>-cacert (Istio's convention)
    snap = compile_(gateway({"mode": "MUTUAL", "credentialName": "shop"}), tls_secret("shop"),
                    secret("shop-cacert", type_="Opaque", ca_crt=CA.root_pem))
    [cert] = snap.listeners[0].tls.certificates
    assert (cert.mode, cert.ca_pem) == ("MUTUAL", CA.root_pem)
    snap = compile_(gateway({"mode": "MUTUAL", "credentialName": "shop"}), tls_secret("shop", ca_crt=CA.root_pem))
    assert snap.listeners[0].tls.certificates[0].ca_pem == CA.root_pem


def test_a_missing_credential_costs_only_its_server_and_says_so():
    gw = gateway({"mode": "SIMPLE", "credentialName": "gone"})
    gw["spec"]["servers"].append({"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]})
    snap = compile_(gw, tls_secret("gone", namespace="default"))
    assert [(l.port, l.protocol) for l in snap.listeners] == [(8080, "HTTP")]
    assert ("Gateway default/edge: spec.servers[0].tls.credentialName: no Secret istio-system/gone (the credential "
            "is looked up in the gateway proxy's namespace, istio-system); this server is not served") in snap.warnings
    snap = compile_(gateway({"mode": "MUTUAL", "credentialName": "shop"}), tls_secret("shop"))
    assert snap.listeners == ()
    assert any("spec.servers[0].tls.credentialName: mode MUTUAL needs the CA that client certificates must chain "
               "to: no ca.crt in Secret istio-system/shop and no Secret istio-system/shop-cacert" in w
               for w in snap.warnings), snap.warnings


def test_client_certificate_checks_belong_to_the_mutual_modes_and_pins_are_checked():
    base = {"serverCertificate": "/c.pem", "privateKey": "/k.pem"}
    errors = decode(gateway({"mode": "SIMPLE", **base, "subjectAltNames": ["spiffe://x"],
                             "verifyCertificateSpki": ["x"], "caCrl": "/crl.pem"})).errors
    prefix = "Gateway default/edge: spec.servers[0].tls"
    assert errors == [
        f"{prefix}.caCrl: certificate revocation lists are not supported yet; refused rather than ignored",
        f"{prefix}.verifyCertificateSpki[0]: must be the base64 SHA-256 digest of a public key (44 characters, "
        "e.g. `openssl x509 -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -binary | base64`)",
        f"{prefix}.subjectAltNames: checks client certificates, which mode SIMPLE does not ask for: use MUTUAL, "
        "OPTIONAL_MUTUAL or ISTIO_MUTUAL",
        f"{prefix}.verifyCertificateSpki: checks client certificates, which mode SIMPLE does not ask for: use "
        "MUTUAL, OPTIONAL_MUTUAL or ISTIO_MUTUAL"]
    errors = decode(gateway({"mode": "MUTUAL", **base, "caCertificates": "/ca.pem",
                             "verifyCertificateHash": ["AB:CD"]})).errors
    assert errors == [f"{prefix}.verifyCertificateHash[0]: must be a hex SHA-256 digest of the certificate "
                      "(64 hex digits, colons allowed), got 'AB:CD'"]
    errors = decode(gateway({"mode": "MUTUAL", **base})).errors
    assert errors == [f"{prefix}.caCertificates: required for mode MUTUAL without credentialName"]
    errors = decode(gateway({"mode": "SIMPLE", **base, "credentialName": "x"})).errors
    assert errors == [f"{prefix}.{k}: give either credentialName or serverCertificate and privateKey, not both"
                      for k in ("serverCertificate", "privateKey")]
    result = decode(gateway({"mode": "SIMPLE", **base, "caCertificates": "/ca.pem"}))
    assert result.errors == [] and result.warnings == [
        f"{prefix}.caCertificates: only verifies client certificates (MUTUAL modes); mode SIMPLE asks for none, "
        "so it is not used"]


def test_a_secret_is_pushed_only_to_the_gateways_that_reference_it():
    from controlplane.resources import proxy_view, redacted
    from controlplane.scope import NOT_GRANTED, Identity, select_resources
    gw = gateway({"mode": "MUTUAL", "credentialName": "shop"}, namespace="shop")
    gw["spec"]["selector"] = {"istio": "ingressgateway"}
    resources = [proxy_view(o) for o in (gw, tls_secret("shop"), secret("shop-cacert", type_="Opaque", ca_crt=CA.root_pem),
                                         tls_secret("unused"), tls_secret("shop", namespace="other"))]

    def secrets_for(namespace, mode="gateway", labels=(("istio", "ingressgateway"),), granted=True):
        identity = Identity(namespace, mode, labels, secrets_granted=granted, secrets_refusal="" if granted else "no")
        sent = [o for o in select_resources(resources, identity) if o["kind"] == "Secret"]
        assert all(("data" in o) == granted for o in sent)
        return sorted(f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in sent)

    assert secrets_for(GW_NS) == ["istio-system/shop", "istio-system/shop-cacert"]
    assert secrets_for("other") == ["other/shop"]
    assert secrets_for(GW_NS, labels=(("istio", "eastwest"),)) == []          # its Gateways do not name them
    assert secrets_for(GW_NS, mode="sidecar") == []
    # an identity not granted Secrets gets their names and why, never their data (the default)
    assert secrets_for(GW_NS, granted=False) == ["istio-system/shop", "istio-system/shop-cacert"]
    stub = next(o for o in select_resources(resources, Identity(GW_NS, "gateway", (("istio", "ingressgateway"),)))
                if o["kind"] == "Secret")
    assert stub == {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {
        "name": "shop", "namespace": GW_NS, "annotations": {"meshproxy.io/secret-withheld": NOT_GRANTED}}}
    # what the API shows of a Secret: no data, and kubectl's copy of the data dropped too
    applied = dict(tls_secret("shop"), metadata={"name": "shop", "namespace": GW_NS, "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": json.dumps(tls_secret("shop"))}})
    shown = json.dumps(redacted(applied))
    assert "kubernetes.io/tls" in shown and b64(SERVER.key_pem)[:40] not in shown and "tls.key" not in shown
    assert "spec" not in proxy_view(applied) and proxy_view(applied)["data"] == applied["data"]


def test_a_withheld_secret_costs_only_its_server_and_says_why():
    from controlplane.scope import withheld_secret
    gw = gateway({"mode": "SIMPLE", "credentialName": "shop"})
    gw["spec"]["servers"].append({"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]})
    snap = compile_(gw, withheld_secret(tls_secret("shop"), "not granted here"))
    assert [(l.port, l.protocol) for l in snap.listeners] == [(8080, "HTTP")]
    assert ("Gateway default/edge: spec.servers[0].tls.credentialName: Secret istio-system/shop withheld by the "
            "control plane: not granted here; this server is not served") in snap.warnings
    # a withheld -cacert Secret says so too, rather than "no CA"
    snap = compile_(gateway({"mode": "MUTUAL", "credentialName": "shop"}), tls_secret("shop"),
                    withheld_secret(secret("shop-cacert", type_="Opaque", ca_crt=CA.root_pem), "no"))
    assert snap.listeners == () and ("Gateway default/edge: spec.servers[0].tls.credentialName: Secret "
                                     "istio-system/shop-cacert withheld by the control plane: no; this server is "
                                     "not served") in snap.warnings
    # a withheld Secret carries no data
    result = decode(dict(withheld_secret(tls_secret("x"), "no"), data=tls_secret("x")["data"]))
    assert result.errors == ["Secret istio-system/x: metadata.annotations.meshproxy.io/secret-withheld: a withheld "
                             "Secret carries no data"]
