"""Canaries over real processes: the control plane (with its delivery controller), a real
ingress gateway proxy splitting traffic, versions of a service the test controls (good,
failing, slow), and users sending requests.  Intervals are half a second."""
from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from delivery_mesh import Users, VersionApp, delivery_mesh_fixture, wait_for  # noqa: F401  (the "mesh" fixture)
from prometheus_server import PrometheusServer

from controlplane import cli

SUCCESS = {"name": "request-success-rate", "thresholdRange": {"min": 99}}
LATENCY = {"name": "request-duration", "thresholdRange": {"max": 100}}


def canary_revisions(mesh, name):
    items = mesh.api.call("GET", "/history?limit=500")[1]["items"]
    return [e for e in reversed(items) if e["origin"].startswith(f"canary default/{name}:")]


def test_healthy_canary_is_promoted_after_one_passed_check_per_step(mesh):
    mesh.add_service("good", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
    users = Users(mesh.gw_port, "good.example.com", pause=0.002).start()
    try:
        started = time.monotonic()
        mesh.canary("good", "v1", "v2", {"interval": "500ms", "threshold": 2, "maxWeight": 50, "stepWeight": 25,
                                         "minRequests": 20, "metrics": [SUCCESS, LATENCY]})
        status = mesh.wait_phase("good", ("Succeeded", "Failed"), 30)
        took = time.monotonic() - started
    finally:
        users.stop()
    assert status["phase"] == "Succeeded", status["message"]
    assert mesh.weights("good") == {"v2": 100}
    # two steps (25, 50), each promoted by one passed check, no failed check
    assert (status["passedChecks"], status["failedChecks"]) == (2, 0)
    assert [w["weight"] for w in status["weights"]] == [25, 50, 100]
    assert took >= 3 * 0.5        # start, two checks, promotion: at least three intervals apart
    for check in status["checks"]:
        assert check["window"]["canary"]["requests"] >= 20 and check["verdict"] == "pass"
    # every weight change is a revision in the history, by the canary
    origins = [e["origin"].split(": ", 1)[1] for e in canary_revisions(mesh, "good")]
    assert origins == ["weight 25", "weight 50", "promoted (analysis passed)"]
    assert users.count(status=200) == len(users.outcomes) > 200


def test_canary_with_10_percent_errors_is_rolled_back_before_min_requests_and_errors_are_bounded(mesh):
    mesh.add_service("bad", {"v1": VersionApp("v1"), "v2": VersionApp("v2", error_every=10)}, "v1")
    users = Users(mesh.gw_port, "bad.example.com", pause=0.002).start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        mesh.canary("bad", "v1", "v2", {"interval": "500ms", "threshold": 1, "maxWeight": 60, "stepWeight": 20,
                                        "minRequests": 200, "metrics": [SUCCESS]})
        status = mesh.wait_phase("bad", ("Succeeded", "Failed"), 30)
        failed_at = time.monotonic()
        # the rollback reaches the gateway: from then on nobody sees v2
        wait_for(lambda: users.count(version="v2", since=time.monotonic() - 0.3) == 0 and
                 users.count(since=time.monotonic() - 0.3) > 10, 10, "no v2 answers after the rollback")
    finally:
        users.stop()
    assert status["phase"] == "Failed" and mesh.weights("bad") == {"v1": 100}
    decision = status["checks"][-1]
    assert "request-success-rate" in decision["reason"]
    # judged worse than stable with fewer canary requests than minRequests (a fixed threshold needs 200)
    assert decision["window"]["canary"]["requests"] < 200
    assert max(w["weight"] for w in status["weights"]) == 20          # never advanced past the first step
    # the bound: errors are 1 in 10 canary requests, canary requests are 20% of the traffic (exact split)
    # for as long as the canary had weight, plus what was in flight while the rollback was pushed
    during = users.count(since=started - 1.0) - users.count(since=failed_at + 1.0)
    errors = users.count(status=500)
    canary_requests = users.count(version="v2")
    assert errors == canary_requests // 10 or errors == canary_requests // 10 + 1
    assert canary_requests <= 0.2 * during + 2
    assert errors <= 0.1 * 0.2 * during + 1
    assert errors >= 2                                                  # it did see the bad version


def test_slower_canary_fails_the_latency_check(mesh):
    mesh.add_service("slow", {"v1": VersionApp("v1"), "v2": VersionApp("v2", delay=0.15)}, "v1")
    users = Users(mesh.gw_port, "slow.example.com", users=3, pause=0.002).start()
    try:
        mesh.canary("slow", "v1", "v2", {"interval": "500ms", "threshold": 1, "maxWeight": 50, "stepWeight": 25,
                                         "minRequests": 50, "metrics": [SUCCESS, LATENCY]})
        status = mesh.wait_phase("slow", ("Succeeded", "Failed"), 30)
    finally:
        users.stop()
    assert status["phase"] == "Failed" and mesh.weights("slow") == {"v1": 100}
    failed = [m for m in status["checks"][-1]["metrics"] if m["verdict"] == "fail"]
    assert [m["name"] for m in failed] == ["request-duration"]
    assert failed[0]["value"] > 100 and failed[0]["value"] > failed[0]["stable"]


def test_low_traffic_waits_with_not_enough_data_then_progresses(mesh):
    mesh.add_service("quiet", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
    mesh.canary("quiet", "v1", "v2", {"interval": "300ms", "threshold": 1, "maxWeight": 50, "stepWeight": 50,
                                      "minRequests": 20, "metrics": [SUCCESS]})
    mesh.wait_phase("quiet", "Progressing", 10)
    time.sleep(1.5)                                             # five intervals without a request
    status = mesh.status("quiet")
    assert status["phase"] == "Progressing" and status["failedChecks"] == 0 and status["canaryWeight"] == 50
    assert "not enough data: 0/20 canary requests" in status["message"]
    assert "deadline in" in status["message"]
    users = Users(mesh.gw_port, "quiet.example.com", users=1, pause=0.01).start()
    try:
        status = mesh.wait_phase("quiet", ("Succeeded", "Failed"), 20)
    finally:
        users.stop()
    assert status["phase"] == "Succeeded"


def test_no_traffic_past_the_progress_deadline_rolls_back(mesh):
    mesh.add_service("idle", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
    mesh.canary("idle", "v1", "v2", {"interval": "300ms", "stepWeight": 50, "minRequests": 5, "metrics": [SUCCESS]},
                progressDeadlineSeconds=1)
    status = mesh.wait_phase("idle", ("Succeeded", "Failed"), 10)
    assert status["phase"] == "Failed" and "progress deadline exceeded" in status["message"]
    assert mesh.weights("idle") == {"v1": 100}


def test_sticky_canary_keeps_each_user_on_the_canary_once_reached(mesh):
    mesh.add_service("sticky", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
    mesh.canary("sticky", "v1", "v2", {"interval": "300ms", "threshold": 1, "stepWeights": [20, 40, 70],
                                       "minRequests": 10, "metrics": [SUCCESS],
                                       "sessionAffinity": {"cookieName": "canary-user", "maxAge": 600}})
    mesh.wait_phase("sticky", "Progressing", 10)
    dr = mesh.get("destinationrules", "sticky")
    assert dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpCookie"]["name"] == "canary-user"

    def cookie_set():           # the gateway runs the sticky config (the store has it before the proxies)
        conn = http.client.HTTPConnection("127.0.0.1", mesh.gw_port, timeout=2)
        try:
            conn.request("GET", "/", headers={"host": "sticky.example.com"})
            resp = conn.getresponse()
            resp.read()
            return (resp.getheader("set-cookie") or "").startswith("canary-user=")
        finally:
            conn.close()

    wait_for(cookie_set, 10, "the gateway setting the affinity cookie")
    # each user keeps its session once on the canary; until then new sessions arrive (with 8 fixed
    # sessions, all of them hash to v1 at weight 20 one time in six and the step never gets data)
    users = Users(mesh.gw_port, "sticky.example.com", users=8, pause=0.005, cookies=True,
                  new_session_until="v2").start()
    try:
        status = mesh.wait_phase("sticky", ("Succeeded", "Failed"), 30)
        time.sleep(0.3)
    finally:
        users.stop()
    assert status["phase"] == "Succeeded"
    reached_canary = set()
    for user in range(8):
        seen = [v for _, u, s, v in users.outcomes if u == user and s == 200]
        first = seen.index("v2") if "v2" in seen else len(seen)
        assert set(seen[first:]) <= {"v2"}, f"user {user} went back to v1: {seen}"
        if first < len(seen) - 1 and status["weights"]:
            reached_canary.add(user)
    assert len(reached_canary) == 8
    # the session affinity is removed with the canary: the DestinationRule is as before
    assert "trafficPolicy" not in mesh.get("destinationrules", "sticky")["spec"]


def test_human_edit_pauses_resume_reapplies_abort_rolls_back_and_history_undoes(mesh, capsys, tmp_path):
    mesh.add_service("edited", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
    server = ["--server", mesh.cp.url]
    (tmp_path / "canary.yaml").write_text("""
apiVersion: delivery.meshproxy.io/v1
kind: Canary
metadata: {name: edited, namespace: default}
spec:
  host: edited
  stable: v1
  canary: v2
  analysis:
    interval: 300ms
    stepWeight: 10
    minRequests: 1000
    metrics:
    - {name: request-success-rate, thresholdRange: {min: 99}}
""")
    assert cli.main(server + ["apply", "-f", str(tmp_path / "canary.yaml")]) == 0
    assert "canary.delivery.meshproxy.io/edited created" in capsys.readouterr().out
    wait_for(lambda: mesh.weights("edited") == {"v1": 90, "v2": 10}, 10, "first step at 10%")
    vs = mesh.get("virtualservices", "edited")
    vs["spec"]["http"][0]["route"][0]["weight"], vs["spec"]["http"][0]["route"][1]["weight"] = 50, 50
    mesh.put("virtualservices", vs)
    status = wait_for(lambda: (lambda s: s if s["paused"] else None)(mesh.status("edited")), 5, "paused")
    assert "was changed outside the canary" in status["paused"]["reason"]
    time.sleep(0.7)
    assert mesh.weights("edited") == {"v1": 50, "v2": 50}                      # left as the human set it
    assert cli.main(server + ["canary", "status"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if " edited " in line]
    assert len(listed) == 1 and "Progressing (paused)" in listed[0]
    assert cli.main(server + ["canary", "resume", "edited"]) == 0
    wait_for(lambda: mesh.weights("edited") == {"v1": 90, "v2": 10}, 5, "weight re-applied")
    assert mesh.status("edited")["paused"] is None
    assert cli.main(server + ["canary", "abort", "edited"]) == 0
    status = mesh.wait_phase("edited", "Failed", 5)
    assert "aborted by" in status["message"] and mesh.weights("edited") == {"v1": 100}
    # the canary's revisions are ordinary history: meshctl rollback undoes the rollback
    revisions = canary_revisions(mesh, "edited")
    step = [e for e in revisions if e["origin"].endswith("weight 10")][0]["revision"]
    capsys.readouterr()
    assert cli.main(server + ["history", "--limit", "200"]) == 0
    assert "canary default/edited: weight 10" in capsys.readouterr().out
    assert cli.main(server + ["rollback", str(step)]) == 0
    assert mesh.weights("edited") == {"v1": 90, "v2": 10}
    assert cli.main(server + ["canary", "status", "edited"]) == 0
    out = capsys.readouterr().out
    assert "Failed" in out and "aborted by" in out
    assert cli.main(server + ["get", "canaries", "edited", "-o", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["status"]["phase"] == "Failed" and got["status"]["canaryWeight"] == 0


class Hooks:
    """A webhook receiver the test controls: per path, the status to answer (or a hang)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.answers: dict[str, int | str] = {}
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                hooks.calls.append((self.path, body))
                answer = hooks.answers.get(self.path, 200)
                if answer == "hang":
                    time.sleep(2)
                    return
                self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def paths(self):
        return [p for p, _ in self.calls]


def test_webhooks_gate_promotion_and_a_hanging_pre_rollout_hook_counts_as_failed_checks(mesh):
    hooks = Hooks()
    try:
        mesh.add_service("hooked", {"v1": VersionApp("v1"), "v2": VersionApp("v2"), "v3": VersionApp("v3")}, "v1")
        hooks.answers["/confirm"] = 403
        users = Users(mesh.gw_port, "hooked.example.com", users=1, pause=0.005).start()
        try:
            mesh.canary("hooked", "v1", "v2", {
                "interval": "300ms", "stepWeight": 50, "maxWeight": 50, "minRequests": 5, "metrics": [SUCCESS], "webhooks": [
                    {"name": "load", "type": "rollout", "url": hooks.url + "/rollout", "metadata": {"cmd": "hey"}},
                    {"name": "gate", "type": "confirm-promotion", "url": hooks.url + "/confirm"},
                    {"name": "done", "type": "post-rollout", "url": hooks.url + "/post"}]})
            status = mesh.wait_phase("hooked", "WaitingPromotion", 15)
            assert "confirm-promotion" in status["message"] and mesh.weights("hooked") == {"v1": 50, "v2": 50}
            hooks.answers["/confirm"] = 200
            status = mesh.wait_phase("hooked", ("Succeeded", "Failed"), 10)
        finally:
            users.stop()
        assert status["phase"] == "Succeeded"
        assert hooks.paths().count("/post") == 1 and "/rollout" in hooks.paths()
        payload = [b for p, b in hooks.calls if p == "/rollout"][0]
        assert payload["name"] == "hooked" and payload["namespace"] == "default" and payload["metadata"] == {"cmd": "hey"}
        # a new canary of the same service (v2 -> v3) whose pre-rollout hook hangs past its timeout
        hooks.answers["/pre"] = "hang"
        mesh.canary("hooked", "v2", "v3", {
            "interval": "300ms", "threshold": 2, "stepWeight": 50, "metrics": [SUCCESS], "webhooks": [
                {"name": "smoke", "type": "pre-rollout", "url": hooks.url + "/pre", "timeout": "200ms"}]})
        status = mesh.wait_phase("hooked", "Failed", 10)
        assert status["failedChecks"] == 2 and "pre-rollout webhook smoke" in status["message"]
        assert "no answer within 0.2s" in status["message"]
        assert mesh.weights("hooked") == {"v2": 100}
    finally:
        hooks.server.shutdown()


def test_invalid_canary_is_refused_with_every_error_and_its_path(mesh):
    mesh.add_service("checked", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
    code, body = mesh.api.call("PUT", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/checked", {
        "apiVersion": "delivery.meshproxy.io/v1", "kind": "Canary", "metadata": {"name": "checked"},
        "spec": {"host": "checked", "stable": "v1", "canary": "v9",
                 "analysis": {"maxWeight": 120, "stepWeight": 10, "metrics": [{"name": "request-success-rate"}]}}})
    assert code == 422
    fields = sorted(c["field"] for c in body["details"]["causes"])
    assert fields == ["spec.analysis.maxWeight", "spec.analysis.metrics[0].thresholdRange"]
    code, body = mesh.api.call("PUT", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/checked", {
        "apiVersion": "delivery.meshproxy.io/v1", "kind": "Canary", "metadata": {"name": "checked"},
        "spec": {"host": "checked", "stable": "v1", "canary": "v9", "analysis": {"stepWeight": 10}}})
    assert code == 422 and [c["field"] for c in body["details"]["causes"]] == ["spec.canary"]
    assert "unknown subset 'v9'" in body["message"]
    code, _ = mesh.api.call("GET", "/apis/delivery.meshproxy.io/v1/namespaces/default/canaries/checked")
    assert code == 404


def test_custom_promql_metric_waits_for_values_then_passes_and_a_dead_prometheus_fails_the_check(mesh, tmp_path):
    prometheus = PrometheusServer(tmp_path, {"gateway": (f"127.0.0.1:{mesh.gw_admin}", "/stats/prometheus")},
                                  scrape_interval="100ms")
    try:
        mesh.add_service("promql", {"v1": VersionApp("v1"), "v2": VersionApp("v2"), "v3": VersionApp("v3")}, "v1")
        users = Users(mesh.gw_port, "promql.example.com", users=1, pause=0.005).start()
        try:
            rate = {"name": "canary-rps", "interval": "1s", "thresholdRange": {"min": 1},
                    "provider": {"type": "prometheus", "address": prometheus.url},
                    "query": 'sum(rate(istio_requests_total{reporter="source",destination_service="{{ service }}",'
                             'destination_version="{{ target }}"}[{{ interval }}]))'}
            mesh.canary("promql", "v1", "v2", {"interval": "500ms", "threshold": 1, "stepWeight": 50, "maxWeight": 50,
                                               "metrics": [rate]})
            status = mesh.wait_phase("promql", ("Succeeded", "Failed"), 30)
        finally:
            users.stop()
        assert status["phase"] == "Succeeded", status["message"]
        passed = [m for c in status["checks"] for m in c["metrics"] if m["name"] == "canary-rps"]
        assert passed and all(m["verdict"] == "pass" and m["value"] >= 1 for m in passed)
        # Prometheus down: the check fails (it cannot vouch for the canary) and the canary rolls back
        dead = dict(rate, provider={"type": "prometheus", "address": "http://127.0.0.1:9"})
        mesh.canary("promql", "v2", "v3", {"interval": "300ms", "threshold": 1, "stepWeight": 50, "metrics": [dead]})
        status = mesh.wait_phase("promql", "Failed", 10)
        assert status["failedChecks"] == 1 and "prometheus unreachable" in status["message"]
        assert mesh.weights("promql") == {"v2": 100}
    finally:
        prometheus.close()


def test_ab_canary_sends_only_matching_requests_to_the_canary_then_promotes_after_its_iterations(mesh):
    mesh.add_service("abtest", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
    testers = Users(mesh.gw_port, "abtest.example.com", users=1, pause=0.005, headers={"x-canary": "yes"}).start()
    others = Users(mesh.gw_port, "abtest.example.com", users=1, pause=0.005).start()
    try:
        mesh.canary("abtest", "v1", "v2", {"interval": "300ms", "threshold": 1, "iterations": 2, "minRequests": 10,
                                           "match": [{"headers": {"x-canary": {"exact": "yes"}}}],
                                           "metrics": [SUCCESS]})
        wait_for(lambda: testers.count(version="v2") > 0, 10, "testers reaching v2")
        since = time.monotonic()
        time.sleep(0.3)
        assert mesh.status("abtest")["phase"] == "Progressing"
        until = time.monotonic()
        during = [(u, v) for t, u, s, v in testers.outcomes + others.outcomes if since <= t < until]
        status = mesh.wait_phase("abtest", ("Succeeded", "Failed"), 20)
    finally:
        testers.stop()
        others.stop()
    assert {v for t, _, s, v in testers.outcomes if since <= t < until} == {"v2"}
    assert {v for t, _, s, v in others.outcomes if since <= t < until} == {"v1"}
    assert len(during) > 10
    assert status["phase"] == "Succeeded" and status["passedChecks"] == 2 and status["iterations"] == 2
    assert mesh.weights("abtest") == {"v2": 100}
    assert [r.get("name") for r in mesh.get("virtualservices", "abtest")["spec"]["http"]] == ["main"]


def test_a_proxy_that_stops_answering_holds_the_step_with_the_reason_until_it_is_back(mesh, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from controlplane.testing import free_ports
    listen, admin = free_ports(2)
    node = f"frozen-{os.getpid()}"
    log = open(tmp_path / "frozen.log", "ab")
    proxy = subprocess.Popen([sys.executable, "-m", "meshproxy", "run", "--control-plane", mesh.cp.url, "--node-id", node,
                              "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"], stdout=log, stderr=log)
    try:
        wait_for(lambda: any(p["node_id"] == node and p["state"] == "acked"
                             for p in mesh.api.call("GET", "/push/v1/proxies")[1]["items"]), 20, "the proxy connected")
        mesh.add_service("frozen", {"v1": VersionApp("v1"), "v2": VersionApp("v2")}, "v1")
        users = Users(mesh.gw_port, "frozen.example.com", users=1, pause=0.005).start()
        try:
            mesh.canary("frozen", "v1", "v2", {"interval": "300ms", "threshold": 1, "stepWeights": [20, 40],
                                               "minRequests": 10, "metrics": [SUCCESS]})
            mesh.wait_phase("frozen", "Progressing", 10)
            proxy.send_signal(signal.SIGSTOP)
            status = wait_for(lambda: (lambda s: s if "did not report" in s["message"] else None)(mesh.status("frozen")),
                              10, "the check waiting for the frozen proxy")
            assert node in status["message"] and status["failedChecks"] == 0 and status["phase"] == "Progressing"
            weight = status["canaryWeight"]
            time.sleep(0.5)
            assert mesh.status("frozen")["canaryWeight"] == weight            # held, not advanced, not failed
            proxy.send_signal(signal.SIGCONT)
            status = mesh.wait_phase("frozen", ("Succeeded", "Failed"), 20)
        finally:
            users.stop()
        assert status["phase"] == "Succeeded" and status["failedChecks"] == 0
    finally:
        proxy.send_signal(signal.SIGCONT)
        proxy.terminate()
        try:
            proxy.wait(2)
        except subprocess.TimeoutExpired:
            proxy.kill()
