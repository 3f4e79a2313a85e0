"""Lists on the request path that keep their capacity.

CPython frees a list's item array when it empties (``pop`` of the last item) and grows it in
steps of about an eighth (0, 4, 8, 16 items: a realloc at each step), so a per-request list
that fills to a dozen fields, or a stack that goes 0 -> 1 -> 0 items once per request,
allocates on every request.  Compiled, these helpers put items into spare capacity and take
them off without shrinking; pure Python they are the list methods they stand for.

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


def with_room(n: int) -> list:
    """An empty list with room for ``n`` items before its first reallocation (compiled)."""
    if cython.compiled and _direct:
        items = PyList_New(n)          # noqa: F821 (lists.pxd cimports the C API)
        Py_SET_SIZE(items, 0)          # noqa: F821 (the slots past the size are never read)
        return items
    return []


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


def clear(items: list) -> None:
    """``items.clear()``; compiled, the item array is kept.  Each item leaves the list before
    its reference is dropped, so whatever that release runs sees a consistent list (and
    anything it appends is cleared too)."""
    if cython.compiled and _direct:
        n = Py_SIZE(items)             # noqa: F821
        while n > 0:
            n -= 1
            item = PyList_GET_ITEM(items, n)   # noqa: F821 (borrowed: the list's reference)
            Py_SET_SIZE(items, n)      # noqa: F821
            Py_XDECREF(item)           # noqa: F821 (the reference the list held)
            n = Py_SIZE(items)         # noqa: F821 (in case a release changed the list)
        return
    items.clear()


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
