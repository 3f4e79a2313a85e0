"""The trimmer gives memory back once a burst of connections is over, and only then."""
from __future__ import annotations

from meshproxy.memory import Trimmer, _malloc_trim


def test_trims_once_the_connections_of_a_burst_have_halved_and_not_before():
    calls = []
    t = Trimmer(min_peak=32, trim=calls.append)
    for n in (10, 200, 400, 380, 250, 201):
        assert t.observe(n) is False
    assert t.observe(200) is True and calls == [0]
    assert t.observe(150) is False            # the new peak is 200: half of it is 100
    assert t.observe(100) is True and calls == [0, 0]


def test_small_peaks_never_trim():
    calls = []
    t = Trimmer(min_peak=32, trim=calls.append)
    for n in (20, 0, 31, 0, 5):
        t.observe(n)
    assert calls == []


def test_glibc_malloc_trim_is_found_and_callable():
    trim = _malloc_trim()
    assert trim is not None, "glibc's malloc_trim (Debian's libc6)"
    assert trim(0) in (0, 1)


def test_a_burst_that_came_and_went_between_two_looks_still_trims():
    calls = []
    t = Trimmer(min_peak=32, trim=calls.append)
    assert t.observe(3, 3) is False
    # 250 connections opened and closed within one second: never seen open, counted as the most
    assert t.observe(2, 250) is True and calls == [0]
    assert t.observe(2, 2) is False and calls == [0]
