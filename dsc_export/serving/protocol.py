"""Run-time helpers of the wire: readiness of a Triton server and its repository's models.

The names and rules both ends agree on (tensor names, the output contract, the Triton type
table) live in :mod:`dsc_export.contract`; they are importable from here too, for the run time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# the contract's names, for the run time: one import for client and server
from dsc_export.contract import (  # noqa: F401
    INPUT,
    LOAD,
    LOAD_OUTPUT,
    META,
    MODEL_SHA256,
    MODEL_SHA256_PARAMETER,
    PING,
    QUEUE_MS,
    SERVER_MS,
    TRITON_TYPES,
    OutputContract,
    ServerLoad,
    constant_outputs,
    fixed_batch,
    head_outputs,
    mergeable,
    output_contract,
    output_names,
    served_outputs,
    tail_contract,
    why_not_mergeable,
)
from dsc_export.errors import UserError

# --- readiness -------------------------------------------------------------------------------

def wait_ready(client, models: list[str], timeout_s: float, url: str,
               on_wait: Callable[[list[str]], None] = lambda pending: None, poll_s: float = 0.25) -> None:
    """Wait until a Triton server answers and every model of ``models`` is ready (Triton's
    model-ready API), or refuse after ``timeout_s``.

    Args:
        client: a ``tritonclient.http`` or ``tritonclient.grpc`` ``InferenceServerClient``.
        models: the model names that must be ready.
        timeout_s: seconds to wait (0: check once).
        url: the server's address, for the messages.
        on_wait: called once, with the models not yet ready, when waiting starts.
        poll_s: seconds between two checks.

    Raises:
        UserError: the server is not reachable, or some model is not ready in time; the message
            names them and what the server has.
    """
    deadline = time.monotonic() + max(0.0, timeout_s)
    told, pending, error = False, list(models), None
    while True:
        try:
            live = client.is_server_live()
            pending = [m for m in models if not live or not client.is_model_ready(m)]
            error = None if live else "not live"
        except Exception as exc:  # refused, reset, timed out: the server is not (yet) there
            error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if error is None and not pending:
            return
        if time.monotonic() >= deadline:
            break
        if not told:
            on_wait(pending)
            told = True
        time.sleep(poll_s)
    waited = f"within {timeout_s:g} s" if timeout_s > 0 else "(no wait)"
    if error is not None:
        raise UserError(f"the server at {url} does not answer {waited} ({error}); start it with "
                        "dsc-export serve, check --server, or wait longer with --wait-ready")
    has = repository_models(client)
    known = f"; it has {', '.join(sorted(has)) or 'no models'}" if has is not None else ""
    raise UserError(f"the server at {url} has not made {', '.join(pending)} ready {waited}{known}; serve this "
                    "split dir's server side there, or wait longer with --wait-ready")


def repository_models(client) -> dict[str, str] | None:
    """Model name -> state (READY, LOADING, UNAVAILABLE, ...) from the server's repository index,
    or None when the server does not say."""
    try:
        index = client.get_model_repository_index()
    except Exception:  # PyTriton restricts the repository API to its own access token
        return None
    if not isinstance(index, list):  # gRPC: a protobuf message
        index = [{"name": m.name, "state": m.state} for m in getattr(index, "models", [])]
    return {m.get("name", ""): m.get("state", "") or "" for m in index}
