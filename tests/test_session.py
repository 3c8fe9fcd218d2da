"""The session's batches: which image sits at each row is what images.batches put there."""

from __future__ import annotations

import numpy as np
import pytest

from dsc_export.images import batches
from dsc_export.session import Feed, random_feed


@pytest.mark.parametrize("n, b", [(3, 2), (5, 8), (8, 4), (7, 3)])
def test_image_at_names_the_image_in_each_row(n, b):
    images = [np.full((2, 2, 3), k, dtype=np.uint8) for k in range(n)]
    stacked = batches(images, b)
    feed = Feed([b, 2, 2, 3], np.dtype(np.uint8), [f"im{k}" for k in range(n)], stacked)
    for k in range(3 * len(stacked)):
        x = feed.batch(k)
        for i in range(b):
            assert np.array_equal(x[i], images[feed.image_at(k, i)])


def test_random_feed_draws_fresh_seeded_batches():
    a, b = random_feed([2, 3], np.float32, seed=1), random_feed([2, 3], np.float32, seed=1)
    first = a.batch(0)
    assert first.shape == (2, 3) and first.dtype == np.float32
    assert np.array_equal(first, b.batch(0)) and not np.array_equal(first, a.batch(1))
