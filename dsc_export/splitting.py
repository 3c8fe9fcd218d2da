"""The main job: analyse a model's cut points and write a verified split dir.

I/O shell around the pure graph functions: read the ONNX file, fold static shape arithmetic,
find and size the cut points, cut heads and tails, verify them with onnxruntime, and write
``DIR/manifest.json`` (:data:`dsc_export.artifacts.SPLIT_SCHEMA`, ``dsc-export.split/3``) with
everything into place atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from dsc_export.artifacts import (
    CUT_FORMS,
    MANIFEST_NAME,
    CutPoint,
    Manifest,
    ModelRef,
    Split,
    TensorSig,
    current_umask,
    hash_files,
    sha256_file,
    write_json_atomic,
)
from dsc_export.calibration import RANDOM_NOTE, calibrate, sample_parts
from dsc_export.compare import fits
from dsc_export.contract import constant_outputs, output_contract
from dsc_export.errors import ModelRunError, UserError
from dsc_export.graph import wire
from dsc_export.graph.batch_axis import batchless_image
from dsc_export.graph.cuts import (
    describe_cut_points,
    find_cut_points,
    mark_compressive,
    nearest_cut_points,
    scope_of,
    why_not_cut,
)
from dsc_export.graph.folding import FoldReport, fold_shape_arithmetic, shape_sources
from dsc_export.graph.model import (
    data_dependent,
    dataflow,
    load_model,
    sort_nodes,
)
from dsc_export.graph.probe import run_with_outputs
from dsc_export.graph.shapes import tensor_shapes
from dsc_export.graph.signature import batch_dim, input_signature, np_dtype_name, probe_batches
from dsc_export.graph.surgery import (
    CutSpec,
    extract_head,
    extract_tail,
    save_part,
)
from dsc_export.inputs import SampleInputs
from dsc_export.offload import input_layout, offload_splits, parse_forms
from dsc_export.split_check import (
    Reference,
    batch_candidates,
    cannot_run,
    fixed_batch_note,
    release_freed_memory,
    skipping_older_objects,
    verification_level,
    verify_splits,
    whole_model_reference,
)
from dsc_export.weight_store import externalize, referenced, save_shared, write_blobs

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class Analysis:
    """What ``analyze`` reports for one model."""

    source: str
    input: TensorSig
    outputs: list[TensorSig]
    input_bytes: int
    input_elements: int
    wire_dtype: str
    cut_points: list[CutPoint]
    fold: FoldReport
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fixed_batch: int | None = None  # the only batch size the model runs at (declared or found)
    unbatched: dict[str, list] = field(default_factory=dict)  # dominators without a leading batch axis
    forms: list[str] = field(default_factory=list)  # every wire form sized (wire_dtype first)

    def compressive_in(self, form: str) -> list[CutPoint]:
        """The compressive bottlenecks on ``form``'s bytes (Eq. 3 per form), in graph order."""
        return [c for c in self.cut_points if c.forms.get(form, {}).get("compressive")]

    @property
    def natural(self) -> list[CutPoint]:
        """The natural bottlenecks (c_l < 1), in graph order."""
        return [c for c in self.cut_points if c.natural]

    @property
    def compressive(self) -> list[CutPoint]:
        """The compressive bottlenecks (:func:`compressive_mask`), in graph order."""
        return [c for c in self.cut_points if c.compressive]

    def summary(self) -> str:
        """One line: how many cut points, natural and compressive bottlenecks."""
        more = "".join(f", {len(self.compressive_in(f))} in {f}" for f in self.forms[1:])
        return (f"{len(self.cut_points)} cut points, {len(self.natural)} natural bottlenecks, "
                f"{len(self.compressive)} compressive"
                + (f" in {self.forms[0]}{more}" if more else ""))


def _check_inputs(model: onnx.ModelProto) -> tuple[str, list, str]:
    sig = input_signature(model)
    if len(sig) != 1:
        names = ", ".join(s[0] for s in sig) or "none"
        raise UserError(
            f"the model has {len(sig)} data inputs ({names}); dsc-export splits models with one "
            "image input (the head runs on the device from it)"
        )
    name, dims, dtype = sig[0]
    if not dims:
        raise UserError(f"input '{name}' has no shape; dsc-export needs a batched tensor input")
    batchless = batchless_image(name, dims)  # never read an image's colour planes as a batch
    if batchless:
        raise UserError(batchless)
    bad = [d for d in dims[1:] if not (isinstance(d, int) and d > 0)]
    if bad:
        raise UserError(
            f"input '{name}' has shape {dims}: only the batch dimension (axis 0) may be dynamic; "
            "fix the others first (python -m onnxruntime.tools.make_dynamic_shape_fixed)"
        )
    return name, dims, dtype


def _output_sigs(model: onnx.ModelProto) -> list[TensorSig]:
    sigs = []
    for o in model.graph.output:
        tt = o.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in tt.shape.dim]
        sigs.append(TensorSig(name=o.name, shape=dims,
                              dtype=np_dtype_name(tt.elem_type) if tt.elem_type else "unknown"))
    return sigs


def _scopes(model: onnx.ModelProto, names: list[str]) -> dict[str, str | None]:
    root = next((p.value for p in model.metadata_props if p.key == "dsc_export.scope_root"), None)
    if root is None and any(p.key == "dsc_export.model" for p in model.metadata_props):
        root = "net"
    producer = {o: n.name for n in model.graph.node for o in n.output}
    return {t: scope_of(producer.get(t, ""), root) for t in names}


def _batch_notes(model: onnx.ModelProto, fold: FoldReport) -> list[str]:
    """Notes on the shape reads that still block cuts: each read, or one summary past three
    (attention blocks read their own shapes dozens of times)."""
    if not fold.batch_dependent:
        return []
    consumers = dataflow(model.graph).consumers()
    producer = {o: n for n in model.graph.node for o in n.output if o}
    reads: dict[str, list[str]] = {}  # read tensor -> the nodes that use what is computed from it
    for t in fold.batch_dependent:
        sources = shape_sources(t, producer)
        users = [n.name for n in consumers.get(t, [])] or [t]
        for src in sources:
            reads.setdefault(src, []).extend(u for u in users if u not in reads.get(src, []))
    why = ("changes with the batch size otherwise than as the batch dimension (e.g. the batch merged into "
           "another axis): no tensor between the read and its use can be a cut point")
    if len(reads) <= 3:
        return [f"the shape of '{src}' is read (Shape) and used by {', '.join(users)}, and it {why}; re-export "
                "with a -1 in that Reshape so that no early tensor's shape is read" for src, users in reads.items()]
    shown = "; ".join(f"'{src}' by {users[0]}" for src, users in list(reads.items())[:2])
    return [f"the shapes of {len(reads)} tensors are read and used later ({shown}; ...), and each {why}; "
            "typical of attention blocks, whose inner tensors are then not cut points"]


def _fix_input_batch(model: onnx.ModelProto, batch: int) -> None:
    """Declare the input's batch dimension fixed at ``batch`` (in place)."""
    model.graph.input[[i.name for i in model.graph.input].index(input_signature(model)[0][0])] \
        .type.tensor_type.shape.dim[0].dim_value = batch


def _graph_notes(model: onnx.ModelProto, sorted_nodes: bool) -> list[str]:
    """What the graph hygiene on load found (notes; nothing here refuses)."""
    notes = []
    if sorted_nodes:
        notes.append("the graph's nodes were not in topological order (as graph editors leave them); "
                     "they were sorted before cutting")
    names = [o.name for o in model.graph.output]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        notes.append(f"output(s) {', '.join(repr(d) for d in dup)} are listed more than once")
    inputs = {i.name for i in model.graph.input}
    for o in dict.fromkeys(names):
        if o in inputs:
            notes.append(f"output '{o}' is the input itself: every split would have to send the input "
                         "too, so only offload and local remain")
    df = dataflow(model.graph)
    values, shapes = data_dependent(df)
    for o in dict.fromkeys(names):
        if o not in values and o not in shapes:
            notes.append(f"output '{o}' is a constant (not computed from the input); every tail returns it")
    return notes


def analyze_model(model: onnx.ModelProto, wire_dtype: str = "float32", *, source: str = "<memory>",
                  log: Log = _quiet, inplace: bool = False, inputs=None,
                  fixed_batch: int | None = None,
                  forms: list[str] | None = None) -> tuple[Analysis, onnx.ModelProto]:
    """Find, size and classify the cut points of ``model``.

    Args:
        model: the model (its weights loaded).
        wire_dtype: ``float32`` or ``float16``; with ``float16`` every cut point's activations on
            the sample inputs are checked against float16's range (``CutPoint.fits_wire``), and
            only those that fit can be compressive.
        source: where the model came from (for the report).
        log: progress callback.
        inplace: edit ``model`` itself (sorting, folding; no second copy of the weights).
        inputs: sample inputs for the runs (:class:`dsc_export.inputs.SampleInputs`, or a
            ``.npz`` / image folder path); None: random within the ranges the graph implies.
        fixed_batch: the only batch size the model runs at, when known (split finds it by running
            the whole model); None: the declared one, or any. When a probe run fails at a batch
            size above 1 and works at 1, the model is analysed at batch 1 (``Analysis.fixed_batch``).
        forms: every wire form to size, Eq. 3 per form (``CutPoint.forms``) [default:
            ``[wire_dtype]``]; ``wire_dtype`` is the first.

    Returns:
        ``(analysis, folded model)``; the folded model is ``model`` with its static shape
        arithmetic replaced by constants and its batch-size reads made explicit, from which
        heads and tails are cut.

    Raises:
        UserError: not a single-input model with only the batch dynamic, or the model does not
            run at any batch size (the message names the node).
    """
    forms = check_forms(forms or [wire_dtype])
    if wire_dtype not in forms:
        raise UserError(f"wire dtype {wire_dtype} is not among the wire forms {', '.join(forms)}")
    forms = [wire_dtype] + [f for f in forms if f != wire_dtype]
    t0 = time.perf_counter()
    name, dims, dtype = _check_inputs(model)
    if not inplace:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    notes = _graph_notes(model, sort_nodes(model))
    inputs = _samples(inputs, model)
    outputs = _output_sigs(model)
    declared = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    fixed = declared or fixed_batch
    if fixed and not declared:
        _fix_input_batch(model, fixed)
    tried: list[int] = []
    fixed_note = None  # found by a failing probe run: the model runs at one batch size only
    while True:
        try:
            log("folding static shape arithmetic")
            folded, fold = fold_shape_arithmetic(model, inplace=True, inputs=inputs)
            df = dataflow(folded.graph)
            log("finding cut points")
            cuts = find_cut_points(df)
            unbatched: dict[str, list] = {}
            shapes = tensor_shapes(folded, cuts, unbatched=unbatched, inputs=inputs, views=fold.views)
            break
        except ModelRunError as exc:
            tried.append(exc.batch)
            todo = [b for b in batch_candidates(model, exc) if b not in tried]
            if declared or fixed_batch or not todo:
                raise cannot_run(exc) from exc
            fixed = todo[0]
            _fix_input_batch(model, fixed)
            fixed_note = fixed_batch_note(model, exc, fixed)
    notes += ([fixed_note] if fixed_note else []) + _batch_notes(folded, fold)
    if unbatched:
        names = ", ".join(f"'{t}' {' / '.join(map(str, v))}" for t, v in list(unbatched.items())[:3])
        more = f" and {len(unbatched) - 3} more" if len(unbatched) > 3 else ""
        notes.append(f"{len(unbatched)} tensor(s) through which every path passes have no leading batch "
                     f"dimension (shapes at batch sizes {' / '.join(map(str, probe_batches(folded)))}: {names}{more}; "
                     "e.g. sequence-first attention, or the batch merged into another axis): they are not cut points")
    cuts = [c for c in cuts if c in shapes]
    per_sample = [int(d) for d in dims[1:]]
    in_elements = int(np.prod(per_sample, dtype=np.int64))
    in_bytes = in_elements * np.dtype(dtype).itemsize
    # folding renames only shape-arithmetic tensors, so the cut tensors' producers keep their names
    points = describe_cut_points(cuts, shapes, input_bytes=in_bytes, input_elements=in_elements,
                                 wire_dtype=wire_dtype, scopes=_scopes(folded, cuts), forms=forms)
    if set(forms) & {"float16", "int8"}:
        notes += _check_wire_range(folded, points, inputs, fixed, wire_dtype)
    batch = fixed or batch_dim(model)
    analysis = Analysis(
        source=source, input=TensorSig(name=name, shape=[batch, *per_sample], dtype=dtype), outputs=outputs,
        input_bytes=in_bytes, input_elements=in_elements, wire_dtype=wire_dtype,
        cut_points=points, fold=fold, notes=notes, fixed_batch=fixed, unbatched=unbatched,
        forms=forms,
    )
    if not analysis.cut_points:
        analysis.notes.append("no cut point: every tensor is bypassed on some path from the input to the "
                              "outputs, so the only candidates are offload (send the input) and local "
                              "(everything on the device)")
    elif not analysis.natural:
        analysis.notes.append(
            "no natural bottleneck: no cut point is smaller than the input on the wire, so the "
            "only candidates are offload (send the input) and local (run everything on the device)"
        )
    analysis.seconds = time.perf_counter() - t0
    return analysis, folded


def _check_wire_range(folded: onnx.ModelProto, points: list[CutPoint], inputs, fixed: int | None,
                      first: str) -> list[str]:
    """float16 and int8 wires: record each cut point's largest |activation| on the sample inputs;
    a point beyond float16's range (or non-finite) does not fit a float16 wire, a non-finite one
    not an int8 wire (no scale maps it); Eq. 3 is re-applied per form to the rest
    (:func:`mark_compressive`)."""

    if not points:
        return []
    batch = fixed or 2
    run = run_with_outputs(folded, [p.tensor for p in points], (batch,), inputs=inputs)[0]
    for p in points:
        if np.dtype(p.dtype).kind != "f":
            continue
        v = run[p.tensor].astype(np.float64)
        finite = bool(np.isfinite(v).all())
        p.max_abs = float(np.nanmax(np.abs(v))) if finite else float("inf")
        if "float16" in p.forms:
            p.forms["float16"]["fits"] = fits("float16", v)
        if "int8" in p.forms:
            p.forms["int8"]["fits"] = finite
    mark_compressive(points, first)
    over = [p for p in points if "float16" in p.forms and not p.forms["float16"]["fits"]]
    if not over:
        return []
    names = ", ".join(f"'{p.tensor}' (max |x| {p.max_abs:.3g})" for p in over[:3])
    more = f" and {len(over) - 3} more" if len(over) > 3 else ""
    return [f"{len(over)} cut point(s) overflow float16 on the sample inputs ({names}{more}): they are "
            "given no float16 form (their float32 and int8 forms are made where asked)"]


def check_forms(forms: list[str]) -> list[str]:
    """The cut wire forms asked for, each once, in ``CUT_FORMS`` order.

    Raises:
        UserError: an unknown form, or none.
    """
    bad = [f for f in forms if f not in CUT_FORMS]
    if bad or not forms:
        raise UserError(f"unknown wire form '{bad[0] if bad else ''}'; known: "
                        f"{', '.join(CUT_FORMS)} "
                        "(e.g. --wire float32,float16,int8)")
    return [f for f in CUT_FORMS if f in forms]


def analyze_file(path: str | os.PathLike, wire_dtype: str = "float32", *, log: Log = _quiet,
                 inputs=None, forms: list[str] | None = None) -> Analysis:
    """Load an ONNX file and analyse it (see :func:`analyze_model`).

    Args:
        inputs: a ``.npz`` file or a folder of images for the runs (see
            :mod:`dsc_export.inputs`), or None for random inputs.
        forms: every wire form to size (Eq. 3 per form) [default: ``[wire_dtype]``].
    """
    forms = check_forms(forms or [wire_dtype])
    model = load_model(path)
    return analyze_model(model, forms[0], source=os.fspath(path), log=log, inplace=True,
                         inputs=inputs,
                         forms=forms)[0]


def _samples(inputs, model: onnx.ModelProto, seed: int = 0):
    """Sample inputs for ``model``: a path made into :class:`dsc_export.inputs.SampleInputs`, an
    object with ``feeds`` as it is, None as random inputs within the ranges the graph implies."""

    if hasattr(inputs, "feeds"):
        return inputs
    if inputs is None:
        return SampleInputs.random(model, seed)
    return SampleInputs.from_path(inputs, model)


def _choose(analysis: Analysis, folded: onnx.ModelProto, at: list[str] | None
            ) -> list[tuple[CutPoint, str]]:
    """The (cut point, wire form) pairs to split at, in graph order then form order: each
    form's compressive bottlenecks (Eq. 3 on its bytes), or every form each ``at`` tensor has.

    Raises:
        UserError: an ``at`` tensor that is not a cut point, or that no asked form carries.
    """
    if not at:
        return [(c, f) for c in analysis.cut_points for f in analysis.forms
                if c.forms[f]["compressive"]]
    by_name = {c.tensor: c for c in analysis.cut_points}
    chosen: dict[tuple[int, str], tuple[CutPoint, str]] = {}
    df = None
    outputs = {o.name for o in analysis.outputs}
    for t in at:
        if t in by_name:
            cp = by_name[t]
            forms = [f for f in analysis.forms if cp.forms[f]["has"] and cp.forms[f]["fits"]]
            if not forms:
                if "float16" in analysis.forms and not cp.forms["float16"]["fits"]:
                    raise UserError(f"--at '{t}': its activations overflow float16 on the sample "
                                    f"inputs (max |x| {cp.max_abs:.3g} > 65504); split there with "
                                    "--wire-dtype float32")
                forms_asked = " or ".join(analysis.forms)
                raise UserError(f"--at '{t}' is {cp.dtype}: it has no {forms_asked} "
                                "wire form (int8 needs a float tensor wider than 1 byte); add "
                                "float32 to --wire")
            for f in forms:
                chosen[(cp.index, f)] = (cp, f)
            continue
        df = df or dataflow(folded.graph)
        if t in outputs and not df.consumers().get(t):  # one that feeds more and dominates is a cut point
            raise UserError(f"--at '{t}' is a graph output: cutting there is the 'local' candidate (everything "
                            "on the device), which every split dir has already")
        if t == analysis.input.name:
            raise UserError(f"--at '{t}' is the graph input: cutting there is the 'offload' candidate (send the "
                            "input), which every split dir has already")
        if t in analysis.unbatched:
            raise UserError(f"--at '{t}' has no leading batch dimension (shapes {analysis.unbatched[t]} at batch "
                            "sizes 1 and 2), so it cannot travel as a batch of samples; choose another cut point")
        df = df or dataflow(folded.graph)
        known = {o for n in df.nodes for o in n.outputs} | set(df.inputs)
        if t not in known:
            raise UserError(f"--at '{t}': no tensor of that name in the model")
        before, after = nearest_cut_points(df, t, [c.tensor for c in analysis.cut_points])
        near = ", ".join(f"'{x}'" for x in (before, after) if x) or "none"
        raise UserError(f"--at '{t}' is not a cut point ({why_not_cut(df, t)}); nearest cut points: {near}")
    return [chosen[k] for k in sorted(chosen, key=lambda k: (k[0], CUT_FORMS.index(k[1])))]


def split_id(cp: CutPoint, form: str) -> str:
    """The split id of a cut point in a wire form: ``cutNNN`` for float32 (and a tensor that
    travels as it is), ``cutNNN-float16``, ``cutNNN-int8``."""
    base = f"cut{cp.index:03d}"
    return base if form == "float32" else f"{base}-{form}"


def _copy_model(src: Path, dst_dir: Path) -> tuple[Path, list[str]]:
    """Write the model into the split dir as model.onnx, its weights in the dir's shared store
    (:mod:`dsc_export.weight_store`): the heads and tails read the same blobs. Returns the file and
    the blobs it reads."""
    dst = dst_dir / "model.onnx"
    return dst, save_shared(load_model(src), dst)


@skipping_older_objects
def split_model(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    wire_dtype: str = "float32",
    at: list[str] | None = None,
    verify: bool = True,
    seed: int = 0,
    log: Log = _quiet,
    inputs=None,
    wires: list[str] | None = None,
    per_channel: bool = False,
    symmetric: bool = False,
    offload: list[str] | None = None,
) -> Manifest:
    """Cut ``path`` at each compressive bottleneck (or at each tensor of ``at``) and write a split dir.

    Args:
        path: the ONNX model.
        out_dir: the split dir to write; replaced if it is an earlier split dir, refused if it
            is something else. Written to a temporary sibling and moved into place at the end,
            so a failure leaves nothing behind.
        wire_dtype: the wire form when ``wires`` is not given: ``float32``, ``float16`` (head
            casts down, tail casts back) or ``int8`` (QuantizeLinear / DequantizeLinear).
        at: cut point tensors to split at instead of the compressive bottlenecks (every form
            each has).
        wires: the wire forms to make (:data:`CUT_FORMS`), each at its own compressive
            bottlenecks (Eq. 3 on that form's bytes); split ids ``cutNNN`` (float32),
            ``cutNNN-float16``, ``cutNNN-int8``. Every split gets ``fidelity`` on the held-out
            sample inputs (:mod:`dsc_export.calibration`); int8 is lossy, so its error is recorded
            rather than verified against a tolerance.
        per_channel: int8 with one scale per channel (axis 1) where that beats per-tensor on the
            held-out samples.
        symmetric: int8 with zero point 0 (TensorRT's QuantizeLinear takes no other).
        verify: check tail(head(x)) against the whole model with onnxruntime.
        seed: seed of the random verification inputs.
        log: progress callback.
        inputs: a ``.npz`` file or a folder of images for sizing and verification (see
            :mod:`dsc_export.inputs`); None: random inputs within the ranges the graph implies.
        offload: the offload forms to make (``raw``, ``png``, ``webp``, ``jpegNN``:
            :mod:`dsc_export.offload`); ``raw`` (split id ``offload``) always.

    Returns:
        The manifest written to ``out_dir/manifest.json``.

    Raises:
        UserError: the model cannot be split (one line saying why); VerificationError: a split
            does not reproduce the model (nothing is written).
    """
    src = Path(path)
    out = Path(out_dir)
    forms = check_forms(list(wires) if wires else [wire_dtype])
    offload_forms = parse_forms(offload)
    if out.exists() and not (out.is_dir() and ((out / MANIFEST_NAME).is_file() or not any(out.iterdir()))):
        raise UserError(f"'{out}' exists and is not a split dir; choose another -o")
    log(f"loading {src}")
    reference = None
    structure = load_model(src, load_data=False)  # one-line errors before onnxruntime sees the file
    in_name, in_dims, in_dtype = _check_inputs(structure)
    input_layout(TensorSig(name=in_name, shape=in_dims, dtype=in_dtype), offload_forms)
    samples = _samples(inputs, structure, seed)
    optimization = verification_level(structure)
    parts = sample_parts(samples)
    if "int8" in forms:
        opset = next((o.version for o in structure.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < wire.min_opset("int8", None):
            raise UserError(f"the int8 wire form needs opset 10 or later (QuantizeLinear); the "
                            f"model is at opset {opset}: convert it (onnx.version_converter) or "
                            "leave int8 out of --wire")
    del structure
    release_freed_memory()
    if verify:  # before the weights are in this process: that session's load is the peak
        log("running the whole model for reference outputs")
        reference = whole_model_reference(src, seed, samples, optimization)
        release_freed_memory()  # the whole model's session is gone: hand its pages back
    model = load_model(src)
    if reference:
        _complete_output_shapes(model, reference)
    analysis, folded = analyze_model(model, forms[0], source=os.fspath(src), log=log, inplace=True,
                                     inputs=samples, forms=forms,
                                     fixed_batch=reference.fixed_batch if reference else None)
    del model
    notes = (reference.notes if reference else []) + analysis.notes
    log(analysis.summary())
    chosen = _choose(analysis, folded, at)
    int8_points = list({cp.tensor: cp for cp, f in chosen if f == "int8"}.values())
    if int8_points:
        log(f"calibrating int8 at {len(int8_points)} cut point(s) on {parts.calibration_count} "
            "sample(s)")
    quant, quant_notes = calibrate(folded, int8_points, parts, analysis.fixed_batch,
                                   per_channel=per_channel,
                                   symmetric=symmetric)
    notes += quant_notes
    if int8_points and parts.record["random"]:
        notes.append(RANDOM_NOTE.format(forms="int8"))
    if int8_points:
        notes += parts.notes
    outputs = analysis.outputs
    if reference:  # the shapes the runs showed; without them (--no-verify) build and serve check later
        outputs = _observed_outputs(analysis, reference)
        _check_output_contract(analysis, outputs, folded)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's are owner-only; the split dir is an ordinary folder
    except OSError as exc:
        raise UserError(f"cannot write to '{out.parent}': {exc.strerror or exc}") from exc
    try:
        write_blobs(tmp, externalize(folded))  # the weights once; the parts refer to them
        release_freed_memory()
        model_file, model_blobs = _copy_model(src, tmp)
        data = {"model.onnx": model_blobs}
        splits, offload_notes = offload_splits(model_file, analysis.input, analysis.input_bytes, samples,
                                               offload_forms, parts=parts, fixed=analysis.fixed_batch, log=log)
        notes += offload_notes
        for k, (cp, form) in enumerate(chosen, 1):
            sid = split_id(cp, form)
            q = quant.get(cp.tensor) if form == "int8" else None
            spec = CutSpec(cp.tensor, tuple(cp.shape), cp.dtype, form,
                           wire.Quant.from_dict(q) if q else None)
            size = cp.forms[form]
            log(f"[{k}/{len(chosen)}] cutting at {cp.tensor} ({cp.scope or 'no scope'}, {form}, "
                f"ratio {size['ratio']:.3f})")
            head_rel, tail_rel = f"head-{sid}.onnx", f"tail-{sid}.onnx"
            for rel, part in ((head_rel, extract_head(folded, spec)), (tail_rel, extract_tail(folded, spec))):
                save_part(part, tmp / rel)
                data[rel] = referenced(part.to_model())
            splits.append(Split(id=sid, kind="split", tensor=cp.tensor, head=head_rel, tail=tail_rel,
                                bytes=size["bytes"], max_abs_diff=None, max_rel_diff=None,
                                wire_tensor=spec.wire_tensor, ratio=size["ratio"], wire=form,
                                cut=split_id(cp, "float32"), quant=q))
        splits.append(Split(id="local", kind="local", tensor=None, head="model.onnx", tail=None, bytes=0,
                            max_abs_diff=0.0, max_rel_diff=0.0, wire_tensor=None, ratio=0.0))
        del folded
        release_freed_memory()  # the weights' protobuf is gone: hand its pages back before onnxruntime loads
        verification = None
        if reference is not None:
            verification = verify_splits(tmp, splits, reference, seed, log, parts,
                                         analysis.fixed_batch)
        manifest = Manifest(
            model=ModelRef(
                path="model.onnx", sha256=sha256_file(model_file), input=analysis.input,
                output=outputs[0], input_bytes=analysis.input_bytes, outputs=outputs,
                source=os.fspath(src), fixed_batch=analysis.fixed_batch,
                batch_independent=reference.batch_independent if reference else None,
            ),
            wire_dtype=forms[0], cut_points=analysis.cut_points, splits=splits,
            verification=verification, files=hash_files(tmp), notes=notes, data=data,
            samples=parts.record, wires=forms,
        )
        write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _complete_output_shapes(model: onnx.ModelProto, ref: Reference) -> None:
    """Give graph outputs declared without a shape one of the rank the runs showed, every size
    unknown (onnxruntime runs such graphs; onnx.checker, and so every written part, would not)."""
    for k, o in enumerate(model.graph.output):
        tt = o.type.tensor_type
        if o.type.HasField("tensor_type") and not tt.HasField("shape") and k < len(ref.outputs[0]):
            tt.shape.SetInParent()
            for _ in range(ref.outputs[0][k].ndim):
                tt.shape.dim.add()


def _observed_outputs(analysis: Analysis, ref: Reference) -> list[TensorSig]:
    """The outputs' shapes with the batch axis the reference runs show: an axis whose size is the
    batch size at every verification batch size gets the input's batch dimension (whatever the
    graph declares, often nothing); a declared size stays; a declared symbolic size is -1 (it may
    depend on the data, so it is never fixed from what the runs happened to give); an undeclared
    size the runs agree on is that size. With one batch size (a fixed batch), a symbolic size
    equal to that batch is the batch."""
    batch = analysis.input.shape[0]
    sigs = []
    for k, sig in enumerate(analysis.outputs):
        shapes = [tuple(out[k].shape) for out in ref.outputs]
        if len({len(sh) for sh in shapes}) != 1:
            sigs.append(sig)
            continue
        rank = len(shapes[0])
        declared = list(sig.shape) if len(sig.shape) == rank else [-1] * rank
        dims = []
        for j, d in enumerate(declared):
            col = [sh[j] for sh in shapes]
            follows = col == list(ref.batches) if len(ref.batches) > 1 else (isinstance(d, str) and col[0] == batch)
            if follows:
                dims.append(batch)
            elif isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) or len(set(col)) > 1:
                dims.append(-1)  # declared variable, or seen to vary
            else:
                dims.append(col[0])  # declared unknown, the same size in every run

        dtype = sig.dtype if sig.dtype != "unknown" else ref.outputs[0][k].dtype.name  # undeclared: as it ran
        sigs.append(TensorSig(name=sig.name, shape=dims, dtype=dtype))
    return sigs


def _check_output_contract(analysis: Analysis, outputs: list[TensorSig], folded: onnx.ModelProto) -> None:
    """Refuse, before anything is written, a model whose outputs no server can answer
    (:func:`dsc_export.contract.output_contract`): the same rule build, serve and bundle
    apply later."""

    probe = Manifest(model=ModelRef(path="model.onnx", sha256="", input=analysis.input, output=outputs[0],
                                    input_bytes=analysis.input_bytes, outputs=outputs,
                                    fixed_batch=analysis.fixed_batch),
                     wire_dtype=analysis.wire_dtype, cut_points=[], splits=[])
    problems = [c.problem for c in output_contract(probe, constant_outputs(folded)) if c.problem]
    if problems:
        raise UserError(f"{problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
                        "nothing was written")
