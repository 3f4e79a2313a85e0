"""Shared corpus replay: feed a file's bytes to a codec backend and summarise what came out."""
from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from meshproxy.codec import BACKENDS as _BACKENDS, make_request_parser, make_response_parser
from meshproxy.codec.api import CodecLimits, ProtocolError

# Third-party test data kept in the repository (origin and licence in data/README.md and each
# corpus's README), so a fresh clone needs nothing beside it.
CORPORA = Path(__file__).resolve().parent / "data"
BACKENDS = tuple(sorted(_BACKENDS))   # llhttp only where it is available (compiled)
# h11's default head limit, so that the 20 KB "endless header" case hits it
CORPUS_LIMITS = CodecLimits(max_header_bytes=16 * 1024)


@dataclass
class Outcome:
    heads: list = field(default_factory=list)
    bodies: list = field(default_factory=list)  # body bytes per message
    complete: int = 0
    status: int = 0  # 0 = no error
    after_error: int = 0  # events delivered after the error (must stay 0)

    @property
    def verdict(self) -> str:
        if self.status:
            return f"reject {self.status} after {self.complete}"
        return f"accept {self.complete}" + ("" if len(self.heads) == self.complete else "+partial")


class Recorder:
    def __init__(self, out: Outcome):
        self.out = out
        self.failed = False

    def _guard(self):
        if self.failed:
            self.out.after_error += 1

    def on_request_head(self, head):
        self._guard(); self.out.heads.append(head); self.out.bodies.append(b"")

    on_response_head = on_request_head

    def on_body(self, data):
        self._guard(); self.out.bodies[-1] += data

    def on_message_complete(self):
        self._guard(); self.out.complete += 1


def splits(data: bytes, mode: str, seed: int = 0) -> list[bytes]:
    if mode == "one":
        return [data]
    if mode == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 64)
        out.append(data[i:i + n]); i += n
    return out


def replay(backend: str, data: bytes, mode: str = "one", seed: int = 0, response: bool = False,
           limits: CodecLimits = CORPUS_LIMITS, head_request: bool = False) -> Outcome:
    out = Outcome()
    rec = Recorder(out)
    if response:
        parser = make_response_parser(backend, rec, limits)
        if head_request:
            parser.expect_no_body()
    else:
        parser = make_request_parser(backend, rec, limits)
    try:
        for piece in splits(data, mode, seed):
            parser.feed(piece)
        if response:
            parser.feed_eof()
    except ProtocolError as err:
        out.status = err.status
        rec.failed = True
        # the parser is dead: more bytes must not produce events
        try:
            parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        except ProtocolError:
            pass
    return out


def read_tsv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ------------------------------------------------------------------ smuggling corpus expectations

def smuggling_expectation(row: dict) -> tuple[str, set[int]]:
    """("reject", allowed statuses) / ("accept", set()) / ("other", set()) from the expected text."""
    text = row["expected"]
    if "leftover bytes start a new, invalid request" in text:
        return "accept_then_reject", {400}
    if text.startswith("REJECT") or text.startswith("502"):
        codes = {int(c) for c in re.findall(r"\b(4\d\d|5\d\d)\b", text.split(";")[0] + text.split(".")[0])}
        if text.startswith("REJECT quickly"):
            codes |= {400}
        return "reject", codes or {400}
    if text.startswith("ACCEPT"):
        return "accept", set()
    return "other", set()
