"""Retry decisions (meshproxy.router.retry): Envoy conditions, idempotency, back-off."""
import random
from dataclasses import replace

import pytest

from inproc import cluster, dest, snapshot
from meshproxy.config.decode import DEFAULT_RETRY_POLICY
from meshproxy.config.model import HttpRoute, RetryPolicy
from meshproxy.router.retry import RetryState
from meshproxy.router.split import Splitter


def policy(*conditions, attempts=2, codes=(), non_idempotent=False):
    return RetryPolicy(attempts=attempts, per_try_timeout=None, retry_on=frozenset(conditions),
                       retriable_status_codes=frozenset(codes), allow_non_idempotent=non_idempotent)


@pytest.mark.parametrize("conditions,outcome,expected", [
    (("5xx",), 500, True), (("5xx",), 503, True), (("5xx",), 404, False),
    (("5xx",), "reset", True), (("5xx",), "connect-failure", True), (("5xx",), "timeout", True),
    (("gateway-error",), 502, True), (("gateway-error",), 504, True), (("gateway-error",), 500, False),
    (("gateway-error",), "reset", True),
    (("reset",), "reset", True), (("reset",), 503, False),
    (("connect-failure",), "connect-failure", True), (("connect-failure",), "reset", False),
    (("connect-failure",), 503, False),
    (("refused-stream",), "refused-stream", True), (("refused-stream",), "reset", False),
    (("retriable-4xx",), 409, True), (("retriable-4xx",), 404, False),
])
def test_each_condition_retries_exactly_its_outcomes(conditions, outcome, expected):
    assert RetryState(policy(*conditions), "GET").should_retry(1, outcome) is expected


def test_retriable_status_codes_are_retried():
    state = RetryState(policy("retriable-status-codes", codes=(429,)), "GET")
    assert state.should_retry(1, 429) and not state.should_retry(1, 503)


def test_retries_stop_after_the_configured_number():
    state = RetryState(policy("5xx", attempts=2), "GET")
    assert state.should_retry(1, 503) and state.should_retry(2, 503)
    assert not state.should_retry(3, 503)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
def test_idempotent_methods_are_retried_after_a_response(method):
    assert RetryState(policy("5xx"), method).should_retry(1, 503)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "PROPFIND"])
def test_non_idempotent_requests_are_retried_only_when_nothing_was_sent(method):
    state = RetryState(policy("5xx", "connect-failure", "refused-stream", "reset"), method)
    assert not state.should_retry(1, 503)
    assert not state.should_retry(1, "reset")
    assert not state.should_retry(1, "timeout")
    assert state.should_retry(1, "connect-failure")
    assert state.should_retry(1, "refused-stream")


def test_non_idempotent_requests_are_retried_when_the_policy_allows_it():
    state = RetryState(policy("5xx", non_idempotent=True), "POST")
    assert state.should_retry(1, 503) and state.should_retry(1, "reset")


def test_unknown_outcome_string_is_a_programming_error():
    with pytest.raises(ValueError, match="bogus"):
        RetryState(policy("5xx"), "GET").should_retry(1, "bogus")


def test_backoff_is_jittered_exponential_from_25ms_capped_at_10x():
    state = RetryState(policy("5xx"), "GET", rng=random.Random(1))
    for attempt, ceiling in [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (10, 0.25)]:
        samples = [state.backoff(attempt) for _ in range(2000)]
        assert 0 <= min(samples) and max(samples) <= ceiling + 1e-12
        assert max(samples) > ceiling * 0.9


def test_a_route_shares_one_retry_state_per_method_and_a_new_policy_gets_a_new_one():
    # a RetryState depends only on (policy, method): the route's split state keeps one per method
    fives = policy("5xx")
    route = HttpRoute(name="r", source="t", destinations=(dest("c"),), retries=fives)
    split = Splitter(snapshot([route], [cluster("c", 9)], domains=("a",), port=0)).route_split(route)
    rng = random.Random(1)
    get = split.retry_state(fives, b"GET", rng)
    assert split.retry_state(fives, b"GET", rng) is get
    post = split.retry_state(fives, b"POST", rng)
    assert get.idempotent and not post.idempotent
    assert get.should_retry(1, 503) and not post.should_retry(1, 503)
    none_left = replace(fives, attempts=0)
    assert split.retry_state(none_left, b"GET", rng).policy is none_left
    assert not split.retry_state(none_left, b"GET", rng).should_retry(1, 503)
    assert split.retry_state(DEFAULT_RETRY_POLICY, b"GET", rng).should_retry(1, "connect-failure")
