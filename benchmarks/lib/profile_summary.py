"""Turn py-spy's raw (collapsed stack) output into a short "where the time goes" markdown summary."""
from __future__ import annotations

import re
from collections import Counter

_COUNT = re.compile(r"^(.*) (\d+)$")
_LINE = re.compile(r":\d+\)$")


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """Records of ``frame;frame;... count``; a process frame may span lines (multi-line argv)."""
    out, pending = [], ""
    for line in text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        m = _COUNT.match(pending.replace("\n", " "))
        if m and (";" in m.group(1) or not pending.startswith("process ")):
            out.append((m.group(1).split(";"), int(m.group(2))))
            pending = ""
    return out


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def _func(frame: str) -> str:
    """'fn (path/to/file.py:123)' -> 'fn (file.py)': per function, not per line.  A frame py-spy
    read while the interpreter was changing it comes out as garbage bytes: named as such."""
    if _UNPRINTABLE.search(frame):
        return "(frame py-spy could not read)"
    frame = _LINE.sub(")", frame.strip())
    name, sep, where = frame.partition(" (")
    if sep:
        where = where.rstrip(")").rsplit("/", 1)[-1]
        return f"{name} ({where})"
    return frame


def _is_meta(frame: str) -> bool:
    return frame.startswith("process ") or frame.startswith("thread ")


def summarize(text: str, top: int = 20) -> str:
    records = parse_collapsed(text)
    total = sum(c for _, c in records)
    if not total:
        return "_no samples (the process was idle or py-spy could not attach)_\n"
    self_t, incl, files = Counter(), Counter(), Counter()
    for frames, count in records:
        frames = [_func(f) for f in frames if not _is_meta(f)]
        if not frames:
            continue
        self_t[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        leaf = frames[-1]
        files[leaf[leaf.rfind("(") + 1:-1] if "(" in leaf else leaf] += count
    lines = [f"{total} samples of non-idle threads.", "", "Self time (the function on top of the stack; "
             "time in C code it calls, including syscalls, counts here):", "",
             "| % | samples | function |", "|---|---|---|"]
    lines += [f"| {c / total:.1%} | {c} | `{f}` |" for f, c in self_t.most_common(top)]
    lines += ["", "Inclusive time (function anywhere on the stack):", "", "| % | samples | function |", "|---|---|---|"]
    lines += [f"| {c / total:.1%} | {c} | `{f}` |" for f, c in incl.most_common(top)]
    lines += ["", "Self time by file:", "", "| % | file |", "|---|---|"]
    lines += [f"| {c / total:.1%} | `{f}` |" for f, c in files.most_common(12)]
    return "\n".join(lines) + "\n"
