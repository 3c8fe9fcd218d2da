"""Sample inputs for sizing and verification: a user's own samples, or random ones within the
ranges the graph implies.

Random inputs are the default. An input whose values the graph reads as *indices* — token ids
into an embedding table (``Gather``), positions into ``GatherElements`` / ``GatherND``, classes
into ``OneHot`` — must stay within its table, or onnxruntime fails with an index error;
:func:`input_ranges` finds those ranges from the graph structure alone, and
:meth:`SampleInputs.random` draws within them. Every other input keeps the distribution of
:func:`dsc_export.backends.onnxruntime.random_array` (integers over their type's range clipped
to -128..255, floats N(0, 1)).

``--inputs FILE.npz|DIR`` gives real samples instead (:meth:`SampleInputs.from_path`): a ``.npz``
of arrays by input name, or a folder of images resized to the model's image input.

Only the graph's structure and the dims of its initializers are read, never their values (one
exception: a scalar ``OneHot`` depth), so a model with hundreds of MB of weights costs nothing
extra here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from dsc_export.errors import UserError, first_line, lazy_import
from dsc_export.images import IMAGE_SUFFIXES, read_image
from dsc_export.ort import random_array
from dsc_export.zoo import IMAGENET_MEAN, IMAGENET_STD

# Ops whose output holds the values of their first input (rearranged or a subset): an index read
# through them is still an index into the same table.
PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity",
                "Transpose", "Slice", "Expand", "Tile", "Split", "Concat"}
# op -> (position of the index input, position of the table input)
INDEXING = {"Gather": (1, 0), "GatherElements": (1, 0), "GatherND": (1, 0)}
_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.bool_, np.int8, np.int16,
                                 np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)}


@dataclass(frozen=True)
class InputSpec:
    """One data input: name, numpy dtype (None: not a numeric tensor; ``type_name`` says what),
    per-sample shape (None at a symbolic non-batch axis) and the fixed batch size (None when
    axis 0 is dynamic)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...]
    batch: int | None
    symbolic: tuple[tuple[int, str], ...] = ()  # (axis, name) of symbolic non-batch dims
    type_name: str = ""

    def static_shape(self) -> tuple[int, ...]:
        """The per-sample shape.

        Raises:
            UserError: (one line) the input is not a numeric tensor, or has a symbolic
                non-batch dimension.
        """
        if self.dtype is None:
            raise UserError(f"input '{self.name}' has unsupported type {self.type_name}; dsc-export feeds numeric "
                            "tensors only")
        if self.symbolic:
            axis, dim = self.symbolic[0]
            raise UserError(f"input '{self.name}' has a symbolic dimension '{dim}' at axis {axis}; "
                            "only the batch dimension (axis 0) may be dynamic")
        return tuple(int(d) for d in self.shape)


def data_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's data inputs (graph inputs that are not initializers), in graph order.

    Problems (a non-numeric type, a symbolic non-batch dimension) are recorded, not raised:
    :meth:`InputSpec.static_shape` raises them when an array is needed.
    """
    inits = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype, type_name = None, "non-tensor"
        if vi.type.HasField("tensor_type"):
            type_name = onnx.TensorProto.DataType.Name(tt.elem_type)
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            except Exception:
                dtype = None
            dtype = dtype if dtype in _DTYPES else None
        dims = list(tt.shape.dim) if tt.HasField("shape") else []
        batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
        shape, symbolic = [], []
        for axis, d in enumerate(dims[1:], 1):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                shape.append(None)
                symbolic.append((axis, d.dim_param or "?"))
        specs.append(InputSpec(vi.name, dtype, tuple(shape), batch, tuple(symbolic), type_name))
    return specs


def input_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Valid ``[lo, hi]`` (inclusive) of each integer data input where the graph says.

    An integer input read as the indices of ``Gather`` / ``GatherElements`` / ``GatherND``
    (directly or through ``Cast``, ``Reshape``, ``Unsqueeze``, ``Squeeze``, ``Flatten``,
    ``Identity``, ``Transpose``, ``Slice``, ``Expand``, ``Tile``, ``Split``, ``Concat``, which
    only move values) gets ``[0, table dim - 1]``; one read by ``OneHot`` gets ``[0, depth - 1]``.
    Several reads intersect. Inputs absent from the result have no known range. The table dim
    comes from an initializer's or ``Constant``'s dims, a graph input or a ``value_info`` shape;
    only structure is read, never weights.

    Args:
        model: the model (not modified, not copied).

    Returns:
        ``{input name: (lo, hi)}``.
    """
    graph = model.graph
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, k))
    shapes = _known_shapes(graph)
    scalars = {t.name: t for t in graph.initializer}
    scalars.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" and n.output
                    for a in n.attribute if a.name == "value"})
    ranges: dict[str, tuple[float, float]] = {}
    for spec in data_inputs(model):
        if spec.dtype is None or spec.dtype.kind not in "iu":
            continue
        bounds = []
        seen, todo = {spec.name}, [spec.name]
        while todo:
            tensor = todo.pop()
            for node, k in consumers.get(tensor, []):
                if node.op_type in PASS_THROUGH and (k == 0 or node.op_type == "Concat"):
                    for out in node.output:
                        if out and out not in seen:
                            seen.add(out)
                            todo.append(out)
                elif node.op_type in INDEXING and k == INDEXING[node.op_type][1]:  # the table's own values
                    if node.output[0] not in seen:
                        seen.add(node.output[0])
                        todo.append(node.output[0])
                elif node.op_type in INDEXING and k == INDEXING[node.op_type][0]:
                    size = _table_size(node, shapes.get(node.input[0]), shapes.get(tensor))
                    if size:
                        bounds.append(size - 1)
                elif node.op_type == "OneHot" and k == 0 and len(node.input) > 1:
                    depth = _scalar(scalars.get(node.input[1]))
                    if depth:
                        bounds.append(depth - 1)
        if bounds and min(bounds) >= 0:
            ranges[spec.name] = (0, min(bounds))
    return ranges


def _known_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | None, ...]]:
    """Shapes the graph states without inference: initializers, Constants, inputs, value_info."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                    for d in tt.shape.dim)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
    for t in graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _table_size(node: onnx.NodeProto, table: tuple | None, indices: tuple | None) -> int | None:
    """The smallest axis length the indices of a Gather-family node index into, if known."""
    if not table:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "GatherND":
        b = int(attrs.get("batch_dims", 0))
        k = indices[-1] if indices else None
        axes = table[b:b + k] if k else table[b:]
        if not axes or any(d is None for d in axes):
            return None
        return min(axes)
    axis = int(attrs.get("axis", 0))
    if not -len(table) <= axis < len(table):
        return None
    return table[axis]


def _scalar(t: onnx.TensorProto | None) -> int | None:
    """The value of a one-element integer tensor stored in the graph (never external data)."""
    if t is None or int(np.prod(t.dims, dtype=np.int64)) != 1 or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    try:
        return int(onnx.numpy_helper.to_array(t).reshape(-1)[0])
    except Exception:
        return None


def _random_array(shape, dtype: np.dtype, rng: np.random.Generator, rng_range=None) -> np.ndarray:
    if rng_range is None:
        return random_array(shape, dtype, rng)
    info = np.iinfo(dtype)
    lo, hi = max(int(rng_range[0]), info.min), min(int(rng_range[1]), info.max)
    return rng.integers(lo, hi + 1, size=shape, dtype=dtype)


@dataclass
class SampleInputs:
    """Inputs for sizing and verification: a user's samples, or random ones within ranges.

    Build one with :meth:`random` or :meth:`from_path`; :meth:`feeds` gives batches.
    ``description`` says what they are, for logs and the manifest's verification record.
    """

    description: str
    specs: list[InputSpec]
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: dict[str, np.ndarray] | None = None  # name -> [K, *per-sample shape]; None: random
    seed: int = 0
    names: list[str] | None = None  # one per sample: image file names, or "#k" for a .npz

    def subset(self, indices: list[int], what: str) -> SampleInputs:
        """The user's samples ``indices`` (in that order) as sample inputs of their own; random
        inputs get another seed per ``what`` (fresh draws, never the same as another part's).

        Args:
            indices: sample indices (user samples only).
            what: the part's name for the description (``calibration``, ``held out``).
        """
        if self.samples is None:
            seed = self.seed + 1 + sum(map(ord, what))
            return SampleInputs(f"{self.description}, {what} draws (seed {seed})", self.specs,
                                self.ranges,
                                None, seed)
        names = [self.sample_names[i] for i in indices]
        return SampleInputs(f"{len(indices)} {what} sample(s) of {self.description}", self.specs,
                            {},
                            {k: v[indices] for k, v in self.samples.items()}, self.seed, names)

    @property
    def sample_names(self) -> list[str]:
        """One name per user sample (file names for a folder, ``#k`` for a .npz); [] for random."""
        if self.samples is None:
            return []
        return self.names or [f"#{k}" for k in range(self.count)]

    @classmethod
    def random(cls, model: onnx.ModelProto, seed: int = 0) -> SampleInputs:
        """Random inputs: within :func:`input_ranges` where the graph says, else as
        :func:`dsc_export.backends.onnxruntime.random_array` (symbolic non-batch dims are
        refused when a batch is drawn)."""
        specs = data_inputs(model)
        ranges = input_ranges(model)
        where = (", within the ranges the graph implies ("
                 + ", ".join(f"{n} in [{lo:g}, {hi:g}]" for n, (lo, hi) in ranges.items()) + ")") if ranges else ""
        return cls(f"random (seed {seed}){where}", specs, ranges, None, seed)

    @classmethod
    def from_path(cls, path: str | os.PathLike, model: onnx.ModelProto) -> SampleInputs:
        """The user's samples, checked against the model's inputs.

        Args:
            path: a ``.npz`` file — arrays by input name, each ``[K, *per-sample shape]`` (K
                samples) or the per-sample shape (one sample), of the input's dtype (or one
                that converts to it without loss); or a folder of images (``.jpg .jpeg .png
                .bmp``) for a model with one image input ``[N, H, W, 3]`` or ``[N, 3, H, W]``:
                each image is converted to RGB and resized (bilinear, stretched, no crop) to
                H x W; a uint8 input gets the pixels as they are, a float input gets them scaled
                to [0, 1] then normalised with the ImageNet mean (0.485, 0.456, 0.406) and std
                (0.229, 0.224, 0.225).
            model: the model the samples are for (only its structure is read).

        Raises:
            UserError: (one line) a missing or unreadable file, a name that is not an input, an
                input without an array, a wrong per-sample shape or dtype (says which), index
                values outside the table they index, an empty folder, a model without one image
                input for a folder, a batch-fixed model given fewer samples than its batch.
        """
        path = Path(path)
        specs = data_inputs(model)
        if not specs:
            raise UserError(f"--inputs '{path}': the model has no data inputs to feed")
        if not path.exists():
            raise UserError(f"--inputs '{path}' does not exist (give a .npz of arrays by input name or a folder "
                            "of images)")
        names = None
        if path.is_dir():
            samples, what, names = _load_images(path, specs)
        elif path.suffix.lower() == ".npz":
            samples, what = _load_npz(path, specs)
        else:
            raise UserError(f"--inputs '{path}' is neither a .npz file nor a folder of images")
        k = len(next(iter(samples.values())))
        _check_ranges(path, samples, input_ranges(model))
        for s in specs:
            if s.batch and k < s.batch:
                raise UserError(f"the model runs at batch {s.batch} only ('{s.name}') but '{path}' has {k} "
                                f"sample(s); give at least {s.batch}")
        return cls(f"{k} sample{'s' if k != 1 else ''} from {path}{what}", specs, {}, samples,
                   names=names)

    @property
    def count(self) -> int | None:
        """How many samples the user gave (None: random)."""
        return None if self.samples is None else len(next(iter(self.samples.values())))

    def feeds(self, batch: int, index: int = 0) -> dict[str, np.ndarray]:
        """A batch of ``batch`` samples for every data input.

        Args:
            batch: samples per batch (axis 0 of every array).
            index: which batch: the user's samples are taken in order and cycled
                (batch ``index`` holds samples ``index*batch .. index*batch+batch-1`` modulo K);
                random ones are a fresh draw per ``(seed, batch, index)``, the same on every call.

        Returns:
            ``{input name: array [batch, *per-sample shape]}`` of each input's dtype.

        Raises:
            UserError: random inputs for an input with a symbolic non-batch dimension.
        """
        if self.samples is not None:
            k = self.count
            take = (np.arange(batch) + index * batch) % k
            return {name: arr[take] for name, arr in self.samples.items()}
        rng = np.random.default_rng((self.seed, batch, index))
        return {s.name: _random_array((batch, *s.static_shape()), s.dtype, rng, self.ranges.get(s.name))
                for s in self.specs}


def _load_npz(path: Path, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], str]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as exc:
        raise UserError(f"--inputs '{path}' is not a readable .npz file: {type(exc).__name__}: "
                        f"{first_line(exc)}") from exc
    by_name = {s.name: s for s in specs}
    names = ", ".join(f"'{s.name}'" for s in specs)
    for name in arrays:
        if name not in by_name:
            raise UserError(f"--inputs '{path}' has an array '{name}' but the model has no such input "
                            f"(its inputs: {names}); save the arrays by input name, e.g. "
                            f"np.savez(file, **{{{specs[0].name!r}: array}})")
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise UserError(f"--inputs '{path}' has no array for input '{missing[0]}' (its inputs: {names}); "
                        "give one array per input")
    samples = {}
    for s in specs:
        arr = arrays[s.name]
        per = s.static_shape()
        if arr.shape == per:
            arr = arr[None]
        elif arr.ndim != len(per) + 1 or arr.shape[1:] != per or arr.shape[0] < 1:
            dims = ", ".join(map(str, per))
            raise UserError(f"input '{s.name}' in '{path}' has shape {list(arr.shape)}; "
                            f"expected [K{', ' if per else ''}{dims}] (K >= 1 samples) or [{dims}] (one sample)")
        if arr.dtype != s.dtype:
            if not np.can_cast(arr.dtype, s.dtype, "safe"):
                raise UserError(f"input '{s.name}' in '{path}' has dtype {arr.dtype}; the model takes {s.dtype} "
                                f"(save it with .astype('{s.dtype}'))")
            arr = arr.astype(s.dtype)
        samples[s.name] = np.ascontiguousarray(arr)
    counts = {name: len(a) for name, a in samples.items()}
    if len(set(counts.values())) > 1:
        raise UserError(f"the arrays in '{path}' have different numbers of samples "
                        f"({', '.join(f'{n}: {c}' for n, c in counts.items())}); give the same K for every input")
    return samples, ""


def _load_images(folder: Path, specs: list[InputSpec]
                 ) -> tuple[dict[str, np.ndarray], str, list[str]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--inputs '{folder}' has no images ({' '.join(IMAGE_SUFFIXES)})")
    if len(specs) != 1:
        raise UserError(f"--inputs '{folder}': a folder of images needs a model with one image input, this one has "
                        f"{len(specs)}; give a .npz of arrays by input name")
    s = specs[0]
    per = s.static_shape()
    layout = ("NHWC" if len(per) == 3 and per[2] == 3 else
              "NCHW" if len(per) == 3 and per[0] == 3 else None)
    if layout is None or s.dtype.kind not in "uf" or (s.dtype.kind == "u" and s.dtype != np.uint8):
        raise UserError(f"--inputs '{folder}': input '{s.name}' is {s.dtype} [N, {', '.join(map(str, per))}], not "
                        "an image ([N, H, W, 3] or [N, 3, H, W], uint8 or float); give a .npz instead")
    h, w = (per[0], per[1]) if layout == "NHWC" else (per[1], per[2])

    Image = lazy_import("PIL.Image", "export")
    images = [np.asarray(Image.fromarray(read_image(f)).resize((w, h), Image.BILINEAR), dtype=np.uint8)
              for f in files]
    x = np.stack(images)  # [K, H, W, 3] uint8
    if s.dtype.kind == "f":
        x = (x.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
        what = f"{s.dtype}, scaled to [0, 1] and normalised with ImageNet mean/std"
    else:
        what = "uint8"
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    x = np.ascontiguousarray(x.astype(s.dtype))
    return {s.name: x}, f" (resized to {h}x{w}, {layout} {what})", [f.name for f in files]


def _check_ranges(path: Path, samples: dict[str, np.ndarray], ranges: dict[str, tuple[float, float]]) -> None:
    """Refuse index values outside the table they index (negative ones count from the end)."""
    for name, (_, hi) in ranges.items():
        arr = samples.get(name)
        if arr is None or arr.size == 0:
            continue
        top, bottom = int(arr.max()), int(arr.min())
        if top > hi or bottom < -(hi + 1):
            bad = top if top > hi else bottom
            raise UserError(f"input '{name}' in '{path}' has the value {bad}, but the graph indexes a table of "
                            f"{int(hi) + 1} with it (valid 0..{int(hi)}); check that the samples are for this model")
