"""The worker as composition root: config swaps reconcile listeners in one owned task (which
a drain cancels), and the request path reads the runtime installed from the current snapshot."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from helpers import free_port
from inproc import snapshot, start_worker
from meshproxy.config.model import Listener

pytestmark = pytest.mark.asyncio


def with_listeners(snap, *ports):
    return replace(snap, listeners=tuple(Listener(f"http-{p}", "127.0.0.1", p, "HTTP", route_table="http")
                                         for p in ports), version=f"v{ports}")


async def test_swaps_in_a_burst_reconcile_in_one_owned_task_to_the_latest_listeners():
    loop = asyncio.get_running_loop()
    first, second, third = free_port(), free_port(), free_port()
    snap = with_listeners(snapshot([], []), first)
    worker, _ = await start_worker(loop, snap)
    try:
        worker.store.swap(with_listeners(snap, first, second))
        task = worker._reconcile
        assert task is not None and not task.done()
        worker.store.swap(with_listeners(snap, third))       # while the first reconcile runs
        assert worker._reconcile is task                     # no second, unowned task
        await asyncio.wait_for(asyncio.shield(task), 5)
        assert worker._reconcile is None
        assert sorted(port for _, port in worker.http_listeners) == [third]
    finally:
        await worker.drain(1)


async def test_drain_cancels_a_running_reconcile():
    loop = asyncio.get_running_loop()
    snap = with_listeners(snapshot([], []), free_port())
    worker, _ = await start_worker(loop, snap)
    worker.store.swap(with_listeners(snap, free_port(), free_port()))
    task = worker._reconcile
    assert task is not None
    assert await worker.drain(1)
    await asyncio.sleep(0)
    assert task.done() and worker._reconcile is None
    worker.store.swap(with_listeners(snap, free_port()))   # after drain: nothing starts
    assert worker._reconcile is None


async def test_the_request_path_reads_the_runtime_installed_from_the_current_snapshot():
    loop = asyncio.get_running_loop()
    snap = snapshot([], [])
    worker, _ = await start_worker(loop, snap)
    try:
        runtime = worker.runtime
        assert runtime.snapshot is snap and runtime.settings is snap.settings
        newer = replace(snap, version="v2")
        worker.store.swap(newer)
        assert runtime.snapshot is newer and runtime.splitter.snapshot is newer
        assert worker.clusters is runtime.clusters and worker.pools is runtime.pools
    finally:
        await worker.drain(1)
