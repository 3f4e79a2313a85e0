"""Turn ``perf report`` output into a short "where the time goes" markdown summary.

py-spy reads Python frames only, so with the compiled hot path it sees the event loop and
nothing under it.  ``perf`` samples the CPU: kernel, libpython, llhttp and the compiled modules
alike.  Cython's C symbols (``__pyx_f_9meshproxy_5proxy_8pipeline_8Exchange_start``) are shown
as the Python names they come from (``meshproxy.proxy.pipeline.Exchange.start``).
"""
from __future__ import annotations

import re
import subprocess

_ROW = re.compile(r"^\s*([\d.]+)%\s+(.*?)\s*$")
_PYX = re.compile(r"^__pyx_(f|pw|pf|gb|tp_[a-z_]+|getprop|setprop)_(\d.*)$")


def python_name(symbol: str) -> str:
    """A Cython C symbol as the dotted Python name it implements; other symbols unchanged."""
    m = _PYX.match(symbol)
    if not m:
        return symbol
    kind, rest, parts = m.group(1), m.group(2), []
    # length-prefixed components (module path, class) while one fits and a "_" or the end
    # follows it; what is left is the function, after its method index (``3start``)
    while True:
        lead = re.match(r"(\d+)(.*)", rest)
        if not lead:
            break
        n, tail = int(lead.group(1)), lead.group(2)
        part = tail[:n]
        if len(part) < n or part.strip("_") == "" or tail[n:n + 1] not in ("_", ""):
            break
        parts.append(part)
        rest = tail[n + 1:]
    rest = re.sub(r"^\d+", "", rest)
    if rest:
        parts.append(rest)
    name = ".".join(parts) or symbol
    return f"{name} ({kind[3:]})" if kind.startswith("tp_") else name


def _report(data: str, sort: str) -> list[tuple[float, str]]:
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                          "--percent-limit", "0.3", "--sort", sort],
                         capture_output=True, text=True, timeout=120).stdout
    rows = []
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        m = _ROW.match(line)
        if m:
            rows.append((float(m.group(1)), m.group(2)))
    return rows


def summarize(data: str, top: int = 25) -> str:
    by_dso = _report(data, "dso")
    by_sym = _report(data, "dso,sym")
    lines = ["Self time by shared object (kernel = system time of this process):", "",
             "| % | shared object |", "|---|---|"]
    lines += [f"| {pct:.1f}% | `{dso}` |" for pct, dso in by_dso[:12]]
    lines += ["", f"Top {top} functions by self time (Cython symbols shown as Python names):", "",
              "| % | shared object | function |", "|---|---|---|"]
    for pct, text in by_sym[:top]:
        dso, _, sym = text.partition(" ")
        sym = re.sub(r"^\[[.k]\]\s+", "", sym.strip())
        lines.append(f"| {pct:.1f}% | `{dso}` | `{python_name(sym)}` |")
    return "\n".join(lines) + "\n"
