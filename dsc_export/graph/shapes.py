"""Exact per-sample sizes of tensors.

:func:`tensor_shapes` asks static inference for the sizes (after
:func:`dsc_export.graph.folding.fold_shape_arithmetic` it knows most of them), then inference
at each probe batch size with the shape arithmetic evaluated there (:mod:`.arithmetic`), and
records the rest from one run per batch size (:mod:`.probe`). No cut point is ever reported
without its true size.
"""

from __future__ import annotations

import onnx

from dsc_export.errors import UserError
from dsc_export.graph import probe
from dsc_export.graph.arithmetic import ShapeView, concrete_shapes
from dsc_export.graph.model import without_data
from dsc_export.graph.signature import batch_dim, fixed_batch, infer_types, probe_batches


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[list, str]]:
    """Shapes (with symbolic dims as strings, unknown as None) and dtypes from static inference."""
    view = ShapeView(infer_types(without_data(model)))
    return {name: view[name] for name in view.types}


def tensor_shapes(model: onnx.ModelProto, names: list[str], *, unbatched: dict[str, list] | None = None,
                  inputs=None, views: list | None = None) -> dict[str, tuple[list[int], str]]:
    """Per-sample shape (batch dimension dropped) and dtype of each named tensor.

    Static inference first; tensors it cannot size are sized by inference at each probe batch
    size with the shape arithmetic evaluated there; what that cannot size, or sizes without
    the batch leading (a model that may not run at that batch size: the run says), is recorded
    from one run per batch size.

    Args:
        model: the (folded) model.
        names: tensors to size.
        unbatched: when given, tensors whose leading dimension is not the batch are left out of
            the result and recorded here (name -> their shapes at the probe batch sizes) instead
            of raising.
        inputs: sample inputs for the runs (see :func:`dsc_export.graph.probe.run_with_outputs`).
        views: shapes per probe batch size already known (``FoldReport.views``): used where
            they size every unknown tensor.

    Raises:
        UserError: a tensor whose leading dimension is not the batch dimension (without
            ``unbatched``).
    """
    static = static_shapes(model)
    fb = fixed_batch(model)
    batch_param = None if fb else batch_dim(model)
    result: dict[str, tuple[list[int], str]] = {}
    unknown = []
    for name in names:
        dims, dtype = static.get(name, (None, None))
        if dims and dtype and all(isinstance(d, int) and d > 0 for d in dims[1:]) and (
            (fb and dims[0] == fb) or (batch_param is not None and dims[0] == batch_param)
        ):
            result[name] = ([int(d) for d in dims[1:]], dtype)
        else:
            unknown.append(name)
    if unknown:
        batches = probe_batches(model)
        # shapes at each probe batch size: from inference with the shape arithmetic evaluated
        # at that size, else from a real run (one per batch size)
        found: dict[str, tuple[list[list[int]], str]] = {}
        concrete = views if views is not None and all(v.known(n) for v in views for n in unknown) \
            else concrete_shapes(model, batches, unknown)
        for name in unknown:
            got = [c.get(name, (None, None)) for c in concrete]
            if all(dims is not None and dtype and all(isinstance(d, int) and d >= 0 for d in dims)
                   for dims, dtype in got):
                dims = [list(d) for d, _ in got]
                if _batch_leads(dims, batches):
                    found[name] = (dims, got[0][1])
        rest = [name for name in unknown if name not in found]
        if rest:
            runs = probe.run_with_outputs(model, rest, batches, inputs=inputs)
            for name in rest:
                arrs = [r[name] for r in runs]
                found[name] = ([list(a.shape) for a in arrs], arrs[0].dtype.name)
        for name in unknown:
            dims, dtype = found[name]
            if not _batch_leads(dims, batches):
                if unbatched is not None:
                    unbatched[name] = dims
                    continue
                raise UserError(
                    f"tensor '{name}' does not have the batch as its leading dimension "
                    f"(shapes {dims} at batch sizes {list(batches)})"
                )
            result[name] = (list(dims[0][1:]), dtype)
    return result

def _batch_leads(dims: list[list[int]], batches: tuple[int, ...]) -> bool:
    """The shapes at each probe batch size lead with that batch size and agree per sample."""
    lead_ok = all(len(d) >= 1 and d[0] == b for d, b in zip(dims, batches))
    return lead_ok and all(d[1:] == dims[0][1:] for d in dims)
