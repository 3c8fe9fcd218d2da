"""Fidelity of a wire form: how far a candidate's answers are from the whole model's on raw input.

One function, :func:`measure`, used by every candidate that can change the answer: the cut
forms (``float16``, ``int8``: :mod:`dsc_export.splitting`) and the offload forms (an image
codec before the whole model). Pure numpy; the caller runs the models.

- **top-1 agreement**: the share of held-out samples whose top-1 class through the candidate
  equals the whole model's on the raw input. The class is the argmax over the last axis of the
  reference output (the first output, unless named). A class output is ``[N, C]`` with C > 1;
  for any other float output (``[N, C, H, W]`` maps, ``[N, T, V]`` sequences) the argmax over
  its last axis is taken per position and a sample agrees only when every position does:
  ``argmax_note`` says so. An integer output (labels already) agrees when it is equal. An output
  with one value per sample has no top-1: ``top1_agreement`` is None.
- **max_abs / max_rel**: the worst difference over every output, as
  :func:`dsc_export.compare.compare`
  computes it (max_rel relative to each output's largest reference magnitude).
- **A NaN or an infinity is never a difference of 0**: a sample whose candidate output is not
  finite disagrees, and max_abs / max_rel are then None with ``problem`` saying why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dsc_export.artifacts import LOSSLESS_FORMS, Split
from dsc_export.compare import compare
from dsc_export.errors import UserError


@dataclass(kw_only=True)
class Fidelity:
    """A candidate's answers against the whole model's on raw input (``Split.fidelity`` in the
    manifest, as :meth:`as_dict`).

    Attributes:
        top1_agreement: share of samples whose top-1 agrees (0..1); None when the reference
            output has no top-1 (one value per sample).
        max_abs: max |candidate - whole| over every output; None with a ``problem``.
        max_rel: max over outputs of max |candidate - whole| / max |whole|; None with a ``problem``.
        samples: how many held-out samples were compared.
        reference: the output whose argmax is the top-1.
        argmax_note: None for a class output ``[N, C]``; else how the top-1 was taken.
        problem: None, or why the differences are not numbers (a NaN or inf, a shape mismatch).
        tolerance_rel: the relative tolerance of the form's dtypes
            (:func:`dsc_export.compare.tolerance`), when given; ``within_tolerance``: no problem
            and ``max_rel`` at most that (the form reproduces the model numerically).
    """

    top1_agreement: float | None
    max_abs: float | None
    max_rel: float | None
    samples: int
    reference: str
    argmax_note: str | None = None
    problem: str | None = None
    tolerance_rel: float | None = None
    within_tolerance: bool | None = None

    def as_dict(self) -> dict:
        """The manifest's JSON form of this record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fidelity:
        """The record from its manifest JSON (unknown keys are ignored)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


def exact(
    reference: Sequence[np.ndarray], names: Sequence[str] | None = None, output: int = 0
) -> Fidelity:
    """The fidelity of a candidate that runs the whole model on the raw input itself
    (``offload`` raw, ``local``): its answers are the reference's."""
    return measure(reference, reference, names, output=output)


def top1(values: np.ndarray) -> np.ndarray:
    """The top-1 of each sample and position: argmax over the last axis of ``values``
    ``[N, ..., C]``
    (float), or ``values`` itself (integer labels). Shape ``[N, ...]``."""
    values = np.asarray(values)
    if values.dtype.kind in "iub":
        return values
    return np.argmax(values, axis=-1)


def _argmax_note(name: str, shape: tuple[int, ...], kind: str) -> tuple[str | None, bool]:
    """(note, has a top-1) for the reference output of this per-batch shape and dtype kind."""
    if kind in "iub":
        return (f"output '{name}' is integer {list(shape)}: a sample agrees when it is equal", True)
    if len(shape) < 2:
        return (
            f"output '{name}' {list(shape)} has one value per sample: no top-1 to compare",
            False,
        )
    if len(shape) == 2 and shape[1] > 1:
        return None, True
    return (
        f"output '{name}' {list(shape)} is not a class output [N, C]: the top-1 is the argmax "
        "over its "
        "last axis per position, and a sample agrees when every position does",
        True,
    )


def measure(
    reference: Sequence[np.ndarray],
    got: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    *,
    output: int = 0,
    tolerance: float | None = None,
) -> Fidelity:
    """Compare a candidate's outputs with the whole model's on the same held-out samples.

    Args:
        reference: the whole model's outputs on the raw held-out inputs, each ``[N, ...]``
            (N samples on axis 0), in the model's output order.
        got: the candidate's outputs for the same samples, same order and shapes.
        names: the outputs' names [default: ``output 0``, ...].
        output: which output holds the top-1 (its argmax over the last axis).
        tolerance: the relative tolerance of the form's dtypes; sets ``within_tolerance``.

    Returns:
        A :class:`Fidelity` over N samples.

    Raises:
        ValueError: no outputs, ``output`` out of range, or reference outputs whose first axes
            differ (not N samples each).
    """
    if not reference or not 0 <= output < len(reference):
        raise ValueError(f"output {output} is not among the {len(reference)} reference outputs")
    names = list(names) if names else [f"output {k}" for k in range(len(reference))]
    ref = np.asarray(reference[output])
    if ref.ndim == 0:
        raise ValueError(f"output '{names[output]}' has no sample axis")
    n = int(ref.shape[0])
    c = compare(list(reference), list(got), names, what="the candidate")
    note, has_top1 = _argmax_note(names[output], ref.shape, ref.dtype.kind)
    agreement = None
    if has_top1:
        out = np.asarray(got[output]) if len(got) > output else None
        if out is None or out.shape != ref.shape:
            agreement = 0.0
        else:
            same = (top1(ref) == top1(out)).reshape(n, -1).all(axis=1)
            if out.dtype.kind in "fc":  # a non-finite answer never agrees
                same &= np.isfinite(out.reshape(n, -1)).all(axis=1)
            agreement = float(same.mean()) if n else None
    within = None if tolerance is None else c.ok(tolerance)
    if c.problem:
        return Fidelity(
            top1_agreement=agreement,
            max_abs=None,
            max_rel=None,
            samples=n,
            reference=names[output],
            argmax_note=note,
            problem=c.problem,
            tolerance_rel=tolerance,
            within_tolerance=within,
        )
    return Fidelity(
        top1_agreement=agreement,
        max_abs=c.max_abs,
        max_rel=c.max_rel,
        samples=n,
        reference=names[output],
        argmax_note=note,
        tolerance_rel=tolerance,
        within_tolerance=within,
    )


def check_floor(min_agreement: float | None) -> None:
    """Raises UserError unless ``min_agreement`` is None or a share in [0, 1]."""
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise UserError(
            f"--min-agreement must be a share between 0 and 1 (0.95 = 95 %), not {min_agreement:g}"
        )


def admitted(split: Split, min_agreement: float | None = None) -> str | None:
    """Whether the plan may choose ``split``: None when it may, else why not (one phrase).

    - ``local`` and the lossless forms (``float32``, ``raw``, ``png``, ``webp``) always count.
    - ``float16`` counts when its fidelity is within the tolerance of its dtypes (or was not
      measured: a float16 split of an older manifest was verified within it); otherwise as a
      lossy form.
    - A lossy form (``int8``, ``jpegNN``, a float16 beyond tolerance) counts only with
      ``min_agreement`` and a measured top-1 agreement of at least that.

    Raises:
        UserError: ``min_agreement`` outside [0, 1].
    """
    check_floor(min_agreement)
    if split.kind == "local" or split.wire is None or split.wire in LOSSLESS_FORMS:
        return None
    fid = Fidelity.from_dict(split.fidelity) if split.fidelity else None
    if split.wire == "float16" and (fid is None or fid.within_tolerance is not False):
        return None
    if min_agreement is None:
        return f"lossy ({split.wire}): admitted only with --min-agreement"
    if fid is None or fid.top1_agreement is None:
        return f"lossy ({split.wire}) and its top-1 agreement was not measured"
    if fid.top1_agreement < min_agreement:
        return (
            f"top-1 agreement {fid.top1_agreement:.3f} on {fid.samples} held-out samples is below "
            f"--min-agreement {min_agreement:g}"
        )
    return None


def concat_batches(batches: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The outputs of several runs (each a list of arrays ``[B_k, ...]``) as one list of
    ``[sum B_k, ...]`` arrays, output by output."""
    if not batches:
        return []
    return [np.concatenate([b[k] for b in batches]) for k in range(len(batches[0]))]


def partition(count: int) -> tuple[list[int], list[int]]:
    """Which of ``count`` sample inputs calibrate the lossy forms and which are held out to
    measure fidelity: the first half (rounded up) calibrates, the rest is held out, in the given
    order (an image folder's sorted file names: shots of one scene, named alike, stay on one side
    more often than with interleaving). One sample serves both (the caller says so).

    Raises:
        ValueError: ``count`` < 1.
    """
    if count < 1:
        raise ValueError("no sample inputs to partition")
    if count == 1:
        return [0], [0]
    k = (count + 1) // 2
    return list(range(k)), list(range(k, count))
