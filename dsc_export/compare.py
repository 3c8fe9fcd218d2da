"""Comparing results: one place that says when two computations agree.

Every numerical check of the project goes through :func:`compare` with a tolerance from
:func:`tolerance`: split verification (tail(head(x)) against the whole model), engine checks
(an engine against its ONNX), the export check (onnxruntime against torch) and the benchmarks.

Two rules:

- **A NaN or an infinity is never a difference of 0.** ``max`` over an array with a NaN drops
  it (or returns it, depending on the order), so non-finite values are counted first: any
  non-finite value in a result where the reference is finite, or the reverse, is a failure with
  its own message. A reference that is itself non-finite is a failure too (random inputs that
  overflow the model: give real inputs).
- **Tolerances follow the dtypes compared.** The least precise floating dtype on the path
  (the outputs compared, a float16 wire, float16 engine compute) decides; float16 results are
  never held to float32's tolerance, nor float32 results to float16's.

Differences are relative to the largest reference magnitude of each output, so a tolerance
means "this many units of the output's scale", independent of the model's logit range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Relative tolerance (max |got - ref| / max |ref|) of one computation against another that runs
# the same operators in the same dtype but with other fusions or kernel choices.
# float32: onnxruntime sessions of a model and of its head + tail differ by a few ulps of
# accumulated rounding (1e-6 seen on EfficientNet-B7); float16: one float16 step (2**-10 relative)
# at the cut, propagated through a tail; bfloat16: one bfloat16 step (2**-7), likewise.
REL_TOLERANCE = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-2, "bfloat16": 1e-1}
# An engine is compiled separately (other kernels, NCHWc layouts, fused BatchNorm; TensorRT with
# TF32 off): float32 gets ten times more, float16 compute one and a half times more.
ENGINE_REL_TOLERANCE = {"float64": 1e-8, "float32": 1e-4, "float16": 3e-2, "bfloat16": 1e-1}
_ORDER = ["float64", "float32", "float16", "bfloat16"]  # most to least precise


def least_precise(*dtypes: str | np.dtype | None) -> str:
    """The least precise floating dtype among ``dtypes`` (non-float and None are ignored;
    ``float32`` when there is none)."""
    names = [d if isinstance(d, str) else np.dtype(d).name for d in dtypes if d is not None]
    floats = [n for n in names if n in _ORDER]
    return max(floats, key=_ORDER.index) if floats else "float32"


def tolerance(*dtypes: str | np.dtype | None, engine: bool = False) -> float:
    """Relative tolerance for results computed through tensors of ``dtypes``.

    Args:
        dtypes: every floating dtype on the compared path: the outputs' dtypes, the wire dtype,
            ``float16`` for an fp16-precision engine. The least precise one decides.
        engine: a separately compiled engine against its ONNX (:data:`ENGINE_REL_TOLERANCE`).

    Returns:
        max |got - ref| / max |ref| allowed, per output.
    """
    return (ENGINE_REL_TOLERANCE if engine else REL_TOLERANCE)[least_precise(*dtypes)]


@dataclass
class Comparison:
    """The worst difference over several outputs, and what went wrong if anything did.

    Attributes:
        max_abs: max |got - ref| over every output (float64 arithmetic); inf on a non-finite
            value or a shape mismatch.
        max_rel: max over outputs of max |got - ref| / max |ref| of that output.
        problem: None, or a sentence saying why the results cannot be compared (a NaN or inf,
            a shape or dtype mismatch); a comparison with a problem never passes.
    """

    max_abs: float = 0.0
    max_rel: float = 0.0
    problem: str | None = None

    def ok(self, tol: float) -> bool:
        """True when there was no problem and the relative difference is at most ``tol``."""
        return self.problem is None and self.max_rel <= tol

    def merge(self, other: Comparison) -> Comparison:
        """The worse of two comparisons: the larger differences, the first problem."""
        return Comparison(max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel),
                          self.problem or other.problem)

    def describe(self, tol: float) -> str:
        """One phrase: the problem, or the worst relative difference against ``tol``."""
        if self.problem:
            return self.problem
        return f"max relative difference {self.max_rel:.2e} > {tol:.0e} (max abs {self.max_abs:.2e})"


def _nonfinite(a: np.ndarray) -> str | None:
    if a.dtype.kind not in "fc" or a.size == 0:
        return None
    nan = int(np.isnan(a).sum())
    inf = int(np.isinf(a).sum())
    if not nan and not inf:
        return None
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} inf"] if inf else [])
    return " and ".join(parts)


def compare(reference: list[np.ndarray], got: list[np.ndarray], names: list[str] | None = None,
            what: str = "the result") -> Comparison:
    """Compare ``got`` with ``reference`` output by output.

    Args:
        reference: the trusted outputs (the whole model, the ONNX an engine was built from).
        got: the outputs to check, in the same order.
        names: output names for the messages [default: output 0, 1, ...].
        what: what ``got`` is, for the messages ("the tail", "the engine").

    Returns:
        A :class:`Comparison`; ``problem`` is set on a count or shape mismatch or on any NaN or
        infinity in either side.
    """
    names = names or [f"output {k}" for k in range(len(reference))]
    result = Comparison()
    if len(reference) != len(got):
        return Comparison(float("inf"), float("inf"),
                          f"{what} returns {len(got)} outputs where the reference returns {len(reference)}")
    for name, ref, out in zip(names, reference, got):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            return Comparison(float("inf"), float("inf"),
                              f"{what} returns '{name}' with shape {list(out.shape)}, the reference {list(ref.shape)}")
        bad_ref, bad_out = _nonfinite(ref), _nonfinite(out)
        if bad_ref:
            return Comparison(float("inf"), float("inf"),
                              f"the reference '{name}' itself holds {bad_ref} values, so nothing can be checked "
                              "against it (the model's own output is not finite on these inputs: give inputs for "
                              "which it is, with --inputs)")
        if bad_out:
            return Comparison(float("inf"), float("inf"),
                              f"{what} returns {bad_out} values in '{name}' where the reference is finite")
        if ref.size == 0:
            continue
        if ref.dtype.kind not in "fc" or out.dtype.kind not in "fc":
            d = float(np.max(ref != out))
            result = result.merge(Comparison(d, d))
            continue
        d = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64))))
        scale = float(np.max(np.abs(ref.astype(np.float64))))
        result = result.merge(Comparison(d, d / scale if scale > 0 else d))
    return result


def fits(dtype: str, values: np.ndarray) -> bool:
    """True when every value of ``values`` is finite and within ``dtype``'s finite range
    (float16: |x| <= 65504); non-float dtypes always fit."""
    if np.dtype(dtype).kind != "f" or values.dtype.kind != "f" or values.size == 0:
        return True
    big = float(np.finfo(dtype).max)
    v = values.astype(np.float64)
    return bool(np.isfinite(v).all() and np.abs(v).max() <= big)


def quantized_steps(reference: np.ndarray, got: np.ndarray) -> int:
    """The largest difference, in quantization steps, between two int8 wire tensors of the same
    shape (a quantized tensor may differ by one step where the floats before rounding differ by
    a few ulps: another engine's fusions); -1 on a shape mismatch."""
    reference, got = np.asarray(reference), np.asarray(got)
    if reference.shape != got.shape:
        return -1
    if reference.size == 0:
        return 0
    return int(np.max(np.abs(reference.astype(np.int64) - got.astype(np.int64))))
