"""The suite's own schedule: the modules `make test` starts first (tests/conftest.py ``HEAVIEST_FIRST``) exist, so
a renamed module cannot silently fall to the end of the run and leave one test process working alone."""

from __future__ import annotations

from pathlib import Path

from conftest import HEAVIEST_FIRST

TESTS = Path(__file__).resolve().parent


def test_every_module_started_first_exists_once():
    assert len(set(HEAVIEST_FIRST)) == len(HEAVIEST_FIRST)
    assert [name for name in HEAVIEST_FIRST if not (TESTS / name).is_file()] == []


def test_the_longest_modules_are_collected_first(request):
    order = list(dict.fromkeys(item.path.name for item in request.session.items))
    if len(order) > len(HEAVIEST_FIRST):  # the whole suite was collected
        assert order[: len(HEAVIEST_FIRST)] == list(HEAVIEST_FIRST)
    assert order.index("test_suite_order.py") >= len([n for n in HEAVIEST_FIRST if n in order])
