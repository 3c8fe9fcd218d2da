"""The processes a PyTriton server leaves behind, found and stopped (Linux ``/proc``).

PyTriton starts ``tritonserver``, and Triton's Python backend starts one
``triton_python_backend_stub`` per model instance. The stubs ignore SIGTERM; when
``tritonserver`` is killed before it has stopped them (its exit timeout, a signal during
start-up) they live on, orphaned (parent 1), holding memory. PyTriton names each stub's shared
memory after the process that bound the models: ``pytrtion<pid>-…`` in the stub's command line,
so the stubs of this process are found even once orphaned.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STUB = "triton_python_backend_stub"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # no /proc: not Linux
        return []


def stubs_of(owner: int | None = None) -> list[int]:
    """The live Python-backend stubs that ``owner`` (a pid; default this process) started
    through PyTriton, orphaned or not (zombies excluded)."""
    tag = f"pytrtion{owner or os.getpid()}-"
    found = []
    for pid in _pids():
        cmd = _cmdline(pid)
        if STUB in cmd and tag in cmd and not _zombie(pid):
            found.append(pid)
    return found


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def kill_stubs(owner: int | None = None, wait_s: float = 5.0) -> int:
    """SIGKILL the stubs of ``owner`` (default: this process) that are still alive (they ignore
    SIGTERM) and wait up to ``wait_s`` until they are gone. Returns how many were killed."""
    pids = stubs_of(owner)
    killed = len(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    end = time.monotonic() + wait_s
    while pids and time.monotonic() < end:
        for pid in list(pids):  # a killed child of ours stays a zombie until its parent waits
            if _zombie(pid) or not Path(f"/proc/{pid}").exists():
                pids.remove(pid)
        time.sleep(0.02)
    return killed
