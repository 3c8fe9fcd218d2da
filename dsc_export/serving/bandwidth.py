"""A real shaped link for tests and benchmarks: a network namespace, a veth pair and ``tc``.

The server runs inside the namespace, the client outside; the traffic between them crosses the
veth pair, whose host side is shaped with a token bucket (an ``htb`` class: the data rate the
client sees for its uploads) and optionally ``netem`` (a one-way delay). :meth:`ShapedLink.set_rate`
retunes the rate while transfers run (``tc class change``; queued packets are kept). Only
loopback and this namespace are ever addressed; everything is removed on exit, on an error, and
by :func:`cleanup_stale` for namespaces a killed process left behind. Needs root (CAP_NET_ADMIN);
:func:`permitted` says whether this machine allows it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from dsc_export.errors import UserError

PREFIX = "dsc"

_SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20): pass
    c.sendall(b"k"); c.close()
"""


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise UserError(f"'{' '.join(cmd)}' failed: {out.stderr.strip() or out.stdout.strip()}")
    return out


def permitted() -> str | None:
    """None when namespaces and tc can be used here, else why not (one line)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces and shaping links needs root"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"'{tool}' is not installed (iproute2)"
    name = f"{PREFIX}probe{os.getpid()}"
    out = _run(["ip", "netns", "add", name], check=False)
    if out.returncode != 0:
        return f"this machine does not permit network namespaces ({out.stderr.strip()})"
    _run(["ip", "netns", "del", name], check=False)
    return None


def cleanup_stale() -> list[str]:
    """Delete namespaces of this project whose creating process is gone."""
    out = _run(["ip", "netns", "list"], check=False)
    removed = []
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX) and name[len(PREFIX):].split("-")[0].isdigit():
            pid = int(name[len(PREFIX):].split("-")[0])
            if not os.path.exists(f"/proc/{pid}"):
                _run(["ip", "netns", "del", name], check=False)
                removed.append(name)
    return removed


class ShapedLink:
    """A namespace ``dsc<pid>-<n>`` reachable from here at ``server_ip`` through a shaped veth.

    Args:
        rate_MBps: data rate from here into the namespace, MB/s (1 MB = 10^6 bytes).
        delay_ms: one-way delay added on the same direction (netem), 0 for none.
        index: a small number to tell several links of one process apart.
    """

    def __init__(self, rate_MBps: float, delay_ms: float = 0.0, index: int = 0):
        self.ns = f"{PREFIX}{os.getpid()}-{index}"
        self.host_if, self.ns_if = f"{PREFIX}{os.getpid() % 100000}h{index}", f"{PREFIX}{os.getpid() % 100000}n{index}"
        self.host_ip, self.server_ip = f"10.231.{index}.1", f"10.231.{index}.2"
        self.rate_MBps, self.delay_ms = rate_MBps, delay_ms
        self.up = False

    def __enter__(self) -> ShapedLink:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Create the namespace pair and shape its link to ``rate_MBps`` and ``delay_ms``.

        Raises:
            UserError: not permitted here (no root or no ``ip``/``tc``), or a command fails (what was
                made is removed first).
        """
        why = permitted()
        if why:
            raise UserError(why)
        try:
            _run(["ip", "netns", "add", self.ns])
            self.up = True
            _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if])
            _run(["ip", "link", "set", self.ns_if, "netns", self.ns])
            _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
            _run(["ip", "link", "set", self.host_if, "up"])
            _run(["ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.server_ip}/30", "dev", self.ns_if])
            _run(["ip", "netns", "exec", self.ns, "ip", "link", "set", self.ns_if, "up"])
            _run(["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"])
            # no offloads: the shaper must see real packet sizes
            if shutil.which("ethtool"):
                _run(["ethtool", "-K", self.host_if, "tso", "off", "gso", "off", "gro", "off"], check=False)
            self._qdisc("add")
        except BaseException:
            self.stop()
            raise

    def _qdisc(self, verb: str) -> None:
        """``add``: an HTB root whose one class holds the rate (netem beneath it for a delay);
        ``change``: retune that class. An HTB class changes rate without touching the packets
        queued beneath it (a tbf ``change`` drops them, and TCP then stalls for seconds)."""
        rate_bit = f"{int(self.rate_MBps * 8e6)}bit"
        burst = str(max(int(self.rate_MBps * 1e6 / 250), 16 * 1514))  # about 4 ms of data, at least 16 packets
        cls = ["dev", self.host_if, "parent", "1:", "classid", "1:1", "htb", "rate", rate_bit, "ceil", rate_bit,
               "burst", burst, "cburst", burst]
        if verb == "change":
            _run(["tc", "class", "change", *cls])
            return
        _run(["tc", "qdisc", "add", "dev", self.host_if, "root", "handle", "1:", "htb", "default", "1"])
        _run(["tc", "class", "add", *cls])
        if self.delay_ms > 0:
            _run(["tc", "qdisc", "add", "dev", self.host_if, "parent", "1:1", "handle", "10:", "netem", "delay",
                  f"{self.delay_ms}ms", "limit", "100000"])

    def set_rate(self, rate_MBps: float) -> None:
        """Change the data rate now (transfers in flight continue at the new rate).

        Raises:
            UserError: the rate is not positive, or ``tc`` fails.
        """
        if not rate_MBps > 0:
            raise UserError("the rate must be positive")
        self.rate_MBps = rate_MBps
        self._qdisc("change")

    def measure_rate(self, nbytes: int = 8_000_000, port: int = 5999) -> float:
        """The link's rate as a plain TCP transfer of ``nbytes`` from here into the namespace
        measures it (a sink runs there meanwhile), MB/s.

        Raises:
            UserError: the sink does not start.
        """
        import socket
        import sys
        import time

        sink = subprocess.Popen(self.exec_argv([sys.executable, "-c", _SINK, self.server_ip, str(port)]),
                                stdout=subprocess.PIPE, text=True)
        try:
            if sink.stdout.readline().strip() != "ready":
                raise UserError("the TCP sink in the namespace did not start")
            s = socket.create_connection((self.server_ip, port), timeout=60)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = b"\x01" * (1 << 20)
            t = time.perf_counter()
            sent = 0
            while sent < nbytes:
                s.sendall(data[: min(len(data), nbytes - sent)])
                sent += min(len(data), nbytes - sent)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)  # the sink answers once it has read everything
            s.close()
            return nbytes / (time.perf_counter() - t) / 1e6
        finally:
            sink.kill()
            sink.wait()

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def stop(self) -> None:
        """Remove the namespace (the veth pair goes with it) and the host side, if left."""
        _run(["ip", "link", "del", self.host_if], check=False)
        if self.up:
            _run(["ip", "netns", "del", self.ns], check=False)
            self.up = False


class SimulatedLink:
    """A link simulated in the client: each request waits ``bytes / rate`` before it is sent.

    For demos and what-if runs on one machine without root: wraps a client's remote so that a
    transfer of N bytes takes at least N / rate seconds on top of the real (loopback) transfer.
    The rate can be changed between batches (``link.rate_MBps = 5``).
    """

    def __init__(self, rate_MBps: float):
        self.rate_MBps = rate_MBps

    def attach(self, remote) -> None:
        """Wrap ``remote.infer`` so that each request first waits its bytes / ``rate_MBps``."""
        import time

        real = remote.infer

        def infer(model, x, outputs):
            time.sleep(x.nbytes / (self.rate_MBps * 1e6))
            return real(model, x, outputs)

        remote.infer = infer
