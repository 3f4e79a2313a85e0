"""Canary delivery: the Canary decoder, the statistics, the metric checks, the step plan, the
phase table and the route rewrites, all pure (no sockets, no clock)."""
from __future__ import annotations

import math

import pytest

from controlplane.delivery import stats
from controlplane.delivery.policy import (FAIL, NO_DATA, PASS, CustomCheck, DurationCheck, IllegalPhase,
                                          QueryResult, StepPlan, SuccessRateCheck, VersionSample, Window, judge,
                                          next_phase)
from controlplane.delivery.routing import (AB_ROUTE, find_route, observed_weights, restore_load_balancer,
                                           rewrite_virtual_service, route_state, sticky_destination_rule)
from controlplane.delivery.samples import Baseline, Selector, parse_versions
from controlplane.delivery.spec import check_references, decode_canary

# ---------------------------------------------------------------- statistics against scipy


@pytest.mark.parametrize("counts, expected", [
    # scipy.stats.fisher_exact([[e_c, n_c - e_c], [e_s, n_s - e_s]], alternative="greater").pvalue
    ((3, 20, 0, 200), 0.0006512276211911753),
    ((2, 100, 0, 900), 0.00990990990990991),
    ((1, 50, 0, 450), 0.1),
    ((5, 100, 3, 900), 0.0003986635044342289),
    ((10, 1000, 9, 9000), 3.802619648956187e-06),
    ((0, 10, 5, 100), 1.0),
    ((40, 400, 10, 3600), 6.557172821447825e-32),
])
def test_fisher_one_sided_matches_scipy(counts, expected):
    assert math.isclose(stats.fisher_greater(*counts), expected, rel_tol=1e-9, abs_tol=1e-300)


@pytest.mark.parametrize("args, expected", [
    # scipy.stats.binom.sf(k - 1, n, p)
    ((5, 100, 0.01), 0.0034323215877545207),
    ((1, 100, 0.01), 0.6339676587267705),
    ((20, 1000, 0.01), 0.003288359787727457),
    ((3, 3, 0.01), 1e-06),
    ((0, 10, 0.5), 1.0),
])
def test_binomial_tail_matches_scipy(args, expected):
    assert math.isclose(stats.binomial_greater(*args), expected, rel_tol=1e-9)


def test_histogram_quantile_interpolates_like_prometheus():
    bounds = (1.0, 5.0, 10.0)
    # 10 in [0,1], 80 in (1,5], 10 in (5,10]: rank 99 of 100 is 9/10 into the last bucket
    assert stats.histogram_quantile(0.99, bounds, (10, 90, 100, 100)) == pytest.approx(9.5)
    assert stats.histogram_quantile(0.5, bounds, (10, 90, 100, 100)) == pytest.approx(3.0)
    assert stats.histogram_quantile(0.99, bounds, (0, 0, 0, 5)) == 10.0          # +Inf: the top bound
    assert stats.histogram_quantile(0.99, bounds, (0, 0, 0, 0)) is None


def test_count_above_counts_only_requests_certainly_slower_than_the_limit():
    bounds = (100.0, 250.0, 500.0)
    cumulative = (50, 60, 70, 80)
    assert stats.count_above(250, bounds, cumulative) == 20       # above the 250 bound
    assert stats.count_above(200, bounds, cumulative) == 20       # first bound >= 200 is 250
    assert stats.count_above(600, bounds, cumulative) == 0        # beyond the last bound: unknown, not counted


# ---------------------------------------------------------------- the checks

BOUNDS = (5.0, 10.0, 100.0, 500.0, 1000.0)


def sample(requests, errors=0, slow=0):
    """requests with ``slow`` of them over 1000 ms, the rest under 5 ms."""
    fast = requests - slow
    return VersionSample(requests, errors, BOUNDS, (fast, fast, fast, fast, fast, requests))


def test_success_rate_a_clearly_worse_canary_fails_before_min_requests():
    check = SuccessRateCheck(99.0, 0.01, 100)
    result = check.judge(Window(sample(900), sample(30, errors=3)))
    assert result.verdict == FAIL and result.p_value < 0.01
    # a fixed "99% over minRequests" rule could not decide yet: only 30 of 100 requests
    assert result.value == pytest.approx(90.0)


def test_success_rate_one_error_in_a_small_sample_is_noise_not_a_failure():
    check = SuccessRateCheck(99.0, 0.01, 50)
    # 1 error in 50 = 98% (below 99%): a fixed threshold fails it; against stable's 0/450 p = 0.1
    result = check.judge(Window(sample(450), sample(50, errors=1)))
    assert result.verdict == PASS
    assert "not worse than stable" in result.detail


def test_success_rate_waits_for_min_requests_before_passing():
    check = SuccessRateCheck(99.0, 0.01, 100)
    result = check.judge(Window(sample(500), sample(40)))
    assert result.verdict == NO_DATA and "40/100" in result.detail
    assert check.judge(Window(sample(500), sample(0))).verdict == NO_DATA
    assert check.judge(Window(sample(500), sample(100))).verdict == PASS


def test_success_rate_shared_failure_is_not_blamed_on_the_canary():
    check = SuccessRateCheck(99.0, 0.01, 100)
    result = check.judge(Window(sample(900, errors=45), sample(100, errors=5)))   # both 95%
    assert result.verdict == PASS


def test_success_rate_without_stable_traffic_tests_against_the_error_budget():
    check = SuccessRateCheck(99.0, 0.01, 100)
    assert check.judge(Window(sample(0), sample(200, errors=10))).verdict == FAIL
    assert check.judge(Window(sample(0), sample(200, errors=2))).verdict == PASS


def test_duration_a_slow_canary_fails_and_a_fast_one_passes():
    check = DurationCheck(500.0, 0.01, 50)
    slow = check.judge(Window(sample(500), sample(20, slow=20)))
    assert slow.verdict == FAIL and slow.value == 1000.0
    assert check.judge(Window(sample(500), sample(60))).verdict == PASS
    # one slow request in 60 is over the p99 but not beyond noise of a 1% tail
    assert check.judge(Window(sample(500), sample(60, slow=1))).verdict == PASS


def test_custom_metric_error_fails_empty_waits_value_is_judged():
    from controlplane.delivery.spec import MetricSpec, ThresholdRange
    check = CustomCheck(MetricSpec("queue", ThresholdRange(max=10), query="q", provider_address="http://p"))
    assert check.judge_value(QueryResult(error="prometheus unreachable")).verdict == FAIL
    assert check.judge_value(QueryResult()).verdict == NO_DATA
    assert check.judge_value(QueryResult(value=3)).verdict == PASS
    assert check.judge_value(QueryResult(value=11)).verdict == FAIL


def test_judge_fail_wins_then_missing_proxies_then_no_data():
    window = Window(sample(10), sample(10))
    from controlplane.delivery.policy import MetricResult
    ok, wait, bad = MetricResult("a", PASS), MetricResult("b", NO_DATA, detail="x"), MetricResult("c", FAIL, detail="y")
    assert judge([ok, wait, bad], window, 1).verdict == FAIL
    assert judge([ok, wait], window, 1).verdict == NO_DATA
    assert judge([ok], Window(sample(1), sample(1), missing=("gw (timeout)",)), 1).verdict == NO_DATA
    assert judge([ok], window, 1).verdict == PASS
    assert judge([], window, 100).verdict == NO_DATA        # no metrics: still needs the sample


# ---------------------------------------------------------------- samples from proxy text

TEXT = """# TYPE istio_requests_total counter
istio_requests_total{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v1",response_code="200"} 90
istio_requests_total{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="200"} 8
istio_requests_total{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="503"} 2
istio_requests_total{reporter="destination",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="200"} 10
istio_requests_total{reporter="source",destination_service="other.default.svc.cluster.local",destination_version="v2",response_code="500"} 7
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="200",le="5.0"} 7
istio_request_duration_milliseconds_bucket{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="200",le="+Inf"} 8
istio_request_duration_milliseconds_bucket{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="503",le="5.0"} 2
istio_request_duration_milliseconds_bucket{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="503",le="+Inf"} 2
istio_request_duration_milliseconds_count{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="200"} 8
istio_request_duration_milliseconds_sum{reporter="source",destination_service="demo.default.svc.cluster.local",destination_version="v2",response_code="200"} 80
"""


def test_parse_versions_counts_one_reporter_one_service_and_sums_codes():
    got = parse_versions(TEXT, Selector("demo.default.svc.cluster.local", "v1", "v2"))
    assert (got["stable"].requests, got["stable"].errors) == (90, 0)
    assert (got["canary"].requests, got["canary"].errors) == (10, 2)
    assert got["canary"].bounds == (5.0,) and got["canary"].cumulative == (9, 10)
    dest = parse_versions(TEXT, Selector("demo.default.svc.cluster.local", "v1", "v2", "destination"))
    assert dest["canary"].requests == 10 and dest["canary"].errors == 0


def test_baseline_window_subtracts_per_proxy_and_survives_a_restart_and_a_new_proxy():
    a0 = {"stable": VersionSample(100, 1), "canary": VersionSample(10, 0)}
    base = Baseline({"a": a0}, at=0.0)
    later = {"a": {"stable": VersionSample(150, 1), "canary": VersionSample(30, 2)},
             "b": {"stable": VersionSample(1000, 0), "canary": VersionSample(500, 0)}}      # new: adopted, not counted
    w = base.window(later, now=5.0)
    assert (w.stable.requests, w.canary.requests, w.canary.errors) == (50, 20, 2)
    restarted = {"a": {"stable": VersionSample(5, 0), "canary": VersionSample(3, 1)},
                 "b": {"stable": VersionSample(1010, 0), "canary": VersionSample(504, 0)}}
    w = base.window(restarted, now=6.0)
    assert (w.stable.requests, w.canary.requests, w.canary.errors) == (5 + 10, 3 + 4, 1)


# ---------------------------------------------------------------- the Canary decoder

def canary(spec, name="reviews"):
    return {"apiVersion": "delivery.meshproxy.io/v1", "kind": "Canary",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


MINIMAL = {"host": "reviews", "stable": "v1", "canary": "v2",
           "analysis": {"interval": "10s", "threshold": 3, "maxWeight": 50, "stepWeight": 10, "minRequests": 100,
                        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}},
                                    {"name": "request-duration", "thresholdRange": {"max": 500}}]}}


def test_the_issue_canary_decodes_with_flagger_defaults():
    d = decode_canary(canary(MINIMAL))
    assert d.errors == [] and d.warnings == []
    spec = d.spec
    assert spec.virtual_service == "reviews" and spec.fqdn == "reviews.default.svc.cluster.local"
    assert spec.weights() == (10, 20, 30, 40, 50)
    assert spec.analysis.interval == 10.0 and spec.analysis.threshold == 3 and spec.progress_deadline == 600
    assert spec.analysis.strategy == "canary"


def test_invalid_canary_reports_every_error_with_its_path():
    bad = {"host": "reviews", "stable": "v1", "canary": "v1", "colour": "blue",
           "analysis": {"maxWeight": 150, "stepWeight": 60, "interval": "soon",
                        "metrics": [{"name": "request-success-rate"},
                                    {"name": "request-duration", "thresholdRange": {"min": 3}},
                                    {"name": "custom-thing", "thresholdRange": {"max": 1}}],
                        "webhooks": [{"name": "w", "type": "sometimes", "url": "ftp://x"}]}}
    errors = decode_canary(canary(bad)).errors
    text = "\n".join(errors)
    for path in ("spec.canary: must differ", "spec.colour: unknown field", "spec.analysis.maxWeight: must be 1..100",
                 "spec.analysis.interval: must be a duration", "spec.analysis.metrics[0].thresholdRange: required",
                 "spec.analysis.metrics[1].thresholdRange: request-duration needs max",
                 "spec.analysis.metrics[2].query: required", "spec.analysis.metrics[2].provider: required",
                 "spec.analysis.webhooks[0].type: must be one of", "spec.analysis.webhooks[0].url: must be an http"):
        assert path in text, path
    assert all(e.startswith("Canary default/reviews: ") for e in errors)


def test_step_larger_than_max_and_step_weights_must_climb():
    errors = decode_canary(canary({**MINIMAL, "analysis": {"maxWeight": 20, "stepWeight": 30}})).errors
    assert any("spec.analysis.stepWeight: must be <= maxWeight (20)" in e for e in errors)
    errors = decode_canary(canary({**MINIMAL, "analysis": {"stepWeights": [5, 50, 20]}})).errors
    assert any("spec.analysis.stepWeights[2]: must be larger" in e for e in errors)
    spec = decode_canary(canary({**MINIMAL, "analysis": {"stepWeights": [1, 5, 25, 80]}})).spec
    assert spec.weights() == (1, 5, 25, 80) and spec.analysis.max_weight == 80


def test_builtin_metric_interval_is_a_warning_not_silently_ignored():
    spec = {**MINIMAL, "analysis": {**MINIMAL["analysis"], "metrics": [
        {"name": "request-success-rate", "interval": "1m", "thresholdRange": {"min": 99}}]}}
    d = decode_canary(canary(spec))
    assert d.errors == [] and d.warnings == [
        "Canary default/reviews: spec.analysis.metrics[0].interval: not used: request-success-rate is judged over "
        "each check's window of proxy counters"]


def test_ab_and_blue_green_shapes():
    ab = decode_canary(canary({**MINIMAL, "analysis": {"iterations": 3, "match": [
        {"headers": {"x-canary": {"exact": "yes"}}}]}})).spec
    assert ab.analysis.strategy == "ab" and ab.weights() == ()
    bg = decode_canary(canary({**MINIMAL, "analysis": {"iterations": 2, "mirror": True, "mirrorWeight": 50}})).spec
    assert bg.analysis.strategy == "bluegreen"
    errors = decode_canary(canary({**MINIMAL, "analysis": {"stepWeight": 10, "match": [{"uri": {"prefix": "/"}}]}})).errors
    assert any("spec.analysis.match: needs iterations" in e for e in errors)


def resources(subsets=(("v1", "v1"), ("v2", "v2"))):
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "reviews", "namespace": "default", "resourceVersion": "3"},
          "spec": {"hosts": ["reviews"], "http": [
              {"name": "main", "route": [{"destination": {"host": "reviews", "subset": "v1", "port": {"number": 80}}}]}]}}
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
          "metadata": {"name": "reviews", "namespace": "default", "resourceVersion": "2"},
          "spec": {"host": "reviews", "subsets": [{"name": n, "labels": {"version": v}} for n, v in subsets]}}
    return {("VirtualService", "default", "reviews"): vs, ("DestinationRule", "default", "reviews"): dr}


def test_references_unknown_subset_and_missing_route_are_refused():
    spec = decode_canary(canary({**MINIMAL, "canary": "v3"})).spec
    errors = check_references(spec, resources())
    assert errors == ["Canary default/reviews: spec.canary: unknown subset 'v3' (DestinationRule default/reviews has "
                      "v1, v2)"]
    spec = decode_canary(canary({**MINIMAL, "route": "nope"})).spec
    assert check_references(spec, resources()) == [
        "Canary default/reviews: spec.route: VirtualService default/reviews has no http route named 'nope'"]
    assert check_references(decode_canary(canary(MINIMAL)).spec, resources()) == []
    same = check_references(decode_canary(canary(MINIMAL)).spec, resources((("v1", "a"), ("v2", "a"))))
    assert any("select the same version label" in e for e in same)


# ---------------------------------------------------------------- routes


def test_rewrite_sets_weights_keeps_the_destination_shape_and_finishes_on_one_subset():
    spec = decode_canary(canary(MINIMAL)).spec
    vs = resources()[("VirtualService", "default", "reviews")]
    step = rewrite_virtual_service(vs, spec, 20)
    assert observed_weights(step["spec"], spec) == {"v1": 80, "v2": 20}
    assert step["spec"]["http"][0]["route"][1]["destination"] == {"host": "reviews", "subset": "v2", "port": {"number": 80}}
    assert vs["spec"]["http"][0]["route"][0].get("weight") is None          # the input is untouched
    assert observed_weights(rewrite_virtual_service(step, spec, 0, final="promoted")["spec"], spec) == {"v2": 100}
    assert observed_weights(rewrite_virtual_service(step, spec, 0, final="rolledback")["spec"], spec) == {"v1": 100}


def test_ab_route_goes_first_and_is_removed_at_the_end():
    spec = decode_canary(canary({**MINIMAL, "analysis": {"iterations": 2, "match": [
        {"headers": {"x-canary": {"exact": "yes"}}}]}})).spec
    vs = resources()[("VirtualService", "default", "reviews")]
    ab = rewrite_virtual_service(vs, spec, 0, ab_match=spec.analysis.match)
    assert [r["name"] for r in ab["spec"]["http"]] == [AB_ROUTE, "main"]
    assert find_route(ab["spec"], spec) == 1
    done = rewrite_virtual_service(ab, spec, 0, final="promoted")
    assert [r["name"] for r in done["spec"]["http"]] == ["main"]


def test_route_state_notices_a_human_edit():
    spec = decode_canary(canary(MINIMAL)).spec
    vs = rewrite_virtual_service(resources()[("VirtualService", "default", "reviews")], spec, 20)
    edited = rewrite_virtual_service(vs, spec, 35)
    assert route_state(vs["spec"], spec) != route_state(edited["spec"], spec)
    assert route_state(vs["spec"], spec) == route_state(rewrite_virtual_service(vs, spec, 20)["spec"], spec)


def test_sticky_destination_rule_round_trip():
    dr = resources()[("DestinationRule", "default", "reviews")]
    dr["spec"]["trafficPolicy"] = {"loadBalancer": {"simple": "ROUND_ROBIN"}, "connectionPool": {"tcp": {"maxConnections": 5}}}
    sticky = sticky_destination_rule(dr, "canary", 600)
    assert sticky["spec"]["trafficPolicy"]["loadBalancer"] == {"consistentHash": {"httpCookie": {"name": "canary", "ttl": "600s"}}}
    back = restore_load_balancer(sticky, {"simple": "ROUND_ROBIN"})
    assert back["spec"] == dr["spec"]


# ---------------------------------------------------------------- plan and phases


def test_step_plan_advances_through_the_ladder_then_promotes():
    plan = StepPlan("canary", (10, 20, 50))
    assert plan.first_weight() == 10
    assert plan.after_pass(10, 0) == ("advance", 20, 0)
    assert plan.after_pass(50, 0) == ("promote", 50, 0)
    iterations = StepPlan("ab", (), 2)
    assert iterations.after_pass(0, 0) == ("advance", 0, 1)
    assert iterations.after_pass(0, 1) == ("promote", 0, 2)


def test_phase_table_names_illegal_transitions():
    assert next_phase("Progressing", "promote") == "Promoting"
    assert next_phase("Promoting", "done") == "Succeeded"
    assert next_phase("Succeeded", "restart") == "Initializing"
    with pytest.raises(IllegalPhase, match="'done' is illegal in phase 'Progressing'"):
        next_phase("Progressing", "done")


def test_blue_green_mirrors_the_canary_while_stable_serves_then_switches_whole():
    spec = decode_canary(canary({**MINIMAL, "analysis": {"iterations": 2, "mirror": True, "mirrorWeight": 30}})).spec
    vs = resources()[("VirtualService", "default", "reviews")]
    mirrored = rewrite_virtual_service(vs, spec, 0, mirror_weight=30)
    route = mirrored["spec"]["http"][0]
    assert observed_weights(mirrored["spec"], spec) == {"v1": 100, "v2": 0}
    assert route["mirror"] == {"host": "reviews", "subset": "v2", "port": {"number": 80}}
    assert route["mirrorPercentage"] == {"value": 30.0}
    from controlplane.validation import validate_object
    body = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default"}, "spec": mirrored["spec"]}
    assert validate_object(body, "VirtualService", "default", "reviews") == []     # proxies accept it
    done = rewrite_virtual_service(mirrored, spec, 0, final="promoted")["spec"]["http"][0]
    assert "mirror" not in done and "mirrorPercentage" not in done
    assert observed_weights({"http": [done]}, spec) == {"v2": 100}


def test_a_users_own_mirror_to_another_service_is_kept():
    spec = decode_canary(canary(MINIMAL)).spec
    vs = resources()[("VirtualService", "default", "reviews")]
    vs["spec"]["http"][0]["mirror"] = {"host": "audit", "subset": "v1"}
    step = rewrite_virtual_service(vs, spec, 20)
    assert step["spec"]["http"][0]["mirror"] == {"host": "audit", "subset": "v1"}
