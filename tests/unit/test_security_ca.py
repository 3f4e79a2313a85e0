"""The CA, SPIFFE ids, tokens and the API's permission table, in-process (no network)."""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane.security.ca import (ACTIVATED, PREPARED, STABLE, CaState, CertificateAuthority, CsrRejected,
                                      generate_root)
from controlplane.security.service import ANONYMOUS, Denied, Principal, Security
from controlplane.security.tokens import Tokens, TokenRefused
from controlplane.store_sqlite import SqliteStore
from meshproxy.security import CertificateManager, InvalidSpiffeId, SpiffeId
from meshproxy.security.manager import make_csr, new_key


def authority(ttl: float = 3600.0) -> CertificateAuthority:
    root = generate_root("cluster.local")
    return CertificateAuthority(CaState((root,), root.fingerprint), default_ttl=ttl)


def csr_for(uri_names: list[str], key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uri_names]), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_spiffe_ids_parse_and_print_the_istio_form_and_refuse_other_shapes():
    sid = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
    assert (sid.trust_domain, sid.namespace, sid.service_account) == ("cluster.local", "shop", "cart")
    assert sid.principal == "cluster.local/ns/shop/sa/cart"
    for bad in ("https://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a", "spiffe://cluster.local/sa/b/ns/a",
                "spiffe://cluster.local/ns/A_B/sa/b", "spiffe://Cluster Local/ns/a/sa/b"):
        with pytest.raises(InvalidSpiffeId):
            SpiffeId.parse(bad)


def test_signed_workload_certificate_carries_only_the_spiffe_id_and_is_short_lived():
    ca = authority(ttl=120)
    csr, identity = ca.check_csr(csr_for(["spiffe://cluster.local/ns/shop/sa/cart"]))
    cert = x509.load_pem_x509_certificate(ca.sign(csr, identity))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [identity.uri]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(seconds=120) <= lifetime <= dt.timedelta(seconds=127)
    cert.verify_directly_issued_by(ca.state.signer.cert)


@pytest.mark.parametrize("uris, reason", [
    ([], "csr_identity"),
    (["spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d"], "csr_identity"),
    (["spiffe://other.domain/ns/a/sa/b"], "csr_identity"),
    (["https://example.com/"], "csr_identity"),
])
def test_csr_without_exactly_one_spiffe_id_of_this_trust_domain_is_refused(uris, reason):
    with pytest.raises(CsrRejected) as err:
        authority().check_csr(csr_for(uris))
    assert err.value.reason == reason


def test_csr_that_is_garbage_too_large_or_has_a_weak_or_oversized_key_is_refused():
    ca = authority()
    with pytest.raises(CsrRejected) as err:
        ca.check_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n")
    assert err.value.reason == "csr_parse"
    with pytest.raises(CsrRejected) as err:
        ca.check_csr(b"A" * 20000)
    assert err.value.reason == "csr_too_large"
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(CsrRejected) as err:
        ca.check_csr(csr_for(["spiffe://cluster.local/ns/a/sa/b"], weak))
    assert err.value.reason == "csr_key" and "1024" in str(err.value)
    with pytest.raises(CsrRejected) as err:
        ca.check_csr(csr_for(["spiffe://cluster.local/ns/a/sa/b"], ec.generate_private_key(ec.SECP521R1())))
    assert err.value.reason == "csr_key"


def test_rotation_phases_keep_two_roots_until_finish_and_switch_the_signer_at_activate():
    ca = authority()
    old = ca.state.signing
    ca.set_state(ca.prepared())
    assert ca.state.phase == PREPARED and len(ca.state.roots) == 2 and ca.state.signing == old
    with pytest.raises(ValueError):
        ca.prepared()
    ca.set_state(ca.activated())
    new = ca.state.signing
    assert ca.state.phase == ACTIVATED and new != old and len(ca.state.roots) == 2
    ca.set_state(ca.finished())
    assert ca.state.phase == STABLE and [r.fingerprint for r in ca.state.roots] == [new]
    assert CaState.from_json(ca.state.to_json()) == ca.state


async def test_manager_certificates_from_an_in_process_ca_verify_each_other_over_mtls():
    ca = authority(ttl=60)
    client = CertificateManager(SpiffeId("cluster.local", "default", "sleep"), ca.issuer())
    server = CertificateManager(SpiffeId("cluster.local", "default", "httpbin"), ca.issuer())
    await client.start()
    await server.start()
    callers = []

    async def handle(reader, writer):
        from meshproxy.security import peer_identity
        callers.append(peer_identity(writer.get_extra_info("ssl_object")))
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server.server_context())
    port = srv.sockets[0].getsockname()[1]
    from meshproxy.security import check_peer
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client.client_context())
    assert check_peer(writer.get_extra_info("ssl_object"), [server.identity]) == server.identity
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    srv.close()
    assert callers == [client.identity]


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(str(tmp_path / "cp.db"))
    await s.start()
    yield s
    await s.close()


async def test_bootstrap_token_is_single_use_bound_to_its_identity_and_expires(store):
    now = [1000.0]
    tokens = Tokens(store, clock=lambda: now[0])
    cart = SpiffeId("cluster.local", "shop", "cart")
    t = await tokens.create_bootstrap("shop", "cart", 60, "test", "cluster.local")
    with pytest.raises(TokenRefused) as err:
        await tokens.consume_bootstrap(t["token"], SpiffeId("cluster.local", "shop", "payments"))
    assert err.value.reason == "wrong_identity"
    await tokens.consume_bootstrap(t["token"], cart)
    with pytest.raises(TokenRefused) as err:
        await tokens.consume_bootstrap(t["token"], cart)
    assert err.value.reason == "replayed"
    late = await tokens.create_bootstrap("shop", "cart", 60, "test", "cluster.local")
    now[0] += 61
    with pytest.raises(TokenRefused) as err:
        await tokens.consume_bootstrap(late["token"], cart)
    assert err.value.reason == "expired"
    with pytest.raises(TokenRefused) as err:
        await tokens.consume_bootstrap(t["token"][:-3] + "AAA", cart)
    assert err.value.reason == "unknown"


async def test_api_tokens_authenticate_with_their_scope_and_stop_when_revoked(store):
    tokens = Tokens(store, cache_seconds=0)
    view = await tokens.create_api("view", "dashboards", None, "test")
    assert (await tokens.authenticate(view["token"])).scope == "view"
    assert await tokens.revoke_api(view["id"])
    with pytest.raises(TokenRefused):
        await tokens.authenticate(view["token"])
    with pytest.raises(TokenRefused):
        await tokens.authenticate("mpa.0123456789abcdef.not-a-real-secret-but-long-enough-xx")


def test_permission_table_scopes_and_workload_rights():
    sec = Security(store=None, registry=None)
    view, edit = Principal("token:v", "view"), Principal("token:e", "edit")
    workload = Principal("spiffe://cluster.local/ns/shop/sa/cart", None, SpiffeId("cluster.local", "shop", "cart"))
    sec.authorize(view, "list", "GET")
    sec.authorize(edit, "replace", "PUT")
    sec.authorize(workload, "stream", "POST")
    sec.authorize(ANONYMOUS, "sec_certificates", "POST")
    for principal, route, method, code in [(view, "replace", "PUT", 403), (ANONYMOUS, "list", "GET", 401),
                                           (workload, "list", "GET", 403), (edit, "sec_api_create", "POST", 403),
                                           (workload, "some_future_route", "DELETE", 403)]:
        with pytest.raises(Denied) as err:
            sec.authorize(principal, route, method)
        assert err.value.code == code
    with pytest.raises(Denied):
        sec.check_own(workload, "default", "read the config")
    sec.check_own(workload, "shop", "read the config")


def test_manager_csr_names_its_identity_and_the_key_stays_with_it():
    key = new_key()
    csr = x509.load_pem_x509_csr(make_csr(SpiffeId("cluster.local", "a", "b"), key))
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/a/sa/b"]
    assert b"PRIVATE KEY" not in csr.public_bytes(serialization.Encoding.PEM)


def test_a_rotation_step_waits_for_every_live_certificate_of_the_previous_step():
    ca = authority()
    old = ca.state
    ca.set_state(ca.prepared())
    prepared = ca.state
    both = [r.fingerprint for r in prepared.roots]
    issued_before = {"identity": "spiffe://cluster.local/ns/a/sa/old", "signer": old.signing,
                     "bundle": [old.signing]}
    issued_after = {"identity": "spiffe://cluster.local/ns/a/sa/new", "signer": old.signing, "bundle": both}
    assert Security._outstanding(prepared, [issued_before, issued_after]) == ["spiffe://cluster.local/ns/a/sa/old"]
    assert Security._outstanding(prepared, [issued_after]) == []
    ca.set_state(ca.activated())
    activated = ca.state
    assert Security._outstanding(activated, [issued_after]) == ["spiffe://cluster.local/ns/a/sa/new"]
    assert Security._outstanding(activated, [dict(issued_after, signer=activated.signing)]) == []


async def test_a_reusable_bootstrap_token_serves_its_identity_until_it_expires(store):
    now = [1000.0]
    tokens = Tokens(store, clock=lambda: now[0])
    cart = SpiffeId("cluster.local", "shop", "cart")
    t = await tokens.create_bootstrap("shop", "cart", 60, "test", "cluster.local", reusable=True)
    await tokens.consume_bootstrap(t["token"], cart)
    await tokens.consume_bootstrap(t["token"], cart)          # a restarted sidecar
    with pytest.raises(TokenRefused) as err:
        await tokens.consume_bootstrap(t["token"], SpiffeId("cluster.local", "shop", "payments"))
    assert err.value.reason == "wrong_identity"
    now[0] += 61
    with pytest.raises(TokenRefused) as err:
        await tokens.consume_bootstrap(t["token"], cart)
    assert err.value.reason == "expired"
