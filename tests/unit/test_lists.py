"""meshproxy.lists: list operations that keep capacity must behave as the list methods, on the
list struct (compiled, when the layout check passed) and on the fallback (the list methods)."""
from __future__ import annotations

import random
import sys

import pytest

import meshproxy
from meshproxy.lists import layout_matches, pop_last, push, use_struct

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
    start = list(range(rng.choice([0, 1, 4, 16])))
    ours, reference = list(start), list(start)
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
        pop_last([])
    emptied = [1]
    pop_last(emptied)
    with pytest.raises(IndexError):
        pop_last(emptied)


def test_items_taken_off_are_released():
    class Item:
        pass
    items = []
    item = Item()
    push(items, item)
    before = sys.getrefcount(item)
    assert pop_last(items) is item
    assert sys.getrefcount(item) == before - 1


def test_on_the_struct_the_item_array_outlives_an_empty_list(struct_path):
    items = [0, 0]                       # two slots: list.pop frees them when it empties the list
    pop_last(items)
    pop_last(items)
    size = sys.getsizeof(items)          # counts the allocated slots
    for _ in range(3):
        push(items, 1)
        pop_last(items)
    if struct_path:
        assert sys.getsizeof(items) == size > sys.getsizeof([])
    else:
        assert items == [] and sys.getsizeof(items) == sys.getsizeof([])
