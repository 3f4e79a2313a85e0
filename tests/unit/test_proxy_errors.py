"""Failures by source: each is its own member (no aliases), with the retry condition,
response flag and status Envoy gives it."""
from __future__ import annotations

from meshproxy.proxy.errors import Failure


def test_every_failure_is_a_distinct_member():
    assert len(Failure.__members__) == len(list(Failure))      # an alias would be missing from iteration
    assert Failure.CONNECT_TIMEOUT is not Failure.CONNECT_FAILURE


def test_connect_timeout_and_failure_share_condition_flag_and_status_but_not_detail():
    timeout, failure = Failure.CONNECT_TIMEOUT, Failure.CONNECT_FAILURE
    assert (timeout.condition, timeout.flag, timeout.status) == ("connect-failure", "UF", 503)
    assert (failure.condition, failure.flag, failure.status) == ("connect-failure", "UF", 503)
    assert timeout.retryable_before_send and failure.retryable_before_send
    assert (timeout.detail, failure.detail) == ("connection_timeout", "connection_failure")
