"""Replay the bad-HTTP corpora (tests/corpus/data) through both codec backends, at codec level.

Asserted: every verdict the corpus states as REJECT (with its status) or ACCEPT, for one
write, 1-byte writes and seeded random splits; both backends agree; nothing is delivered after a
rejection, not even a valid request coalesced behind the bad bytes; llhttp's strict-mode request
errors are refused.  Everything else is recorded by ``report.py`` in docs/corpus-results.md."""
from __future__ import annotations

import pytest

from replay import BACKENDS, CORPORA, read_tsv, replay, smuggling_expectation

SMUGGLING = CORPORA / "smuggling"
LLHTTP = CORPORA / "llhttp"
FOLLOW_UP = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
MODES = [("one", 0), ("bytes", 0), ("rand", 1), ("rand", 2)]

# Stricter than the corpus, on purpose (triaged in docs/corpus-results.md): llhttp refuses
# these and we keep both backends on one verdict.
STRICTER_THAN_CORPUS = {"rfc-trailer-framing-fields", "h11-cl-duplicate-same-0"}

assert SMUGGLING.is_dir(), f"the corpus data is part of the repository: {SMUGGLING} not found"

ROWS = read_tsv(SMUGGLING / "cases.tsv")
REQUEST_ROWS = [r for r in ROWS if r["file"].startswith("requests/")]
RESPONSE_ROWS = [r for r in ROWS if r["file"].startswith("responses/")]


def _verdicts(backend, data, response=False):
    outs = [replay(backend, data, mode, seed, response=response) for mode, seed in MODES]
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", REQUEST_ROWS, ids=lambda r: r["id"])
def test_smuggling_request_gets_the_stated_verdict_whatever_the_read_sizes(row, backend):
    data = (SMUGGLING / row["file"]).read_bytes()
    kind, codes = smuggling_expectation(row)
    outs = _verdicts(backend, data)
    verdicts = {o.verdict for o in outs}
    assert len(verdicts) == 1, f"verdict depends on read sizes: {verdicts}"
    assert all(o.after_error == 0 for o in outs)
    out = outs[0]
    if row["id"] in STRICTER_THAN_CORPUS:
        assert out.status == 400
    elif kind == "reject":
        assert out.status in codes, f"expected {codes}, got {out.verdict}"
    elif kind == "accept":
        assert out.status == 0, f"expected accept, got {out.verdict}"
    elif kind == "accept_then_reject":
        assert (out.complete, out.status) == (1, 400)


@pytest.mark.parametrize("row", REQUEST_ROWS, ids=lambda r: r["id"])
def test_both_backends_give_the_same_verdict(row):
    data = (SMUGGLING / row["file"]).read_bytes()
    assert replay("httptools", data).verdict == replay("h11", data).verdict


# Cases refused on their own bytes; an incomplete message (a head cut short) is left out,
# since a follow-up request would become part of it.
REFUSED_ALONE = [r for r in REQUEST_ROWS if smuggling_expectation(r)[0] == "reject"
                 and replay("httptools", (SMUGGLING / r["file"]).read_bytes()).status != 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", REFUSED_ALONE, ids=lambda r: r["id"])
def test_a_valid_request_behind_rejected_bytes_is_never_delivered(row, backend):
    data = (SMUGGLING / row["file"]).read_bytes()
    alone = replay(backend, data)
    assert alone.status != 0, "both backends refuse these bytes on their own"
    for mode, seed in MODES[:3]:
        out = replay(backend, data + FOLLOW_UP, mode, seed)
        assert out.status, out.verdict
        assert len(out.heads) == len(alone.heads) and out.after_error == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", RESPONSE_ROWS, ids=lambda r: r["id"])
def test_bad_upstream_response_is_a_502_or_closes_the_connection(row, backend):
    data = (SMUGGLING / row["file"]).read_bytes()
    outs = _verdicts(backend, data, response=True)
    assert len({o.verdict for o in outs}) == 1
    out = outs[0]
    if out.status:
        assert out.status == 502
    else:
        # accepted only as a complete response that ends the upstream connection
        assert out.heads and not out.heads[-1].keep_alive, out.verdict


def _llhttp_rows(kind):
    if not (LLHTTP / "cases.tsv").is_file():
        return []
    return [r for r in read_tsv(LLHTTP / "cases.tsv")
            if r["kind"] == kind and r["llhttp_mode"] == kind and r["llhttp_result"].startswith("error")
            and not r["llhttp_result"].startswith(("error 22", "error 23"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", _llhttp_rows("request"), ids=lambda r: r["file"][:60])
def test_llhttp_strict_request_error_is_refused(row, backend):
    data = (LLHTTP / row["file"]).read_bytes()
    outs = _verdicts(backend, data)
    assert all(o.after_error == 0 for o in outs)
    assert len({o.verdict for o in outs}) == 1
    if "Data after `Connection: close`" in row["llhttp_result"]:
        # our policy: the closing request is served, later bytes are never parsed
        assert outs[0].complete == len(outs[0].heads) == 1
        return
    out = outs[0]
    if not out.status and not out.heads and b"\r\n\r\n" not in data:
        # the input stops inside a head: we wait for its end; completing it must be refused
        out = replay(backend, data + b"\r\n\r\n")
    assert out.status, f"{row['llhttp_result']}: we {out.verdict}"
