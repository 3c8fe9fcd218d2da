"""The shaped link: a namespace, a veth pair and tc; measured rate, retuning, cleanup."""

import subprocess
import sys
import time

import pytest

from dsc_export.errors import UserError
from dsc_export.serving.bandwidth import ShapedLink

pytestmark = pytest.mark.netns

SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5999)); s.listen(1); print("ready", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20): pass
    c.sendall(b"k"); c.close()
"""


def _namespaces():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _send(ip: str, nbytes: int) -> float:
    import socket

    s = socket.create_connection((ip, 5999), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = b"\x01" * (1 << 20)
    t = time.perf_counter()
    sent = 0
    while sent < nbytes:
        s.sendall(data[: min(len(data), nbytes - sent)])
        sent += min(len(data), nbytes - sent)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    return nbytes / (time.perf_counter() - t) / 1e6


def test_shaped_link_rate_and_retuning_and_cleanup():
    with ShapedLink(rate_MBps=4.0, index=7) as link:
        assert link.ns in _namespaces()
        sink = subprocess.Popen(link.exec_argv([sys.executable, "-c", SINK, link.server_ip]),
                                stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout.readline().strip() == "ready"
            slow = _send(link.server_ip, 4_000_000)
            link.set_rate(16.0)
            fast = _send(link.server_ip, 16_000_000)
        finally:
            sink.kill()
            sink.wait()
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
