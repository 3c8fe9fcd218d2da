"""Keep or drop: an engine is kept only where it is faster than the dynamic ONNX of its part.

Each engine is timed against the ONNX at its batch size (medians of interleaved runs) and kept
only when it is faster by more than the margin (:data:`MARGIN`).
"""

from __future__ import annotations

import numpy as np

from dsc_export.backends.base import Runner

MARGIN = 0.05  # an engine is kept when its median is below (1 - MARGIN) x its ONNX's
SPEED_ROUNDS = 5  # interleaved (engine, ONNX) pairs of timed runs per decision


def pays(engine_ms: float, onnx_ms: float, margin: float = MARGIN) -> bool:
    """True when an engine is faster than its ONNX by more than ``margin`` (0.05: 5 %), medians in ms."""
    return engine_ms < onnx_ms * (1.0 - margin)


def time_pair(engine: Runner, onnx: Runner, feeds: dict[str, np.ndarray],
              rounds: int = SPEED_ROUNDS) -> tuple[float, float]:
    """Median ms of ``engine`` and of ``onnx`` on ``feeds``, runs interleaved (order alternating
    each round, so drift and bursts of noise touch both), after one untimed run each. Both
    runners must be active."""
    import statistics

    engine.infer(feeds)
    onnx.infer(feeds)
    times: dict[int, list[float]] = {0: [], 1: []}
    pair = (engine, onnx)
    for r in range(max(1, rounds)):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[k].append(pair[k].time_ms(feeds))
    return statistics.median(times[0]), statistics.median(times[1])


def speed_record(engine_ms: float, onnx_ms: float, margin: float) -> dict:
    """The decision as an engine records it (``Engine.speed``): both medians (ms), the margin,
    and whether the engine is kept."""
    return {"engine_ms": round(engine_ms, 3), "onnx_ms": round(onnx_ms, 3), "margin": margin,
            "threads": None, "kept": pays(engine_ms, onnx_ms, margin)}
