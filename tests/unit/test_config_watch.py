"""The config-file watcher's debounce: a settled change is reported after the quiet time, a
file that never stops changing is reported at its latest content every ``max_wait``."""
from __future__ import annotations

import asyncio
import time

import pytest

from meshproxy.config.watch import ConfigWatcher, Debounce


def test_a_single_change_is_reported_once_after_the_quiet_time():
    d = Debounce("a", interval=1.0, quiet=0.1, max_wait=10.0)
    assert d.observe("a", 0.0) == (False, 1.0)
    report, delay = d.observe("b", 1.0)
    assert not report and delay == pytest.approx(0.1)
    assert d.observe("b", 1.05)[0] is False
    assert d.observe("b", 1.1) == (True, 1.0)
    assert d.reported == "b"
    assert d.observe("b", 2.1) == (False, 1.0)


def test_a_change_undone_before_it_settles_is_never_reported():
    d = Debounce("a", interval=1.0, quiet=0.1, max_wait=10.0)
    assert d.observe("b", 1.0)[0] is False
    assert d.observe("a", 1.1) == (False, 1.0)
    assert d.observe("a", 2.1) == (False, 1.0)
    assert d.reported == "a"


def test_changes_every_poll_are_reported_at_the_latest_state_every_max_wait():
    d = Debounce(0, interval=1.0, quiet=0.1, max_wait=2.0)
    reports = []
    for state in range(1, 70):             # a new state at every poll, 10 a second
        now = state / 10
        report, delay = d.observe(state, now)
        assert 0 < delay <= 1.0
        if report:
            reports.append((now, state))
    # the first change at 0.1 s, then one report per 2 s of churn, each of the state seen then
    assert reports == [(2.1, 21), (4.2, 42), (6.3, 63)]


def test_the_wait_before_the_next_poll_never_passes_the_max_wait():
    d = Debounce("a", interval=1.0, quiet=5.0, max_wait=2.0)
    d.observe("b", 0.0)
    report, delay = d.observe("c", 1.5)
    assert not report and delay == pytest.approx(0.5)
    assert d.observe("c", 2.0)[0] is True


async def test_a_file_rewritten_ten_times_a_second_is_applied_while_the_writes_go_on(tmp_path):
    f = tmp_path / "mesh.yaml"
    f.write_text("generation: 0\n")
    seen = []
    watcher = ConfigWatcher([str(tmp_path)], lambda: seen.append((time.monotonic(), f.read_text())),
                            interval=0.05, quiet=0.1, max_wait=0.5)
    task = asyncio.create_task(watcher.run())
    try:
        start = time.monotonic()
        for generation in range(1, 21):      # 2 s of writes, 10 a second
            f.write_text(f"generation: {generation}\n")
            await asyncio.sleep(0.1)
        writes_end = time.monotonic()
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
    during = [t for t, _ in seen if t < writes_end]
    # applied while the writes went on, every max_wait (0.5 s), not only after they stopped
    assert len(during) >= 3, [round(t - start, 2) for t, _ in seen]
    assert all(b - a <= 0.5 + 0.3 for a, b in zip([start] + during, during))
    # and the final content once they stop
    assert seen[-1][1] == "generation: 20\n"
