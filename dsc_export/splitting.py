"""The main job: analyse a model's cut points and write a verified split dir.

I/O shell around the pure graph functions: read the ONNX file, fold static shape arithmetic,
find and size the cut points, cut heads and tails, verify them with onnxruntime, and write
``DIR/manifest.json`` (``dsc-export.split/1``) with everything into place atomically.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from dsc_export.artifacts import (
    MANIFEST_NAME,
    Manifest,
    ModelRef,
    Split,
    TensorSig,
    hash_files,
    sha256_file,
    write_json_atomic,
)
from dsc_export.compare import Comparison, compare
from dsc_export.errors import UserError, VerificationError
from dsc_export.graph.cuts import (
    WIRE_DTYPES,
    CutPoint,
    describe_cut_points,
    find_cut_points,
    nearest_cut_points,
    scope_of,
    why_not_cut,
)
from dsc_export.graph.model import SHAPE_OPS, dataflow, load_model, load_model_and_data_files
from dsc_export.graph.shapes import (
    FoldReport,
    batch_dim,
    fold_shape_arithmetic,
    input_signature,
    np_dtype_name,
    tensor_shapes,
)
from dsc_export.graph.surgery import (
    CutSpec,
    extract_head,
    extract_tail,
    save_part,
)

VERIFY_BATCHES = (1, 3)
# verification sessions are used once: skip the layout transform that copies the weights again
ONE_OFF = "extended"
# tail(head(x)) against the whole model, relative to the largest output magnitude
TOLERANCE = {"float32": 1e-5, "float16": 2e-2}

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

    @property
    def natural(self) -> list[CutPoint]:
        return [c for c in self.cut_points if c.natural]

    @property
    def compressive(self) -> list[CutPoint]:
        return [c for c in self.cut_points if c.compressive]

    def summary(self) -> str:
        return (f"{len(self.cut_points)} cut points, {len(self.natural)} natural bottlenecks, "
                f"{len(self.compressive)} compressive")


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
        sigs.append(TensorSig(o.name, dims, np_dtype_name(tt.elem_type) if tt.elem_type else "unknown"))
    return sigs


def _scopes(model: onnx.ModelProto, names: list[str]) -> dict[str, str | None]:
    root = next((p.value for p in model.metadata_props if p.key == "dsc_export.scope_root"), None)
    if root is None and any(p.key == "dsc_export.model" for p in model.metadata_props):
        root = "net"
    producer = {o: n.name for n in model.graph.node for o in n.output}
    return {t: scope_of(producer.get(t, ""), root) for t in names}


def _batch_notes(model: onnx.ModelProto, fold: FoldReport) -> list[str]:
    if not fold.batch_dependent:
        return []
    df = dataflow(model.graph)
    producers = df.producers()
    consumers = df.consumers()
    notes = []
    for t in fold.batch_dependent:
        # walk back to the Shape/Size node(s) this value comes from
        stack, seen, sources = [t], set(), []
        while stack:
            x = stack.pop()
            if x in seen or x not in producers:
                continue
            seen.add(x)
            node = producers[x]
            if node.op_type in SHAPE_OPS:
                sources.extend(node.inputs[:1])
            else:
                stack.extend(node.inputs)
        users = [n.name for n in consumers.get(t, [])]
        for src in dict.fromkeys(sources):
            notes.append(
                f"the batch size is read from '{src}' (Shape) and used by {', '.join(users) or t}: "
                "no tensor between them can be a cut point; re-export with Flatten or a -1 in the "
                "Reshape so that the batch size is not taken from an early tensor"
            )
    return notes


def analyze_model(model: onnx.ModelProto, wire_dtype: str = "float32", source: str = "<memory>",
                  log: Log = _quiet, inplace: bool = False) -> tuple[Analysis, onnx.ModelProto]:
    """Find, size and classify the cut points of ``model``.

    Returns:
        ``(analysis, folded model)``; the folded model is ``model`` with its static shape
        arithmetic replaced by constants, from which heads and tails are cut. With
        ``inplace`` the folding edits ``model`` itself (no second copy of the weights).
    """
    if wire_dtype not in WIRE_DTYPES:
        raise UserError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}")
    t0 = time.perf_counter()
    name, dims, dtype = _check_inputs(model)
    log("folding static shape arithmetic")
    outputs = _output_sigs(model)
    folded, fold = fold_shape_arithmetic(model, inplace=inplace)
    notes = _batch_notes(folded, fold)
    df = dataflow(folded.graph)
    log("finding cut points")
    cuts = find_cut_points(df)
    shapes = tensor_shapes(folded, cuts)
    per_sample = [int(d) for d in dims[1:]]
    in_elements = int(np.prod(per_sample, dtype=np.int64))
    in_bytes = in_elements * np.dtype(dtype).itemsize
    # folding renames only shape-arithmetic tensors, so the cut tensors' producers keep their names
    points = describe_cut_points(cuts, shapes, in_bytes, in_elements, wire_dtype, _scopes(folded, cuts))
    batch = batch_dim(model)
    analysis = Analysis(
        source=source, input=TensorSig(name, [batch, *per_sample], dtype), outputs=outputs,
        input_bytes=in_bytes, input_elements=in_elements, wire_dtype=wire_dtype,
        cut_points=points, fold=fold, notes=notes,
    )
    if not analysis.natural:
        analysis.notes.append(
            "no natural bottleneck: no cut point is smaller than the input on the wire, so the "
            "only candidates are offload (send the input) and local (run everything on the device)"
        )
    analysis.seconds = time.perf_counter() - t0
    return analysis, folded


def analyze_file(path: str | os.PathLike, wire_dtype: str = "float32", log: Log = _quiet) -> Analysis:
    """Load an ONNX file and analyse it (see :func:`analyze_model`)."""
    model = load_model(path)
    return analyze_model(model, wire_dtype, os.fspath(path), log, inplace=True)[0]


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of a tensor name (``/`` and ``:`` and friends become ``_``)."""
    return _SAFE.sub("_", text).strip("._") or "tensor"


def _choose(analysis: Analysis, folded: onnx.ModelProto, at: list[str] | None) -> list[CutPoint]:
    if not at:
        return analysis.compressive
    by_name = {c.tensor: c for c in analysis.cut_points}
    chosen = []
    df = None
    for t in at:
        if t in by_name:
            chosen.append(by_name[t])
            continue
        df = df or dataflow(folded.graph)
        known = {o for n in df.nodes for o in n.outputs} | set(df.inputs)
        if t not in known:
            raise UserError(f"--at '{t}': no tensor of that name in the model")
        before, after = nearest_cut_points(df, t, [c.tensor for c in analysis.cut_points])
        near = ", ".join(f"'{x}'" for x in (before, after) if x) or "none"
        raise UserError(f"--at '{t}' is not a cut point ({why_not_cut(df, t)}); nearest cut points: {near}")
    return sorted({c.index: c for c in chosen}.values(), key=lambda c: c.index)


def _copy_model(src: Path, data_files: list[str], dst_dir: Path) -> Path:
    """Copy the model file (and its external data files) into the split dir as model.onnx."""
    dst = dst_dir / "model.onnx"
    shutil.copy2(src, dst)
    for loc in data_files:
        target = dst_dir / loc
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src.parent / loc, target)
    return dst


def split_model(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    wire_dtype: str = "float32",
    at: list[str] | None = None,
    verify: bool = True,
    seed: int = 0,
    log: Log = _quiet,
) -> Manifest:
    """Cut ``path`` at each compressive bottleneck (or at each tensor of ``at``) and write a split dir.

    Args:
        path: the ONNX model.
        out_dir: the split dir to write; replaced if it is an earlier split dir, refused if it
            is something else. Written to a temporary sibling and moved into place at the end,
            so a failure leaves nothing behind.
        wire_dtype: ``float32`` or ``float16`` (head casts down, tail casts back).
        at: cut point tensors to split at instead of the compressive bottlenecks.
        verify: check tail(head(x)) against the whole model with onnxruntime.
        seed: seed of the random verification inputs.
        log: progress callback.

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    src = Path(path)
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and ((out / MANIFEST_NAME).is_file() or not any(out.iterdir()))):
        raise UserError(f"'{out}' exists and is not a split dir; choose another -o")
    log(f"loading {src}")
    reference = None
    if verify:  # before the weights are in this process: that session's load is the peak
        load_model(src, load_data=False)  # one-line errors before onnxruntime sees the file
        _release_freed_memory()
        log("running the whole model for reference outputs")
        reference = _reference(src, seed)
    model, data_files = load_model_and_data_files(src)
    analysis, folded = analyze_model(model, wire_dtype, os.fspath(src), log, inplace=True)
    del model
    log(analysis.summary())
    chosen = _choose(analysis, folded, at)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as exc:
        raise UserError(f"cannot write to '{out.parent}': {exc.strerror or exc}") from exc
    try:
        (tmp / "heads").mkdir()
        (tmp / "tails").mkdir()
        model_file = _copy_model(src, data_files, tmp)
        splits = [Split("offload", "offload", None, None, "model.onnx", analysis.input_bytes, 0.0, 0.0,
                        analysis.input.name, 1.0)]
        for k, cp in enumerate(chosen, 1):
            sid = f"cut{cp.index:03d}"
            spec = CutSpec(cp.tensor, tuple(cp.shape), cp.dtype, wire_dtype)
            log(f"[{k}/{len(chosen)}] cutting at {cp.tensor} ({cp.scope or 'no scope'}, ratio {cp.ratio:.3f})")
            head_rel, tail_rel = f"heads/{sid}.onnx", f"tails/{sid}.onnx"
            save_part(extract_head(folded, spec), tmp / head_rel)
            save_part(extract_tail(folded, spec), tmp / tail_rel)
            splits.append(Split(sid, "split", cp.tensor, head_rel, tail_rel, cp.bytes, None, None,
                                spec.wire_tensor, cp.ratio))
        splits.append(Split("local", "local", None, "model.onnx", None, 0, 0.0, 0.0, None, 0.0))
        del folded
        _release_freed_memory()  # the weights' protobuf is gone: hand its pages back before onnxruntime loads
        verification = None
        if reference is not None:
            verification = _verify(tmp, splits, wire_dtype, reference, seed, log)
        manifest = Manifest(
            model=ModelRef(
                path="model.onnx", sha256=sha256_file(model_file), input=analysis.input,
                output=analysis.outputs[0], input_bytes=analysis.input_bytes, outputs=analysis.outputs,
                source=os.fspath(src),
            ),
            wire_dtype=wire_dtype, cut_points=analysis.cut_points, splits=splits,
            verification=verification, files=hash_files(tmp),
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


def _release_freed_memory() -> None:
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
class _Reference:
    """Random inputs and the whole model's outputs for them, one entry per batch size."""

    batches: tuple[int, ...]
    feeds: list[dict]
    outputs: list[list[np.ndarray]]


def _reference(model_file: Path, seed: int) -> _Reference:
    from dsc_export.backends.onnxruntime import make_session, random_inputs

    whole = make_session(model_file, optimization=ONE_OFF, arena=False)
    dim0 = whole.get_inputs()[0].shape[0]
    batches = (dim0,) if isinstance(dim0, int) and dim0 > 0 else VERIFY_BATCHES
    rng = np.random.default_rng(seed)
    feeds = [random_inputs(whole, b, rng) for b in batches]
    outputs = [whole.run(None, f) for f in feeds]
    del whole
    _release_freed_memory()
    return _Reference(batches, feeds, outputs)


def _verify(root: Path, splits: list[Split], wire_dtype: str, ref: _Reference, seed: int,
            log: Log) -> dict:
    from dsc_export.backends.onnxruntime import make_session

    tol = TOLERANCE[wire_dtype]
    batches, feeds, refs = ref.batches, ref.feeds, ref.outputs
    cut_splits = [s for s in splits if s.kind == "split"]
    for k, s in enumerate(cut_splits, 1):
        log(f"[{k}/{len(cut_splits)}] verifying {s.id}: tail(head(x)) against the whole model "
            f"at batch sizes {list(batches)}")
        # one session at a time: the head's outputs are small, its weights need not wait for the tail's
        head = make_session(root / s.head, optimization=ONE_OFF, arena=False)
        sent = [head.run(None, f)[0] for f in feeds]
        del head
        _release_freed_memory()
        tail = make_session(root / s.tail, optimization=ONE_OFF, arena=False)
        result = Comparison()
        for h, ref in zip(sent, refs):
            result = result.merge(compare(ref, tail.run(None, {s.wire_tensor: h}), what="the tail"))
        del tail, sent
        _release_freed_memory()
        s.max_abs_diff, s.max_rel_diff = result.max_abs, result.max_rel
        if not result.ok(tol):
            raise VerificationError(
                f"split {s.id} at '{s.tensor}' does not reproduce the model: {result.describe(tol)}; "
                "nothing was written"
            )
    return {"batch_sizes": list(batches), "tolerance_rel": tol, "seed": seed,
            "inputs": "random, full range of the input dtype"}
