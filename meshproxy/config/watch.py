"""Polls config files and reports a change once it has settled.

:class:`ConfigWatcher` has no task of its own: the caller runs :meth:`run` in a task it
owns and cancels.  Every ``interval`` it takes a signature of every config file under the
paths (path, mtime, size, content hash); when the signature differs from the last one it
reported, it waits until two consecutive polls agree (an editor writing a file in several
steps, ``kubectl``-style directory swaps) and then calls ``on_change()`` once.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import Callable, Iterable

from .load import config_files

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int, str], ...]


def signature(paths: Iterable[str]) -> Signature:
    files, _ = config_files(paths)
    out = []
    for path in files:
        try:
            st = os.stat(path)
            with open(path, "rb") as fh:
                digest = hashlib.blake2b(fh.read(), digest_size=16).hexdigest()
        except OSError:
            continue                      # vanished between listing and reading: next poll sees it
        out.append((path, st.st_mtime_ns, st.st_size, digest))
    return tuple(out)


class ConfigWatcher:
    def __init__(self, paths: list[str], on_change: Callable[[], None], interval: float = 1.0):
        self.paths = list(paths)
        self.on_change = on_change
        self.interval = interval
        self.last: Signature = signature(self.paths)

    def poll(self) -> bool:
        """One poll without waiting: True (after calling on_change) when a settled change was seen.
        A change is settled when the signature read twice in a row is the same."""
        current = signature(self.paths)
        if current == self.last:
            return False
        again = signature(self.paths)
        if again != current:
            return False
        self.last = current
        self.on_change()
        return True

    async def run(self) -> None:
        pending: Signature | None = None
        while True:
            await asyncio.sleep(self.interval)
            current = await asyncio.to_thread(signature, self.paths)
            if current == self.last:
                pending = None
                continue
            if current != pending:         # changed since the last poll: wait for it to settle
                pending = current
                continue
            self.last, pending = current, None
            try:
                self.on_change()
            except Exception:              # the watcher must outlive a failing callback
                log.exception("config on_change callback failed")
