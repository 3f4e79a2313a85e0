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


def _every_input():
    """(corpus, file, response?) for every input the corpora hold."""
    out = []
    for name, is_response in (("smuggling", lambda r: r["file"].startswith("responses/")),
                              ("llhttp", lambda r: r["kind"] == "response"),
                              ("http11probe", lambda r: False)):
        tsv = CORPORA / name / "cases.tsv"
        for r in read_tsv(tsv):
            if r.get("file") and (tsv.parent / r["file"]).is_file():
                out.append((name, r["file"], is_response(r)))
    return out


# Inputs on which the llhttp-based backends are still more lenient than the h11 one: llhttp reads
# the start line itself and its callbacks do not show the raw bytes the h11 backend checks
# (the protocol name, runs of SP, a missing version), nor where a response ends in a read
# that also holds the start of the next one.  Listed so that the list can only shrink: a
# new disagreement fails, and so does a listed one that is gone.
HTTPTOOLS_MORE_LENIENT = {
    "llhttp/request__content-length__empty-content-length.http",        # waits; h11 refuses the line at once
    "llhttp/request__method__source-request-with-ice.http",            # ICE/1.0 taken as HTTP/1.0
    "llhttp/request__method__options-request-with-rtsp.http",          # RTSP/1.0 taken as HTTP/1.0
    "llhttp/request__method__announce-request-with-rtsp.http",         # RTSP/1.0 taken as HTTP/1.0
    "llhttp/request__method__pri-request-http2.http",                  # waits for the preface's end
    "llhttp/request__sample__no-http-version.http",                    # HTTP/0.9 line: waits
    "http11probe/rfc9112-2-3-http09-request.http",                      # HTTP/0.9 line: waits
    "http11probe/rfc9112-3-multi-sp-request-line.http",                 # "GET  / HTTP/1.1" accepted
    "llhttp/response__connection__http-1-0-with-keep-alive-and-204-status.http",  # EOF in a 2nd head
    "llhttp/response__connection__http-1-1-with-204-status.http",                 # EOF in a 2nd head
    "llhttp/response__connection__http-304-with-content-length.http",  # empty line before a status line
    "llhttp/response__connection__http-100-first-then-400.http",       # empty line before a status line
    "llhttp/response__pipelining__should-parse-multiple-events.http",  # empty line before a status line
}
EVERY_INPUT = _every_input()


@pytest.mark.parametrize("corpus,file,response", EVERY_INPUT, ids=[f"{c}/{f}" for c, f, _ in EVERY_INPUT])
def test_both_backends_give_the_same_verdict_on_every_corpus_input(corpus, file, response):
    data = (CORPORA / corpus / file).read_bytes()
    verdicts = {b: [replay(b, data, mode, seed, response=response).verdict for mode, seed in MODES[:3]]
                for b in BACKENDS}
    if "llhttp" in verdicts:  # the same parsers over llhttp's C API: the same verdicts
        assert verdicts.pop("llhttp") == verdicts["httptools"]
    if f"{corpus}/{file}" in HTTPTOOLS_MORE_LENIENT:
        assert verdicts["httptools"] != verdicts["h11"], "now agreed: take it off HTTPTOOLS_MORE_LENIENT"
        assert all(v.startswith("reject") for v in verdicts["h11"])
    else:
        assert verdicts["httptools"] == verdicts["h11"]


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
