"""A stack on the request path that keeps its capacity: the pool's idle connections.

CPython frees a list's item array when it empties (``pop`` of the last item), so a stack that
goes 0 -> 1 -> 0 items once per request (one upstream connection taken and given back)
allocates and frees on every request.  Compiled, these helpers take items off without
shrinking and put them back into the spare capacity; pure Python they are the list methods
they stand for.  The other lists of the request path use the list methods: keeping their
capacity earned too little (benchmarks/RESULTS.md has both measurements).

They rely on CPython's list layout (``PyListObject.allocated``, the size in the object
header).  At import, compiled, :func:`layout_matches` checks that layout against what
``sys.getsizeof`` reports for lists of several capacities; when it does not hold (another
CPython, another build), every helper is the plain list method (``_direct`` is off)."""
from __future__ import annotations

import sys

import cython

_direct = False      # compiled and the layout check passed: work on the list's struct


def layout_matches() -> bool:
    """Whether ``PyListObject.allocated`` is where lists.pxd declares it (compiled only): for
    lists grown to several capacities, the slots ``sys.getsizeof`` counts equal the field."""
    if not cython.compiled:
        return False
    empty = sys.getsizeof([])
    slot = sys.getsizeof([None]) - empty            # a list made from one item has one slot
    if slot != cython.sizeof(cython.p_void):
        return False
    probe: list = []
    for n in range(40):
        allocated = cython.cast(cython.pointer(PyListObject), probe).allocated   # noqa: F821
        if allocated != (sys.getsizeof(probe) - empty) // slot or Py_SIZE(probe) != n:   # noqa: F821
            return False
        probe.append(n)
    return True


def use_struct(enabled: bool) -> bool:
    """Turn the struct path on (only where the layout matched) or off; returns the previous
    setting (tests run the helpers both ways)."""
    global _direct
    previous = _direct
    _direct = enabled and layout_matches()
    return previous


def push(items: list, item) -> None:
    """``items.append(item)``; compiled, into spare capacity without a call when there is some."""
    if cython.compiled and _direct:
        n = Py_SIZE(items)             # noqa: F821
        if cython.cast(cython.pointer(PyListObject), items).allocated > n:   # noqa: F821
            Py_INCREF(item)            # noqa: F821
            PyList_SET_ITEM(items, n, item)   # noqa: F821
            Py_SET_SIZE(items, n + 1)  # noqa: F821
            return
    items.append(item)


def pop_last(items: list):
    """``items.pop()`` of a non-empty list; compiled, the item array is kept even when the
    list empties."""
    if cython.compiled and _direct:
        n = Py_SIZE(items)             # noqa: F821
        if n > 0:
            item = cython.cast(object, PyList_GET_ITEM(items, n - 1))   # noqa: F821 (a new reference)
            Py_SET_SIZE(items, n - 1)  # noqa: F821
            Py_DECREF(item)            # noqa: F821 (the list's reference, which the slot no longer holds)
            return item
    return items.pop()


_direct = layout_matches()
