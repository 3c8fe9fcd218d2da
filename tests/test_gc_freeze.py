"""split_model's collections skip what was alive before it (``split_check.skipping_older_objects``),
and the collector's state is as the caller left it afterwards."""

from __future__ import annotations

import gc

import pytest

from dsc_export.split_check import skipping_older_objects


def test_objects_alive_before_are_frozen_during_and_not_after():
    seen = {}

    @skipping_older_objects
    def work():
        seen["frozen"] = gc.get_freeze_count()
        return "done"

    gc.unfreeze()  # a caller that did not freeze the heap
    try:
        alive = [[] for _ in range(1000)]  # tracked objects alive before the call
        assert work() == "done"
        assert seen["frozen"] >= len(alive)  # the collector skipped them during the call
        assert gc.get_freeze_count() == 0  # and the caller's collector is as it was
    finally:
        gc.unfreeze()


def test_an_error_unfreezes_and_a_callers_own_freeze_is_left_alone():
    @skipping_older_objects
    def fails():
        raise ValueError("boom")

    gc.unfreeze()
    try:
        with pytest.raises(ValueError):
            fails()
        assert gc.get_freeze_count() == 0
        gc.freeze()  # a caller that froze the heap itself (a server about to fork)
        before = gc.get_freeze_count()

        @skipping_older_objects
        def work():
            return gc.get_freeze_count()

        assert work() == before and gc.get_freeze_count() == before  # not unfrozen behind its back
    finally:
        gc.unfreeze()
