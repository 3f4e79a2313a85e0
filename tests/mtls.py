"""Certificates for mTLS tests, made with ``cryptography``: a mesh root, SPIFFE workload
certificates, and a small stand-in for the workload certificate manager (the same
``server_context`` / ``client_context`` calls as meshproxy.security's CertificateManager)."""
from __future__ import annotations

import datetime
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes
    root_pem: bytes
    identity: str = ""             # the SPIFFE id it names ("" if none)

    def files(self, directory) -> tuple[str, str, str]:
        """(cert, key, root) written to ``directory``."""
        paths = []
        for suffix, data in (("crt", self.cert_pem), ("key", self.key_pem), ("root", self.root_pem)):
            f = tempfile.NamedTemporaryFile(dir=directory, suffix="." + suffix, delete=False)
            f.write(data)
            f.close()
            paths.append(f.name)
        return tuple(paths)


class MeshCA:
    def __init__(self, name: str = "mesh root"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=10))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                    critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.root_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, spiffe: str = "", dns: tuple[str, ...] = (), valid_from: float = -3600,
              valid_for: float = 86400) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans = [x509.UniformResourceIdentifier(spiffe)] if spiffe else []
        sans += [x509.DNSName(d) for d in dns]
        builder = (x509.CertificateBuilder().subject_name(_name(dns[0] if dns else "workload"))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now + datetime.timedelta(seconds=valid_from))
                   .not_valid_after(now + datetime.timedelta(seconds=valid_from + valid_for))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=bool(spiffe) and not dns)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), self.root_pem, spiffe)


class StaticCertificates:
    """One workload certificate, no renewal: what the proxy asks of its certificate manager."""

    def __init__(self, issued: Issued, directory):
        self.issued = issued
        self.cert_file, self.key_file, self.root_file = issued.files(directory)
        self.current = issued

    def server_context(self, alpn=("http/1.1",), client_cert: str = "required") -> ssl.SSLContext:
        from meshproxy.security.tls import server_context
        return server_context(self.issued.cert_pem, self.issued.key_pem, self.issued.root_pem,
                              client_cert="required" if client_cert == "required" else "optional",
                              alpn=alpn or None)

    def client_context(self, alpn=()) -> ssl.SSLContext:
        return client_context(self.issued, self.root_file, self.cert_file, self.key_file, alpn)


def client_context(issued: Issued | None, root_file: str, cert_file: str = "", key_file: str = "",
                   alpn=()) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(root_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


# ---------------------------------------------------------------- in-process sidecars for mTLS tests


def compile_sidecar(text: str, listen: int):
    """The snapshot of a sidecar in namespace foo, listening for HTTP on 127.0.0.1:listen, from
    Istio YAML (every document must decode)."""
    import yaml
    from meshproxy.config.compile import ProxyIdentity, compile_snapshot
    from meshproxy.config.decode import decode_documents
    from meshproxy.config.resources import Document
    decoded = decode_documents([Document("t.yaml", i, doc) for i, doc in enumerate(yaml.safe_load_all(text))])
    assert not decoded.errors, decoded.errors
    return compile_snapshot(decoded.resources, ProxyIdentity(namespace="foo", http_listen=("127.0.0.1", listen))).snapshot


async def start_worker(snapshot, certificates, seed: int, telemetry=None):
    """A started in-process worker serving ``snapshot`` with the workload ``certificates``
    (and ``telemetry``: a workload's, see :func:`workload_telemetry`; default: no workload)."""
    import asyncio
    import random
    from meshproxy.bootstrap import Worker, WorkerOptions
    from meshproxy.config.store import SnapshotStore
    from meshproxy.proxy.observe import Telemetry
    worker = Worker(asyncio.get_running_loop(), SnapshotStore(snapshot), WorkerOptions(),
                    telemetry if telemetry is not None else Telemetry(), rng=random.Random(seed))
    worker.certificates = certificates
    await worker.start()
    return worker


async def get_status(port: int) -> bytes:
    """GET /status for httpbin.foo on its own connection; the whole answer."""
    import asyncio
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /status HTTP/1.1\r\nHost: httpbin.foo\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def workload_telemetry(labels: dict, namespace: str, node: str, service_account: str = "",
                       metadata_namespace: str | None = None):
    """The telemetry of a workload with ``labels`` in ``namespace``, as ``meshproxy run`` builds it:
    its own labels on its series and its peer metadata for the exchange (which may claim
    ``metadata_namespace`` instead, to play a workload that lies about where it runs)."""
    from meshproxy.proxy.observe import Telemetry
    from meshproxy.telemetry.metrics import workload_peer
    from meshproxy.telemetry.peer_metadata import PeerMetadataExchange, own_metadata
    fields = own_metadata(labels, metadata_namespace or namespace, node=node, service_account=service_account)
    return Telemetry(source=workload_peer(labels, namespace),
                     peer_exchange=PeerMetadataExchange(fields, f"sidecar~{node}.{namespace}"))
