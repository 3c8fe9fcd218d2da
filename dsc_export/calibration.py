"""Calibration and held-out samples of the lossy wire forms (I/O shell around graph/wire.py).

``split --wire ...,int8`` calibrates each int8 cut's scale and zero point on one part of the
sample inputs and measures every form's fidelity (:mod:`dsc_export.fidelity`) on the other
part, never on the samples that calibrated it:

- ``--inputs`` with K samples: the first half (rounded up) calibrates, the rest is held out
  (:func:`dsc_export.fidelity.partition`); one sample serves both, and the manifest says so.
- random inputs: calibration and held-out inputs are separate random draws
  (:data:`RANDOM_SAMPLES` each). A lossy form made that way gets a note: real inputs are needed
  for a trustworthy scale and agreement.

The manifest records which part did what (``Manifest.samples``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from dsc_export.artifacts import CutPoint
from dsc_export.fidelity import concat_batches, partition
from dsc_export.graph import wire
from dsc_export.graph.probe import run_with_outputs

RANDOM_SAMPLES = 16  # random calibration draws, and as many held-out draws
MAX_CALIBRATION = 64  # samples run at once for calibration (the rest is not used)
HELD_OUT_BATCH = 16  # held-out samples per run
RANDOM_NOTE = (
    "the lossy wire form ({forms}) was calibrated and measured on random inputs: give real ones "
    "with --inputs for a trustworthy scale and agreement figure"
)


@dataclass
class SampleParts:
    """The two parts of the sample inputs: ``calibration`` and ``held_out`` (each a
    :class:`dsc_export.inputs.SampleInputs`), their sizes, and the manifest's record."""

    calibration: object
    held_out: object
    calibration_count: int
    held_out_count: int
    record: dict
    notes: list[str]

    def held_out_feeds(self, fixed_batch: int | None) -> list[dict]:
        """The held-out samples as batches (of the fixed batch size, or up to
        :data:`HELD_OUT_BATCH`); concatenated and cut to ``held_out_count`` they are the samples
        in order (:func:`trim`)."""
        b = fixed_batch or min(HELD_OUT_BATCH, self.held_out_count)
        return [self.held_out.feeds(b, i) for i in range(math.ceil(self.held_out_count / b))]

    def trim(self, batches: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Per-batch outputs of :meth:`held_out_feeds` as one array per output, one row per
        held-out sample."""
        return [a[: self.held_out_count] for a in concat_batches(batches)]


def sample_parts(samples) -> SampleParts:
    """Split the sample inputs into a calibration part and a held-out part (module docstring)."""
    count = samples.count
    if count is None:
        cal, held = samples.subset([], "calibration"), samples.subset([], "held out")
        record = {
            "source": samples.description,
            "random": True,
            "calibration": [f"random draws 0-{RANDOM_SAMPLES - 1} (seed {cal.seed})"],
            "held_out": [f"random draws 0-{RANDOM_SAMPLES - 1} (seed {held.seed})"],
        }
        return SampleParts(cal, held, RANDOM_SAMPLES, RANDOM_SAMPLES, record, [])
    cal_idx, held_idx = partition(count)
    names = samples.sample_names
    notes = []
    if count == 1:
        notes.append(
            "one sample input both calibrated the int8 forms and measured every form's fidelity; "
            "give more (--inputs) to hold some out"
        )
    record = {
        "source": samples.description,
        "random": False,
        "calibration": [names[i] for i in cal_idx],
        "held_out": [names[i] for i in held_idx],
    }
    return SampleParts(
        samples.subset(cal_idx, "calibration"),
        samples.subset(held_idx, "held out"),
        len(cal_idx),
        len(held_idx),
        record,
        notes,
    )


def _values(
    folded: onnx.ModelProto, tensors: list[str], part, count: int, fixed: int | None
) -> dict:
    batch = fixed or min(count, MAX_CALIBRATION)
    return run_with_outputs(folded, tensors, (batch,), inputs=part)[0]


def calibrate(
    folded: onnx.ModelProto,
    points: list[CutPoint],
    parts: SampleParts,
    fixed: int | None,
    *,
    per_channel: bool = False,
    symmetric: bool = False,
) -> tuple[dict[str, dict], list[str]]:
    """The int8 map of each cut point, calibrated on the calibration part.

    Args:
        folded: the folded whole model (not modified).
        points: the cut points that get an int8 form.
        parts: the sample parts (:func:`sample_parts`).
        fixed: the model's only batch size, or None.
        per_channel: also calibrate one scale per channel (axis 1) and keep it for a point only
            when its mean squared error on the held-out part is lower than per-tensor's.

    Returns:
        ``({tensor: Split.quant record}, notes)``; each record is :meth:`wire.Quant.as_dict` with
        ``clipped`` (share of held-out values outside the range), ``calibration_samples`` and,
        with ``per_channel``, the held-out errors of both maps (``mse``, ``mse_per_tensor``).

    Raises:
        ModelRunError: the model fails on the sample inputs.
    """
    if not points:
        return {}, []
    tensors = [p.tensor for p in points]
    cal = _values(folded, tensors, parts.calibration, parts.calibration_count, fixed)
    held = _values(folded, tensors, parts.held_out, parts.held_out_count, fixed)
    out, notes = {}, []
    for p in points:
        x_cal, x_held = cal[p.tensor], held[p.tensor]
        q = wire.calibrate(x_cal, symmetric=symmetric)
        info = {}
        if per_channel and x_cal.ndim >= 2:
            qc = wire.calibrate(x_cal, axis=1, symmetric=symmetric)
            e_t, e_c = _mse(x_held, q), _mse(x_held, qc)
            info = {"mse": e_t, "mse_per_tensor": e_t}
            if e_c < e_t:
                q, info = qc, {"mse": e_c, "mse_per_tensor": e_t}
                notes.append(
                    f"int8 at '{p.tensor}': per-channel scales kept (held-out error {e_c:.3g} < "
                    f"per-tensor {e_t:.3g})"
                )
            else:
                notes.append(
                    f"int8 at '{p.tensor}': per-channel scales lose on the held-out samples "
                    f"(error {e_c:.3g} >= per-tensor {e_t:.3g}); per-tensor kept"
                )
        out[p.tensor] = {
            **q.as_dict(),
            "symmetric": symmetric,
            "clipped": wire.clipped_share(x_held, q),
            "calibration_samples": int(len(x_cal)),
            **info,
        }
    return out, notes


def quantize_dequantize(x: np.ndarray, q: wire.Quant) -> np.ndarray:
    """x -> int8 -> x as the ONNX QuantizeLinear / DequantizeLinear pair computes it (round half
    to even, saturate), in float64: what the tail sees."""
    scale = np.asarray(q.scale, dtype=np.float32).astype(np.float64)
    zp = np.asarray(q.zero_point, dtype=np.float64)
    if q.axis is not None:
        shape = [1] * x.ndim
        shape[q.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    y = np.clip(np.rint(x.astype(np.float64) / scale) + zp, wire.QMIN, wire.QMAX)
    return (y - zp) * scale


def _mse(x: np.ndarray, q: wire.Quant) -> float:
    return float(np.mean((quantize_dequantize(x, q) - x.astype(np.float64)) ** 2))
