"""The smuggling corpus through a real proxy process into a recording upstream.

For every request case the corpus says to REJECT: the client gets the stated 4xx, the
connection is closed, and the upstream receives nothing — not the bad request, and not
a valid request written right behind it.  Cases the corpus says to ACCEPT reach the
upstream re-framed by the proxy.  Both codec backends.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from helpers import ProxyProcess, service_entry_yaml
from replay import CORPORA, read_tsv, replay, smuggling_expectation

SMUGGLING = CORPORA / "smuggling"
ROWS = read_tsv(SMUGGLING / "cases.tsv")
REQUEST_ROWS = [r for r in ROWS if r["file"].startswith("requests/")]
REJECT_ROWS = [r for r in REQUEST_ROWS if smuggling_expectation(r)[0] == "reject"]
# Deliberately stricter than the corpus (llhttp refuses these; both backends stay on one
# verdict; triaged in docs/corpus-results.md): answered 400.
STRICTER_THAN_CORPUS = {"rfc-trailer-framing-fields", "h11-cl-duplicate-same-0"}
ACCEPT_ROWS = [r for r in REQUEST_ROWS if smuggling_expectation(r)[0] == "accept"
               and r["id"] not in STRICTER_THAN_CORPUS]
STRICTER_ROWS = [r for r in REQUEST_ROWS if r["id"] in STRICTER_THAN_CORPUS]
FOLLOW_UP = b"GET /follow-up HTTP/1.1\r\nHost: a\r\n\r\n"


class RecordingUpstream:
    """A raw TCP upstream in a thread: records every byte, answers each request head
    with a small 200 (good enough for bodiless requests and CL bodies it ignores)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.received += data
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def take(self) -> bytes:
        with self.lock:
            data = bytes(self.received)
            self.received.clear()
            return data


@pytest.fixture(scope="module")
def upstream_rec():
    return RecordingUpstream()


@pytest.fixture(scope="module", params=["httptools", "h11"])
def corpus_proxy(request, upstream_rec, tmp_path_factory):
    cfg = tmp_path_factory.mktemp(f"corpus-{request.param}")
    # the Host values the corpus's accepted cases use, all routed to the recording upstream
    (cfg / "mesh.yaml").write_text(service_entry_yaml("a", 80, [("127.0.0.1", upstream_rec.port, {})])
                                   .replace("hosts: [a]", "hosts: [a, localhost, whatever, b.example]"))
    # the corpus's expectations assume a 16 KiB header block (the codec-level replay uses the same)
    proxy = ProxyProcess(cfg, codec=request.param,
                         extra_args=["--header-timeout", "1", "--max-header-bytes", "16384"]).start()
    yield proxy
    proxy.stop()


def _exchange(port: int, data: bytes, timeout: float = 2.5) -> tuple[bytes, bool]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        s.settimeout(timeout)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return out, False
            except OSError:
                return out, True
            if not chunk:
                return out, True
            out += chunk
        return out, False


@pytest.mark.parametrize("row", REJECT_ROWS, ids=lambda r: r["id"])
def test_rejected_case_gets_its_status_a_closed_connection_and_nothing_upstream(row, corpus_proxy, upstream_rec):
    data = (SMUGGLING / row["file"]).read_bytes()
    _, codes = smuggling_expectation(row)
    upstream_rec.take()
    # a valid request written right behind the bad bytes must not be answered either;
    # a head that is incomplete on its own would be completed by it, so it goes alone
    complete = replay(corpus_proxy.codec, data).status != 0
    response, closed = _exchange(corpus_proxy.port, data + FOLLOW_UP if complete else data)
    status = int(response[9:12]) if response.startswith(b"HTTP/1.1 ") else 0
    if row["id"] in STRICTER_THAN_CORPUS:
        codes = {400}
    # a head the proxy never saw complete ends at the header timeout with 408
    assert status in codes | {408}, f"expected {sorted(codes)}, got {response[:60]!r}"
    assert response.count(b"HTTP/1.1 ") == 1, "nothing after the rejection may be answered"
    assert closed
    time.sleep(0.02)
    assert upstream_rec.take() == b""


@pytest.mark.parametrize("row", ACCEPT_ROWS, ids=lambda r: r["id"])
def test_accepted_case_reaches_the_upstream_reframed(row, corpus_proxy, upstream_rec):
    data = (SMUGGLING / row["file"]).read_bytes()
    upstream_rec.take()
    response, _ = _exchange(corpus_proxy.port, data, timeout=1.5)
    assert response.startswith(b"HTTP/1.1 "), response[:60]
    status = int(response[9:12])
    if status == 200:
        forwarded = upstream_rec.take()
        assert forwarded, "an accepted request must reach the upstream"
        head = forwarded.split(b"\r\n\r\n", 1)[0].lower()
        assert not (b"\r\ncontent-length:" in head and b"\r\ntransfer-encoding:" in head)
    else:
        # routing-level answers (e.g. 404 for a host that is not in the mesh) are allowed,
        # framing-level refusals are not
        assert status not in (400, 411, 413, 414, 431, 501, 505), response[:80]


@pytest.mark.parametrize("row", STRICTER_ROWS, ids=lambda r: r["id"])
def test_cases_we_refuse_on_purpose_get_400_and_nothing_upstream(row, corpus_proxy, upstream_rec):
    data = (SMUGGLING / row["file"]).read_bytes()
    upstream_rec.take()
    response, closed = _exchange(corpus_proxy.port, data)
    assert response.startswith(b"HTTP/1.1 400") and closed
    time.sleep(0.02)
    assert upstream_rec.take() == b""
