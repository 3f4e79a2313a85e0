"""The proxy's DNS cache for ServiceEntry resolution: DNS endpoints."""
from __future__ import annotations

import pytest

from meshproxy.upstream.pool import DnsCache

pytestmark = pytest.mark.asyncio


class FakeResolver:
    def __init__(self):
        self.answers: list[list[str] | Exception] = []
        self.calls = 0

    async def __call__(self, host, port):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_answer_is_reused_until_the_refresh_interval_then_looked_up_again():
    now = [0.0]
    resolver = FakeResolver()
    resolver.answers = [["10.0.0.1"], ["10.0.0.2"]]
    cache = DnsCache(resolver, lambda: now[0], refresh=30)
    assert await cache.address("db.example", 5432) == "10.0.0.1"
    now[0] = 29
    assert await cache.address("db.example", 5432) == "10.0.0.1"
    assert resolver.calls == 1
    now[0] = 31
    assert await cache.address("db.example", 5432) == "10.0.0.2"


async def test_a_failed_lookup_keeps_the_last_answer():
    now = [0.0]
    resolver = FakeResolver()
    resolver.answers = [["10.0.0.1"], OSError("SERVFAIL")]
    cache = DnsCache(resolver, lambda: now[0], refresh=1)
    assert await cache.address("db.example", 5432) == "10.0.0.1"
    now[0] = 5
    assert await cache.address("db.example", 5432) == "10.0.0.1"
    assert cache.failures == 1


async def test_no_answer_ever_is_an_error_and_ip_literals_skip_the_resolver():
    resolver = FakeResolver()
    resolver.answers = [OSError("NXDOMAIN")]
    cache = DnsCache(resolver, lambda: 0.0)
    with pytest.raises(OSError):
        await cache.address("missing.example", 80)
    assert await cache.address("127.0.0.1", 80) == "127.0.0.1"
    assert resolver.calls == 1


async def test_several_addresses_are_used_in_turn():
    resolver = FakeResolver()
    resolver.answers = [["10.0.0.1", "10.0.0.2"]]
    cache = DnsCache(resolver, lambda: 0.0)
    got = {await cache.address("db.example", 1) for _ in range(4)}
    assert got == {"10.0.0.1", "10.0.0.2"}
