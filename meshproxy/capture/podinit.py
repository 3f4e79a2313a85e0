"""``meshproxy pod-init``: the rules that send a pod's TCP traffic through its sidecar.

Run as root (CAP_NET_ADMIN) inside the pod's network namespace before the application starts,
like Istio's ``istio-iptables`` init container.  The rules are **nftables**, in one table of
their own (``table inet meshproxy``), for these reasons:

* the whole rule set is replaced in **one atomic transaction** (``nft -f``: create the table,
  delete it, create it again with the new rules): running pod-init twice, or with other flags,
  leaves exactly one correct rule set and never a half-installed one, without diffing chains;
* ``--cleanup`` deletes one table; rules of anyone else (other tables, ``iptables-nft`` rules in
  ``ip nat``) are never touched, so a namespace with foreign rules keeps them;
* the ``inet`` family covers IPv4 and IPv6 with one rule set;
* Debian's ``iptables`` is ``iptables-nft`` anyway: the same kernel NAT.  A ``redirect`` sets up
  conntrack NAT exactly as iptables' ``REDIRECT`` does, so the sidecar reads each connection's
  original destination with ``SO_ORIGINAL_DST`` the same way.

What is captured (A.1 of Istio's REDIRECT mode, in nftables words):

Outbound (``output`` hook, chain ``outbound``), first match wins:

1. ``--exclude-outbound-ports``: not captured;
2. traffic of the proxy's user/group id (``--proxy-uid``, default 1337) over ``lo`` to the pod's
   own (non-loopback) address: to the *inbound* capture port, so a call the sidecar routes to its
   own pod still enters through the inbound listener;
3. anything else of the proxy's uid/gid: never captured (no loops: the sidecar's upstream, control
   plane and DNS connections go out as they are);
4. with ``--capture-dns``: UDP and TCP port 53 to the DNS port (default 15053);
5. over ``lo``, or to 127.0.0.0/8 / ::1: not captured (app to app inside the pod);
6. ``--exclude-outbound-cidrs``: not captured;
7. every other TCP connection: to the outbound capture port (default 15001).

Inbound (``prerouting`` hook, chain ``inbound``): every TCP connection arriving at the pod goes
to the inbound capture port (default 15006) except ``--exclude-inbound-ports`` and the sidecar's
own health and metrics ports (``--health-port`` 15021, ``--metrics-port`` 15090), which are
always excluded so a prober or scraper outside the pod reaches them directly.

Building the rule set is a pure function (:func:`render`); applying it (:func:`apply`) runs
``nft`` and turns its failures into :class:`PodInitError` with what to grant.
"""
from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass

TABLE = "meshproxy"
FAMILY = "inet"


class PodInitError(Exception):
    """pod-init cannot do its job; the message says why and what to do."""


@dataclass(frozen=True)
class CaptureRules:
    proxy_uid: int = 1337
    proxy_gid: int | None = None            # default: same as proxy_uid
    outbound_port: int = 15001
    inbound_port: int = 15006
    dns_port: int = 15053
    health_port: int = 15021
    metrics_port: int = 15090
    capture_dns: bool = False
    exclude_outbound_cidrs: tuple[str, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    capture_inbound: bool = True

    @property
    def gid(self) -> int:
        return self.proxy_uid if self.proxy_gid is None else self.proxy_gid

    def inbound_excluded(self) -> tuple[int, ...]:
        return tuple(sorted({self.health_port, self.metrics_port, *self.exclude_inbound_ports}))


def parse_ports(text: str, what: str) -> tuple[int, ...]:
    """``"80,443"`` -> (80, 443); a clear error for anything that is not a port."""
    ports = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise PodInitError(f"{what}: {item!r} is not a port (1-65535)")
        ports.append(int(item))
    return tuple(ports)


def parse_cidrs(text: str, what: str) -> tuple[str, ...]:
    cidrs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            cidrs.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as err:
            raise PodInitError(f"{what}: {err}") from None
    return tuple(cidrs)


def _set(values) -> str:
    values = list(values)
    return str(values[0]) if len(values) == 1 else "{ " + ", ".join(str(v) for v in values) + " }"


def render(rules: CaptureRules) -> str:
    """The table's definition (nft syntax), as installed and as ``--dry-run`` prints it."""
    uid, gid = rules.proxy_uid, rules.gid
    v4 = [c for c in rules.exclude_outbound_cidrs if ipaddress.ip_network(c).version == 4]
    v6 = [c for c in rules.exclude_outbound_cidrs if ipaddress.ip_network(c).version == 6]
    out = []
    if rules.exclude_outbound_ports:
        out.append(f"tcp dport {_set(rules.exclude_outbound_ports)} return comment \"excluded outbound ports\"")
        out.append(f"udp dport {_set(rules.exclude_outbound_ports)} return")
    inbound_skip = _set(rules.inbound_excluded())
    if rules.capture_inbound:
        for owner in (f"meta skuid {uid}", f"meta skgid {gid}"):
            out.append(f"oifname \"lo\" {owner} ip daddr != 127.0.0.0/8 tcp dport != {inbound_skip} "
                       f"redirect to :{rules.inbound_port} comment \"proxy to its own pod: inbound\"")
            out.append(f"oifname \"lo\" {owner} ip6 daddr != ::1 tcp dport != {inbound_skip} "
                       f"redirect to :{rules.inbound_port}")
    out.append(f"meta skuid {uid} return comment \"the proxy's own traffic is never captured\"")
    out.append(f"meta skgid {gid} return")
    if rules.capture_dns:
        out.append(f"udp dport 53 redirect to :{rules.dns_port} comment \"DNS to the sidecar\"")
        out.append(f"tcp dport 53 redirect to :{rules.dns_port}")
    out.append("oifname \"lo\" return comment \"inside the pod\"")
    out.append("ip daddr 127.0.0.0/8 return")
    out.append("ip6 daddr ::1 return")
    if v4:
        out.append(f"ip daddr {_set(v4)} return comment \"excluded outbound CIDRs\"")
    if v6:
        out.append(f"ip6 daddr {_set(v6)} return")
    out.append(f"meta l4proto tcp redirect to :{rules.outbound_port} comment \"outbound capture\"")

    lines = [f"table {FAMILY} {TABLE} {{"]
    if rules.capture_inbound:
        lines += [
            "\tchain prerouting {",
            "\t\ttype nat hook prerouting priority dstnat; policy accept;",
            "\t\tmeta l4proto tcp jump inbound",
            "\t}",
            "\tchain inbound {",
            f"\t\ttcp dport {inbound_skip} return comment \"excluded inbound ports, health and metrics\"",
            f"\t\tmeta l4proto tcp redirect to :{rules.inbound_port} comment \"inbound capture\"",
            "\t}",
        ]
    lines += [
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        "\t\tjump outbound",
        "\t}",
        "\tchain outbound {",
        *(f"\t\t{rule}" for rule in out),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def transaction(rules: CaptureRules) -> str:
    """Install or replace, atomically: make sure the table exists, delete it, define it anew."""
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + render(rules)


def cleanup_transaction() -> str:
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which("nft") is None:
        raise PodInitError("pod-init needs the `nft` command (Debian package nftables)")
    return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, timeout=30)


def check_capability() -> None:
    """Refuse clearly when this process cannot change the namespace's netfilter rules."""
    result = _nft(["list", "tables"])
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit status {result.returncode}"
        raise PodInitError(
            "pod-init needs CAP_NET_ADMIN in the pod's network namespace to install its nftables "
            "rules: run it as root (in Kubernetes: an init container with securityContext "
            f"capabilities add [NET_ADMIN, NET_RAW] and runAsUser 0). nft said: {detail}")


def apply(rules: CaptureRules) -> str:
    check_capability()
    result = _nft(["-f", "-"], stdin=transaction(rules))
    if result.returncode != 0:
        raise PodInitError(f"nft refused the rule set: {result.stderr.strip()}")
    return render(rules)


def cleanup() -> None:
    check_capability()
    result = _nft(["-f", "-"], stdin=cleanup_transaction())
    if result.returncode != 0:
        raise PodInitError(f"nft could not remove table {FAMILY} {TABLE}: {result.stderr.strip()}")


def installed() -> str | None:
    """The table as the kernel holds it now, or None when it is not installed."""
    result = _nft(["list", "table", FAMILY, TABLE])
    return result.stdout if result.returncode == 0 else None
