"""The checks of a split: the whole model's reference run, and tail(head(x)) against it.

``split`` runs the whole model at the verification batch sizes (:data:`VERIFY_BATCHES`), which
also finds a model that runs at one batch size only and one whose samples depend on their
batch-mates, then checks every split against those outputs before anything is written
(:mod:`dsc_export.splitting` is the I/O shell that calls these).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from dsc_export.artifacts import Split
from dsc_export.calibration import SampleParts
from dsc_export.compare import Comparison, compare, tolerance
from dsc_export.errors import ModelRunError, UserError, VerificationError
from dsc_export.fidelity import exact, measure
from dsc_export.graph.model import load_model
from dsc_export.ort import make_session

VERIFY_BATCHES = (1, 3)  # the largest is also run sample by sample (batch independence)
# verification sessions are used once: skip the layout transform that copies the weights again
ONE_OFF = "extended"
# Quantized models: at "extended" onnxruntime fuses each DequantizeLinear -> op -> QuantizeLinear
# group into an integer kernel (and turns int8 Q/DQ pairs into uint8 ones), which rounds otherwise
# than the graph as written; a cut between a Q and its DQ leaves that group unfused. "basic" runs
# the graph as written, so the whole model and tail(head(x)) are compared on the same arithmetic.
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
QDQ_CHECK = "basic"


def verification_level(model: onnx.ModelProto) -> str:
    """onnxruntime's optimisation level for verifying splits of ``model`` (its structure is
    enough): :data:`QDQ_CHECK` for a model with QuantizeLinear / DequantizeLinear nodes (static
    quantization, whose fused integer kernels round otherwise than the graph as written and
    cannot fuse across a cut), else :data:`ONE_OFF`."""
    return QDQ_CHECK if any(n.op_type in QDQ_OPS for n in model.graph.node) else ONE_OFF


def fixed_batch_note(model: onnx.ModelProto, exc: ModelRunError, batch: int) -> str:
    """The note for a model that runs at one batch size only, naming the node that fixes it."""
    where = f"{exc.op} node '{exc.node}'" if exc.node else _batch_fixing_node(model, exc.op)[0]
    return (f"the model runs at batch {batch} only: at batch {exc.batch} onnxruntime fails in {where} "
            f"({exc.reason}); it is analysed, verified and built at batch {batch}, and never batched")


def _batch_fixing_node(model: onnx.ModelProto, op: str, name: str = "") -> tuple[str, int | None]:
    """The node that bakes a batch size in, and that size: a Reshape/Expand/Tile (``name``, or
    the first of type ``op``) whose constant target shape has a positive first dimension."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if (n.name == name if name else n.op_type == (op or "Reshape")) and len(n.input) > 1 and n.input[1] in inits:
            target = onnx.numpy_helper.to_array(inits[n.input[1]])
            if target.ndim == 1 and target.size and target[0] > 0:
                return (f"{n.op_type} node '{n.name or n.output[0]}' (its target shape {target.tolist()} has the "
                        f"batch size {int(target[0])} baked in)"), int(target[0])
    return f"an unnamed {op or 'unknown'} node", None


def batch_candidates(model: onnx.ModelProto, exc: ModelRunError) -> list[int]:
    """Batch sizes to try after a run failed at ``exc.batch``: 1, and the size baked into the
    failing node's target shape."""
    baked = _batch_fixing_node(model, exc.op, exc.node)[1]
    return [b for b in dict.fromkeys([1, baked]) if b and b != exc.batch]


def skipping_older_objects(fn):
    """Decorator: while ``fn`` runs, the cyclic garbage collector skips every object alive before
    it (``gc.freeze``; ``gc.unfreeze`` after, also on an error). :func:`release_freed_memory`
    runs a full collection about ten times per split, and each walks every object in the
    process: after ``import torch`` (``dsc-export demo`` exports first) that is 0.1-0.5 s each,
    seconds per split. What the split itself creates is still collected; objects freed by their
    reference count are freed as always. A caller that froze the heap itself (a server about to
    fork) is left as it is: then nothing is frozen or unfrozen here.
    """
    import functools
    import gc

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if gc.get_freeze_count():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()

    return run


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, so the process's peak would
    hold the freed model and the verification sessions at once). No-op off glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Reference:
    """Inputs and the whole model's outputs for them, one entry per batch size, and what running
    the whole model taught about its batch dimension."""

    batches: tuple[int, ...]
    feeds: list[dict]
    outputs: list[list[np.ndarray]]
    output_names: list[str]
    fixed_batch: int | None = None
    batch_independent: bool | None = None
    notes: list[str] = field(default_factory=list)
    inputs: str = "random"
    optimization: str = ONE_OFF  # onnxruntime's level for the whole model and the parts


def whole_model_reference(model_file: Path, seed: int, samples, optimization: str = ONE_OFF) -> Reference:
    """Run the whole model at the verification batch sizes (1 and 3; a fixed batch as it is).

    Finds the batch sizes the model runs at: when it fails above batch 1 and runs at 1, it is a
    batch-1 model (``fixed_batch``). Checks that each sample of the batch-3 run equals that
    sample run alone (``batch_independent``; False for BatchNorm with batch statistics).

    Raises:
        UserError: the model does not run at all (names the node and what to try).
    """

    whole = make_session(model_file, optimization=optimization, arena=False)
    names = [o.name for o in whole.get_outputs()]
    dim0 = whole.get_inputs()[0].shape[0]
    declared = dim0 if isinstance(dim0, int) and dim0 > 0 else None

    def run(f: dict, b: int) -> list[np.ndarray]:
        try:
            return whole.run(None, f)
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelRunError("the whole model", b, exc) from exc

    ref = Reference((), [], [], names, inputs=samples.description, optimization=optimization)
    if optimization != ONE_OFF:
        ref.notes.append("the model is quantized (QuantizeLinear / DequantizeLinear nodes): its splits are "
                         f"verified with onnxruntime's '{optimization}' optimisation level, where "
                         "QuantizeLinear / DequantizeLinear run as written (at higher levels onnxruntime fuses "
                         "them into integer kernels that round otherwise, the whole model as much as its "
                         "parts, and no fusion spans a cut)")
    big = declared or max(VERIFY_BATCHES)
    f = samples.feeds(big)
    try:
        out = run(f, big)
    except ModelRunError as exc:
        if declared:
            raise cannot_run(exc) from exc
        structure = load_model(model_file, load_data=False)
        for b in batch_candidates(structure, exc):
            one = samples.feeds(b)
            try:
                out = run(one, b)
            except ModelRunError:
                continue
            ref.fixed_batch = b
            ref.notes.append(fixed_batch_note(structure, exc, b))
            ref.batches, ref.feeds, ref.outputs = (b,), [one], [out]
            return ref
        raise cannot_run(exc, "it fails at batch 1 too (and at any batch size baked into that node)") from exc
    tol = tolerance(*(o.dtype for o in out), engine=True)  # other batch sizes, other kernels
    if declared:
        ref.batches, ref.feeds, ref.outputs, ref.fixed_batch = (declared,), [f], [out], declared
        if declared == 1:
            return ref
        # the same first sample among other batch-mates (fresh ones: a permutation would keep batch statistics)
        other = samples.feeds(declared, 1)
        mates = {k: np.concatenate([v[:1], other[k][1:]]) for k, v in f.items()}
        pairs = [(0, [_sample(o, 0, declared) for o in out], [_sample(o, 0, declared) for o in run(mates, declared)])]
        check_what = "with other batch-mates"
    else:
        # every sample alone (the first doubles as the batch-1 verification input)
        alone = [{k: v[i:i + 1] for k, v in f.items()} for i in range(big)]
        alone_out = [run(a, 1) for a in alone]
        pairs = [(i, [_sample(o, i, big) for o in out], a) for i, a in enumerate(alone_out)]
        check_what = "run alone"
        ref.batches, ref.feeds, ref.outputs = (1, big), [alone[0], f], [alone_out[0], out]
    worst = None
    for i, together, apart in pairs:
        # outputs without a batch axis, or whose size depends on the data, say nothing about this
        same = [(t, a) for t, a in zip(together, apart) if t is not None and t.shape == a.shape]
        c = compare([t for t, _ in same], [a for _, a in same], what=f"sample {i} {check_what}")
        if not c.ok(tol) and (worst is None or c.max_rel > worst[1].max_rel):
            worst = (i, c)
    ref.batch_independent = worst is None
    if worst is not None:
        ref.notes.append(
            f"the model's result for a sample depends on the other samples of its batch (sample {worst[0]} "
            f"{check_what}: {worst[1].describe(tol)}; BatchNorm with batch statistics?): splits are exact at "
            "equal batches, but no server merges requests of different devices into one batch "
            "(dynamic batching off)")
    return ref


def _sample(out: np.ndarray, i: int, batch: int) -> np.ndarray | None:
    """Sample ``i`` of an output batched on its first axis of size ``batch`` (kept, size 1);
    None when no axis has that size (a constant output)."""
    axis = next((k for k, d in enumerate(out.shape) if d == batch), None)
    if axis is None:
        return None
    return np.take(out, [i], axis=axis)


def _run_part(session, feeds: dict, what: str, batch: int, all_outputs: bool = False):
    """Run a head or tail session; an onnxruntime failure is a VerificationError naming the node."""
    try:
        out = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise VerificationError(f"{ModelRunError(what, batch, exc)}; nothing was written (please report this "
                                "model: the whole model ran on the same inputs)") from exc
    return out if all_outputs else out[0]


def cannot_run(exc: ModelRunError, finding: str = "") -> UserError:
    """The one-line refusal of a model that onnxruntime cannot run on the sample inputs."""
    also = f"; {finding}" if finding else ""
    return UserError(f"{exc}{also}; check that the model runs with onnxruntime, or give real inputs with "
                     "--inputs FILE.npz|DIR")


def verify_splits(root: Path, splits: list[Split], ref: Reference, seed: int,
                  log: Callable[[str], None], parts: SampleParts | None = None,
                  fixed: int | None = None) -> dict:
    """tail(head(x)) against the whole model for every split, at the reference's batch sizes;
    and each split's fidelity on the held-out samples (``Split.fidelity``).

    The tolerance follows the dtypes compared (:func:`dsc_export.compare.tolerance`): the wire
    form, the cut tensor's and the outputs' dtypes; a NaN or inf anywhere is a failure. An int8
    form is lossy: its differences are recorded, never held to a tolerance (a NaN or inf is
    recorded as a problem in its fidelity, never as a difference of 0). Outputs are assembled by
    name: the tail's, and the one the head returns (a cut at a graph output).

    Raises:
        VerificationError: a float32 or float16 split that does not reproduce the model (names
            it and why).
    """

    batches, feeds, refs = ref.batches, ref.feeds, ref.outputs
    out_dtypes = [o.dtype for o in refs[0]]
    cut_splits = [s for s in splits if s.kind == "split"]
    held_feeds, held_ref = [], None
    if parts is not None:
        log(f"running the whole model on {parts.held_out_count} held-out sample(s)")
        whole = make_session(root / "model.onnx", optimization=ref.optimization, arena=False)
        held_feeds = parts.held_out_feeds(fixed)
        held_ref = parts.trim([_run_part(whole, f, "the whole model", len(next(iter(f.values()))),
                                         all_outputs=True)
                               for f in held_feeds])
        del whole
        release_freed_memory()
        for s in splits:  # the whole model on the raw input (an offload codec measures its own)
            if s.kind == "local" or (s.kind == "offload" and s.wire in (None, "raw")):
                s.fidelity = exact(held_ref, ref.output_names).as_dict()
    tols = []
    for k, s in enumerate(cut_splits, 1):
        log(f"[{k}/{len(cut_splits)}] verifying {s.id}: tail(head(x)) against the whole model "
            f"at batch sizes {list(batches)}")
        # one session at a time: the head's outputs are small, its weights need not wait for the tail's
        head = make_session(root / s.head, optimization=ref.optimization, arena=False)
        head_names = [o.name for o in head.get_outputs()]  # the wire tensor first

        def run_head(f, b, head=head, head_names=head_names, s=s):
            return dict(zip(head_names, _run_part(head, f, f"the head of {s.id}", b, all_outputs=True)))

        ran = [run_head(f, b) for f, b in zip(feeds, batches)]
        held_ran = [run_head(f, len(next(iter(f.values())))) for f in held_feeds]
        del head
        release_freed_memory()
        tail = make_session(root / s.tail, optimization=ref.optimization, arena=False)
        tail_names = [o.name for o in tail.get_outputs()]

        def run_tail(kept, b, tail=tail, tail_names=tail_names, s=s):
            got = dict(zip(tail_names, _run_part(tail, {s.wire_tensor: kept[s.wire_tensor]},
                                                 f"the tail of {s.id}", b, all_outputs=True)))
            return [got[n] if n in got else kept[n] for n in ref.output_names]

        result = Comparison()
        for kept, want, b in zip(ran, refs, batches):
            result = result.merge(compare(want, run_tail(kept, b), ref.output_names,
                                          what=f"the tail of {s.id}"))
        tol = tolerance(s.wire, ran[0][s.wire_tensor].dtype, *out_dtypes)
        if held_ref is not None:
            held_got = parts.trim([run_tail(kept, len(kept[s.wire_tensor])) for kept in held_ran])
            s.fidelity = measure(held_ref, held_got, ref.output_names, tolerance=tol).as_dict()
        del tail, ran, held_ran
        release_freed_memory()
        if s.wire == "int8":  # lossy: what it costs is recorded, not refused
            s.max_abs_diff, s.max_rel_diff = ((None, None) if result.problem
                                              else (result.max_abs, result.max_rel))
            continue
        tols.append(tol)
        s.max_abs_diff, s.max_rel_diff = result.max_abs, result.max_rel
        if not result.ok(tol):
            raise VerificationError(
                f"split {s.id} at '{s.tensor}' does not reproduce the model: {result.describe(tol)}; "
                "nothing was written"
            )
    lossless = [s.wire for s in cut_splits if s.wire != "int8"]
    return {"batch_sizes": list(batches),
            "tolerance_rel": max(tols, default=tolerance(*lossless, *out_dtypes)),
            "seed": seed, "inputs": ref.inputs, "batch_independent": ref.batch_independent,
            "optimization": ref.optimization}
