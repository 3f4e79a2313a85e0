"""``meshproxy pod-init`` in real pods (network namespaces), with real nftables and real sockets.

Pod ``app`` runs stand-ins for its sidecar (servers on the capture ports, as the proxy uid 1337)
and for its application (9080, and the health port 15021); pod ``peer`` and pod ``other`` run
servers outside.  Every server answers a connection with ``TAG PORT ORIGINAL_DST``, so each test
sees exactly where a connection ended up and where it was going.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from netns import PodNetwork, existing_namespaces, wait_until
from pod_probe import Agent

PROBE = str(Path(__file__).resolve().parent.parent / "pod_probe.py")
PROXY_UID = 1337


def _serve(pod, tag, *ports, user=None):
    proc = pod.popen([sys.executable, PROBE, "serve", tag, *map(str, ports)], user=user,
                     stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", f"{tag} servers did not start in {pod}"
    return proc


@pytest.fixture(scope="module")
def net():
    with PodNetwork("podinit") as net:
        app, peer, other = net.add_pod("app"), net.add_pod("peer"), net.add_pod("other")
        _serve(app, "sidecar", 15001, 15006, "15053/udp", user=PROXY_UID)
        _serve(app, "app", 9080, 15021, 15090)
        _serve(peer, "peer", 8080, 5432, "53/udp")
        _serve(other, "other", 8080)
        net.agents = {"app": Agent(app), "peer": Agent(peer)}
        yield net


def pod_init(pod, *args, user=None):
    return pod.run([sys.executable, "-m", "meshproxy", "pod-init", *args], user=user, env=pod.network.env())


def install(pod, *args):
    result = pod_init(pod, *args)
    assert result.returncode == 0, result.stderr
    return result


def connect(pod, host, port, user=None):
    return pod.network.agents[pod.name].connect(host, port, user)


def udp(pod, host, port):
    return pod.network.agents[pod.name].udp(host, port)


def test_dry_run_prints_the_rules_and_installs_nothing(net):
    app = net.pods["app"]
    pod_init(app, "--cleanup")
    result = pod_init(app, "--dry-run", "--exclude-outbound-ports", "5432")
    assert result.returncode == 0, result.stderr
    assert "redirect to :15001" in result.stdout and "tcp dport 5432 return" in result.stdout
    assert "meshproxy" not in app.nft("list", "tables").stdout
    assert connect(app, net.pods["peer"].address, 8080) == "peer 8080 -"


def test_outbound_connections_reach_the_capture_port_with_their_original_destination(net):
    app, peer = net.pods["app"], net.pods["peer"]
    install(app)
    assert connect(app, peer.address, 8080) == f"sidecar 15001 {peer.address}:8080"
    # an address nobody has (a service VIP) is captured all the same: the sidecar decides
    assert connect(app, "240.240.0.7", 9080) == "sidecar 15001 240.240.0.7:9080"


def test_proxy_uid_loopback_and_excluded_ports_and_cidrs_are_not_captured(net):
    app, peer, other = net.pods["app"], net.pods["peer"], net.pods["other"]
    install(app, "--exclude-outbound-ports", "5432", "--exclude-outbound-cidrs", f"{other.address}/32")
    assert connect(app, peer.address, 8080, user=PROXY_UID) == "peer 8080 -"      # no loop
    assert connect(app, "127.0.0.1", 9080) == "app 9080 -"
    assert connect(app, app.address, 9080) == "app 9080 -"                      # app to itself
    assert connect(app, peer.address, 5432) == "peer 5432 -"
    assert connect(app, other.address, 8080) == "other 8080 -"
    assert connect(app, peer.address, 8080) == f"sidecar 15001 {peer.address}:8080"


def test_inbound_connections_reach_the_inbound_port_except_health_metrics_and_excluded(net):
    app, peer = net.pods["app"], net.pods["peer"]
    install(app)
    assert connect(peer, app.address, 9080) == f"sidecar 15006 {app.address}:9080"
    assert connect(peer, app.address, 15021) == "app 15021 -"
    assert connect(peer, app.address, 15090) == "app 15090 -"
    install(app, "--exclude-inbound-ports", "9080")
    assert connect(peer, app.address, 9080) == "app 9080 -"


def test_proxy_calling_its_own_pod_address_enters_through_inbound(net):
    app = net.pods["app"]
    install(app)
    assert connect(app, app.address, 9080, user=PROXY_UID) == f"sidecar 15006 {app.address}:9080"
    assert connect(app, "127.0.0.1", 9080, user=PROXY_UID) == "app 9080 -"


def test_capture_dns_sends_port_53_to_the_sidecar_dns_port(net):
    app, peer = net.pods["app"], net.pods["peer"]
    install(app)
    assert udp(app, peer.address, 53) == "peer 53 udp"
    install(app, "--capture-dns")
    assert udp(app, peer.address, 53) == "sidecar 15053 udp"


def test_running_twice_or_beside_foreign_rules_leaves_one_correct_rule_set(net):
    app, peer = net.pods["app"], net.pods["peer"]
    app.run(["nft", "-f", "-"], check=True, input="table inet foreign {\n chain out {\n  type filter hook output priority 0;"
            " policy accept;\n  counter\n }\n}\n")
    install(app, "--exclude-outbound-ports", "5432")
    install(app, "--exclude-outbound-ports", "8080")
    listing = app.nft("list", "table", "inet", "meshproxy").stdout
    assert listing.count("redirect to :15001") == 1
    assert "dport 8080 return" in listing and "5432" not in listing
    assert "table inet foreign" in app.nft("list", "tables").stdout
    assert connect(app, peer.address, 8080) == "peer 8080 -"
    assert connect(app, peer.address, 5432) == f"sidecar 15001 {peer.address}:5432"


def test_cleanup_removes_its_rules_and_only_its_rules(net):
    app, peer = net.pods["app"], net.pods["peer"]
    install(app)
    app.run(["nft", "-f", "-"], check=True, input="table ip foreign2 {\n chain c {\n  type filter hook output priority 0;\n }\n}\n")
    assert pod_init(app, "--cleanup").returncode == 0
    tables = app.nft("list", "tables").stdout
    assert "meshproxy" not in tables and "foreign2" in tables
    assert connect(app, peer.address, 8080) == "peer 8080 -"
    assert pod_init(app, "--cleanup").returncode == 0             # nothing to remove is fine


def test_without_net_admin_pod_init_refuses_and_says_what_to_grant(net):
    app = net.pods["app"]
    result = pod_init(app, user=PROXY_UID)
    assert result.returncode == 1
    assert "CAP_NET_ADMIN" in result.stderr and "NET_ADMIN" in result.stderr


def test_bad_flags_are_refused_with_the_flag_named(net):
    result = pod_init(net.pods["app"], "--exclude-outbound-cidrs", "10.0.0.0/33")
    assert result.returncode == 1 and "--exclude-outbound-cidrs" in result.stderr
    result = pod_init(net.pods["app"], "--exclude-inbound-ports", "http")
    assert result.returncode == 1 and "--exclude-inbound-ports" in result.stderr


def test_pod_network_removes_its_namespaces_and_processes_when_closed():
    with PodNetwork("gone") as net:
        pod = net.add_pod("a")
        proc = pod.popen(["sleep", "60"])
        names = set(net.namespaces())
        assert names <= existing_namespaces()
        assert all(str(__import__("os").getpid()) in n for n in names)
        assert pod.run(["ip", "-4", "-o", "addr", "show", "eth0"]).stdout.split()[3] == f"{pod.address}/24"
    assert not names & existing_namespaces()
    wait_until(lambda: proc.poll() is not None, 5, what="pod process killed")
