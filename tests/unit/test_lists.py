"""meshproxy.lists: list operations that keep capacity must behave as the list methods, on the
list struct (compiled, when the layout check passed) and on the fallback (the list methods)."""
from __future__ import annotations

import random
import sys

import pytest

import meshproxy
from meshproxy.lists import clear, layout_matches, pop_last, push, use_struct, with_room

COMPILED = meshproxy.HOT_PATH == "compiled"


@pytest.fixture(autouse=True, params=["struct", "list methods"] if COMPILED else ["list methods"])
def struct_path(request):
    """Every test runs on both paths (pure Python has only the second)."""
    wanted = request.param == "struct"
    previous = use_struct(wanted)
    yield wanted
    use_struct(previous)


def test_the_layout_check_passes_on_this_cpython_compiled_only():
    assert layout_matches() is COMPILED


@pytest.mark.parametrize("seed", range(20))
def test_push_and_pop_last_do_what_append_and_pop_do(seed):
    rng = random.Random(seed)
    ours, reference = with_room(rng.choice([0, 1, 4, 16])), []
    for step in range(400):
        if reference and rng.random() < 0.45:
            assert pop_last(ours) is reference.pop()
        else:
            item = object() if rng.random() < 0.5 else step
            push(ours, item)
            reference.append(item)
        assert ours == reference and len(ours) == len(reference)
    ours.append("x")                     # still an ordinary list for everyone else
    ours.extend(range(30))
    reference.append("x")
    reference.extend(range(30))
    assert ours == reference


def test_pop_last_of_an_empty_list_raises_like_pop():
    with pytest.raises(IndexError):
        pop_last(with_room(4))
    with pytest.raises(IndexError):
        pop_last([])


def test_items_taken_off_are_released():
    class Item:
        pass
    items = with_room(2)
    item = Item()
    push(items, item)
    before = sys.getrefcount(item)
    assert pop_last(items) is item
    assert sys.getrefcount(item) == before - 1


def test_on_the_struct_the_item_array_outlives_an_empty_list(struct_path):
    items = with_room(4)
    size = sys.getsizeof(items)          # counts the allocated slots
    for _ in range(3):
        push(items, 1)
        pop_last(items)
    if struct_path:
        assert sys.getsizeof(items) == size > sys.getsizeof([])
    else:
        assert items == [] and sys.getsizeof(items) == sys.getsizeof([])


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17])
def test_clear_empties_releases_and_on_the_struct_keeps_the_room(n, struct_path):
    class Item:
        pass
    items = with_room(4)
    kept = [Item() for _ in range(n)]
    for item in kept:
        push(items, item)
    counts = [sys.getrefcount(item) for item in kept]
    size = sys.getsizeof(items)
    clear(items)
    assert items == []
    assert [sys.getrefcount(item) for item in kept] == [c - 1 for c in counts]
    if struct_path:
        assert sys.getsizeof(items) == size
    push(items, "again")
    assert items == ["again"]


def test_clear_while_a_released_item_touches_the_list(struct_path):
    items = with_room(2)
    seen = []

    class Noisy:
        def __del__(self):
            seen.append(list(items))     # the list as the release sees it

    push(items, "a")
    push(items, Noisy())
    clear(items)
    # compiled, the released item has left and the one before it is still there; list.clear
    # empties the whole list before releasing anything
    assert seen == ([["a"]] if struct_path else [[]])
    assert items == []
