"""Nothing left running: a server stops every process it started, PyTriton's Python-backend
stubs included (they ignore SIGTERM and outlive a killed tritonserver), also when it is stopped
during start-up. The stubs are counted in /proc by the tag PyTriton puts in their command line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_server_load import tiny  # noqa: F401  (tiny: a module fixture)

from dsc_export.serving.processes import kill_stubs, stubs_of
from dsc_export.serving.server import ServeOptions, TailServer, free_ports

pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="counts processes in /proc")

ROOT = Path(__file__).parents[1]


def _gone(pid: int, timeout_s: float = 10.0) -> list[int]:
    """The stubs of ``pid`` still alive once they had ``timeout_s`` to go."""
    end = time.monotonic() + timeout_s
    while stubs_of(pid) and time.monotonic() < end:
        time.sleep(0.1)
    return stubs_of(pid)


def _serve(root: Path, log: Path) -> subprocess.Popen:
    http, grpc, metrics = free_ports(3)
    return subprocess.Popen([sys.executable, "-m", "dsc_export", "serve", str(root), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1",
                             "--triton-log", str(log)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_kill_stubs_finds_a_stub_by_its_tag_and_kills_what_ignores_sigterm(tmp_path):
    """A stand-in stub: a process named like one, tagged with this pid, that ignores SIGTERM."""
    stub = tmp_path / "triton_python_backend_stub"
    stub.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "print('ready', flush=True)\ntime.sleep(600)\n")
    tag = f"pytrtion{os.getpid()}-deadbeef"
    other = f"pytrtion{os.getpid() + 1}-deadbeef"  # another process's stub: not ours to kill
    mine = subprocess.Popen([sys.executable, str(stub), tag], stdout=subprocess.PIPE, text=True)
    theirs = subprocess.Popen([sys.executable, str(stub), other], stdout=subprocess.PIPE, text=True)
    try:
        assert mine.stdout.readline() == theirs.stdout.readline() == "ready\n"
        assert _wait_for(lambda: stubs_of() == [mine.pid], 10), stubs_of()
        mine.terminate()  # ignored, as the real stubs do
        time.sleep(0.3)
        assert mine.poll() is None
        assert kill_stubs() == 1
        assert mine.wait(5) == -signal.SIGKILL and stubs_of() == []
        assert theirs.poll() is None  # untouched
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait()


def test_serve_stopped_leaves_no_stub(tiny, tmp_path):  # noqa: F811
    root, _ = tiny
    proc = _serve(root, tmp_path / "triton.log")
    try:
        assert _wait_for(lambda: len(stubs_of(proc.pid)) >= 3, 120), "the server did not start its stubs"
        started = len(stubs_of(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert started >= 3  # one per tail at least, dsc_meta and dsc_load
    assert _gone(proc.pid) == []


def test_serve_stopped_during_start_up_leaves_no_stub(tiny, tmp_path):  # noqa: F811
    """SIGTERM while Triton is still loading the models (the first stub is up, not all)."""
    root, _ = tiny
    proc = _serve(root, tmp_path / "triton.log")
    try:
        assert _wait_for(lambda: len(stubs_of(proc.pid)) >= 1, 120), "the server did not start a stub"
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone(proc.pid) == []


def test_tail_server_in_process_leaves_no_stub(tiny, tmp_path):  # noqa: F811
    root, _ = tiny
    http, grpc, metrics = free_ports(3)
    opts = ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, threads=1,
                        log_file=tmp_path / "triton.log")
    with TailServer(root, opts):
        assert len(stubs_of()) >= 3
    assert _gone(os.getpid(), 0.5) == []  # stop() returned only once they were gone


def test_stubs_of_a_killed_server_are_found_and_killed(tiny, tmp_path):  # noqa: F811
    """A server killed outright (SIGKILL, as a test or a benchmark may) cannot clean up: its
    stubs are found by its pid and killed by whoever started it (benchmarks' ``stop``)."""
    root, _ = tiny
    proc = _serve(root, tmp_path / "triton.log")
    try:
        assert _wait_for(lambda: len(stubs_of(proc.pid)) >= 3, 120), "the server did not start its stubs"
        time.sleep(1.0)
        proc.kill()
        proc.wait(10)
        left = _gone(proc.pid, 3.0)
        kill_stubs(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"stubs alive 3 s after the server was killed: {len(left)}")
    assert _gone(proc.pid, 1.0) == []
