"""The shaped link: a namespace, a veth pair and tc; measured rate, retuning, cleanup."""

import subprocess

import pytest

from dsc_export.errors import UserError
from dsc_export.serving.bandwidth import ShapedLink

pytestmark = pytest.mark.netns


def _namespaces():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_shaped_link_rate_and_retuning_and_cleanup():
    with ShapedLink(rate_MBps=4.0, index=7) as link:
        assert link.ns in _namespaces()
        slow = link.measure_rate(4_000_000)  # a plain TCP transfer: the bytes over the time it took
        link.set_rate(16.0)
        fast = link.measure_rate(16_000_000)
        assert 0.8 * 4.0 <= slow <= 1.1 * 4.0, slow
        assert 0.8 * 16.0 <= fast <= 1.1 * 16.0, fast
    assert link.ns not in _namespaces()


def test_link_is_removed_when_the_block_fails():
    with pytest.raises(RuntimeError):
        with ShapedLink(rate_MBps=2.0, index=8) as link:
            name = link.ns
            raise RuntimeError("boom")
    assert name not in _namespaces()
    with pytest.raises(UserError, match="positive"):
        with ShapedLink(rate_MBps=2.0, index=9) as link:
            link.set_rate(0)
    assert link.ns not in _namespaces()
