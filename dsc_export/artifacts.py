"""The JSON artifacts: dataclasses, their JSON form, schema versions and hashes.

The split manifest (``dsc-export.split/3``) with its engine records and the profile
(``dsc-export.profile/1``) live here (fields and units: docs/contracts.md); the plan's dataclass is in
``planning`` beside the functions that compute it. Helpers for hashing and atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsc_export.errors import UserError

# 2: weights in a shared store (weights/), parts beside model.onnx; 3: onnxruntime engines beside
# them too, reading the same store (one store per split dir)
SPLIT_SCHEMA = "dsc-export.split/3"
OLD_SPLIT_SCHEMAS = ("dsc-export.split/1", "dsc-export.split/2")
# The vocabularies of the artifacts' fields (the CLI's choices come from here).
WIRE_DTYPES = ("float32", "float16")  # Manifest.wire_dtype: the cut tensor's dtype on the wire
# Split.wire of a cut: the wire forms of a cut tensor (graph/wire.py makes them). float32: the
# tensor as it is; float16: Cast down / Cast back; int8: QuantizeLinear / DequantizeLinear.
CUT_FORMS = ("float32", "float16", "int8")
# Forms that never change the answer (no --min-agreement needed; float16 counts when within its
# tolerance, int8 and jpegNN only above a floor: dsc_export.fidelity.admitted)
LOSSLESS_FORMS = ("float32", "raw", "png", "webp")
PRECISIONS = ("fp32", "fp16")  # Engine.precision, Profile.precision
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file at ``path``, read in ``chunk``-byte blocks.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(kw_only=True)
class TensorSig:
    """Name, shape and numpy dtype name of a model input or output; ``shape`` has the batch
    dimension as a symbolic string or -1.
    """

    name: str
    shape: list  # batch dim as a string (symbolic) or -1
    dtype: str


@dataclass(kw_only=True)
class ModelRef:
    """The whole model of a split dir: its file, hash, input/output signatures and the bytes of
    one input sample (fields and units: docs/contracts.md).
    """

    path: str  # relative to the split dir
    sha256: str
    input: TensorSig
    output: TensorSig
    input_bytes: int  # per sample
    outputs: list[TensorSig] = field(default_factory=list)  # every output (several-output models)
    source: str | None = None  # where the model was read from when split
    # The only batch size the model runs at: declared fixed in its input, or found by running it
    # (e.g. a Reshape with the batch baked in). None: any batch size. Engines, profiles and the
    # plan are then for this batch size only, and a server never batches its requests.
    fixed_batch: int | None = None
    # False when one sample's result depends on the other samples of its batch (BatchNorm with
    # batch statistics): requests of different devices must never be merged into one batch.
    # None: not checked (split --no-verify).
    batch_independent: bool | None = None

    @property
    def only_batch(self) -> int | None:
        """The only batch size the model runs at: ``fixed_batch``, or the input's batch dimension
        where the graph declares it fixed (manifests written before ``fixed_batch`` existed);
        None when any batch size runs."""
        if self.fixed_batch:
            return int(self.fixed_batch)
        b = self.input.shape[0] if self.input.shape else None
        return b if isinstance(b, int) and b > 0 else None

    @property
    def mergeable(self) -> bool:
        """True when a server may merge requests of several clients into one batch (dynamic
        batching): the model runs at any batch size and no sample's result depends on its
        batch-mates."""
        return self.only_batch is None and self.batch_independent is not False


@dataclass(kw_only=True)
class CutPoint:
    """One cut point, as the manifest's ``cut_points`` lists it.

    ``shape`` is per sample (batch dimension dropped); ``bytes`` is per sample on the wire;
    ``ratio`` is the paper's c_l in bytes (what the link carries), ``element_ratio`` the same in
    elements (what the paper tabulates).
    """

    index: int
    tensor: str
    shape: list[int]
    dtype: str
    elements: int
    bytes: int
    ratio: float
    element_ratio: float
    natural: bool
    compressive: bool
    scope: str | None = None
    # float16 wire only: the largest |value| of the cut tensor on the sample inputs, and whether
    # it fits float16 (finite, at most 65504). A cut point that does not fit is never split at.
    max_abs: float | None = None
    fits_wire: bool = True
    # Per wire form (``split --wire``): {"bytes", "ratio", "compressive" (Eq. 3 on that form's
    # bytes), "fits"}; empty in manifests written before wire forms (one form: the fields above).
    forms: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(kw_only=True)
class Split:
    """One candidate of the planner: ``offload`` (l = 0), a cut point in one wire form, or
    ``local`` (l = L).

    Ids: ``offload``, ``cutNNN`` (float32), ``cutNNN-float16``, ``cutNNN-int8``, offload forms
    ``offload-png`` ..., ``local``. ``cut`` is the cut point's base id shared by every form of
    one cut; ``quant`` (int8 only) the calibrated affine map; ``fidelity`` the answers against
    the whole model on raw held-out input (:class:`dsc_export.fidelity.Fidelity` as a dict).
    """

    id: str
    kind: str  # offload | split | local
    tensor: str | None
    head: str | None
    tail: str | None
    bytes: int  # per sample sent over the wire
    max_abs_diff: float | None
    max_rel_diff: float | None = None
    wire_tensor: str | None = None  # head output = tail input name (differs from tensor with a float16 wire)
    ratio: float | None = None
    # float32 | float16 | int8 (kind split), raw | png | jpegNN | webp (kind offload), None (local)
    wire: str | None = None
    cut: str | None = None  # the cut point's base id (cut029) for every form of it
    # int8: {"scale": float, "zero_point": int, "dtype": "int8", "axis": None, "clipped": share of
    # held-out values outside the calibrated range}; None otherwise
    quant: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    # offload codec forms (dsc_export.offload): the encoded sizes per sample on the sample inputs
    # {"statistic": "mean" (what bytes is), "mean", "median", "min", "max", "samples", "lossless",
    # "layout", "encode_ms_per_sample"}; None otherwise
    encoded: dict[str, Any] | None = None

    @property
    def encodes(self) -> bool:
        """True for an offload codec form (png, webp, jpegNN): its head is the encoder on the
        device (a profile time, no ONNX file), its tail decodes and runs the whole model."""
        return self.kind == "offload" and self.wire not in (None, "raw")


@dataclass(kw_only=True)
class Engine:
    """One built engine: the optimised form of a head, a tail or the whole model for one batch size.

    The whole model serves two candidates (``local``'s head on the device, ``offload``'s tail
    on the server); each gets its own record, and both may point at the same file.
    """

    split: str
    part: str  # head | tail
    backend: str
    batch: int
    precision: str  # fp32 | fp16
    path: str  # relative to the split dir
    sha256: str
    target: dict[str, Any]  # backend version, device name / compute capability
    source: str = ""  # the ONNX it was built from (relative path) ...
    source_sha256: str = ""  # ... and its hash: a rebuild is due when it changes
    options: dict[str, Any] = field(default_factory=dict)  # build options that change the engine
    seconds: float | None = None  # build time
    max_abs_diff: float | None = None  # the engine against its ONNX at this batch size
    max_rel_diff: float | None = None
    data: list[str] = field(default_factory=list)  # weights files it reads (relative to the split dir)
    # Does it pay? {"engine_ms", "onnx_ms" (medians, interleaved), "margin", "threads", "kept"}; None:
    # not measured (--keep-all, or a backend that cannot run the ONNX).
    speed: dict[str, Any] | None = None
    # TensorRT: one engine per part serves every batch size, one optimisation profile each; this
    # batch size runs on profile ``profile`` (min = opt = max = the batch). None: a batch-fixed engine.
    profile: int | None = None


@dataclass
class Manifest:
    """``DIR/manifest.json``: the split dir's contents and how they were verified."""

    model: ModelRef
    wire_dtype: str
    cut_points: list[CutPoint]
    splits: list[Split]
    engines: list[Engine] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)  # every file of the dir (relative) -> sha256
    notes: list[str] = field(default_factory=list)  # what split found and did about it (one line each)
    data: dict[str, list[str]] = field(default_factory=dict)  # ONNX file -> the weights files it reads
    # Engines built, measured and not kept (not faster than their ONNX by the margin): no file;
    # the runner and the profiles use the ONNX at that batch size, and build does not retry them.
    dropped: list[Engine] = field(default_factory=list)
    # Which sample inputs calibrated the lossy forms and which measured fidelity:
    # {"source": SampleInputs.description, "random": bool, "calibration": [names],
    #  "held_out": [names]}
    samples: dict[str, Any] | None = None
    wires: list[str] = field(default_factory=list)  # the cut forms made (split --wire), in order
    schema: str = SPLIT_SCHEMA

    def to_json(self) -> str:
        """The manifest as ``dsc-export.split/N`` JSON text, ``schema`` first."""
        d = asdict(self)
        ordered = {"schema": d.pop("schema"), **d}
        return json.dumps(ordered, indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """The manifest from its parsed JSON.

        Raises:
            UserError: another or an older schema.
            KeyError, TypeError: a missing or malformed field (:func:`read_manifest` turns these into
                one line).
        """
        if d.get("schema") != SPLIT_SCHEMA:
            if str(d.get("schema")) in OLD_SPLIT_SCHEMAS:
                raise UserError(f"this split dir was written by an older dsc-export ({d['schema']}, not "
                                f"{SPLIT_SCHEMA}); run dsc-export split again")
            raise UserError(f"not a {SPLIT_SCHEMA} manifest (schema: {d.get('schema')!r})")
        m = d["model"]
        model = ModelRef(
            path=m["path"], sha256=m["sha256"], input=TensorSig(**m["input"]),
            output=TensorSig(**m["output"]), input_bytes=m["input_bytes"],
            outputs=[TensorSig(**o) for o in m.get("outputs", [])], source=m.get("source"),
            fixed_batch=m.get("fixed_batch"), batch_independent=m.get("batch_independent"),
        )
        splits = [Split(**s) for s in d["splits"]]
        for s in splits:  # manifests written before wire forms: one form, the manifest's wire dtype
            if s.wire is None and s.kind != "local":
                s.wire = d["wire_dtype"] if s.kind == "split" else "raw"
            if s.cut is None and s.kind == "split":
                s.cut = s.id
        return cls(
            model=model, wire_dtype=d["wire_dtype"],
            cut_points=[CutPoint(**c) for c in d["cut_points"]], splits=splits,
            engines=[Engine(**e) for e in d.get("engines", [])], verification=d.get("verification"),
            files=d.get("files", {}), notes=d.get("notes", []), data=d.get("data", {}),
            dropped=[Engine(**e) for e in d.get("dropped", [])], samples=d.get("samples"),
            wires=d.get("wires") or [d["wire_dtype"]],
        )

    def split(self, split_id: str) -> Split:
        """The split with id ``split_id``.

        Raises:
            UserError: no such split (naming the known ones).
        """
        for s in self.splits:
            if s.id == split_id:
                return s
        raise UserError(f"no split '{split_id}'; known: {', '.join(s.id for s in self.splits)}")

    def parts(self, part: str) -> list[tuple[str, str]]:
        """(split id, ONNX path) of every split with a ``part`` (``head``: the device side, the
        whole model for ``local`` included; ``tail``: the server side, ``offload`` included)."""
        return [(s.id, s.head if part == "head" else s.tail) for s in self.splits
                if (s.head if part == "head" else s.tail)]

    def files_of(self, rel: str) -> list[str]:
        """``rel`` and the weights files it reads (ONNX external data in the shared store)."""
        return [rel] + self.data.get(rel, [])

    def engine(self, split_id: str, part: str, backend: str, batch: int, precision: str = "fp32") -> Engine | None:
        """The recorded engine for this split, part, backend, batch size and precision, or None."""
        for e in self.engines:
            if (e.split, e.part, e.backend, e.batch, e.precision) == (split_id, part, backend, batch, precision):
                return e
        return None

    def dropped_engine(self, split_id: str, part: str, backend: str, batch: int,
                       precision: str = "fp32") -> Engine | None:
        """The record of the engine build made and dropped for this split, part, backend, batch
        size and precision (not faster than its ONNX by the margin; its ONNX runs there), or
        None."""
        want = (split_id, part, backend, batch, precision)
        return next((e for e in self.dropped if (e.split, e.part, e.backend, e.batch, e.precision) == want),
                    None)


def hash_files(root: str | os.PathLike, skip: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX paths), except ``skip`` and hidden files."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip and not any(x.startswith(".") for x in rel.split("/")):
            out[rel] = sha256_file(p)
    return out


def verify_files(manifest: Manifest, root: str | os.PathLike, paths: list[str]) -> None:
    """Refuse (one line, naming the file) when a file differs from the hash the manifest recorded.

    Args:
        manifest: the split dir's manifest; ``files`` holds the hashes written by ``split``.
        root: the split dir.
        paths: the relative paths to check (an ONNX file's weights files are checked with it,
            each once).

    Raises:
        UserError: no hashes recorded, a path not listed, a file missing or changed.
    """
    if not manifest.files:
        raise UserError(f"'{root}/{MANIFEST_NAME}' records no file hashes (written by an older "
                        "dsc-export); run dsc-export split again")
    root = Path(root)
    checked: set[str] = set()  # a weights file shared by several parts is read once
    for rel in paths:
        expected = manifest.files.get(rel)
        if expected is None:
            raise UserError(f"'{rel}' is not listed in '{root}/{MANIFEST_NAME}'")
        for f in manifest.files_of(rel):
            if f in checked:
                continue
            checked.add(f)
            p = root / f
            if not p.is_file():
                raise UserError(f"'{p}' is missing; the split dir is incomplete (run dsc-export split again)")
            if sha256_file(p) != manifest.files[f]:
                raise UserError(f"'{p}' does not match its sha256 in the manifest: it was changed "
                                "after the split; run dsc-export split again")


def current_umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (never half-written),
    with the permissions a plain ``open`` would give (mkstemp's are owner-only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, parse, what: str, *, missing: str | None = None):
    """``parse(json)`` of the JSON file ``path``.

    Raises:
        UserError: the file is not JSON or ``parse`` rejects it (one line naming the file); with
            ``missing``, that line when ``path`` is not a file.
    """
    if missing is not None and not path.is_file():
        raise UserError(missing)
    try:
        return parse(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"'{path}' is not a valid {what}: {exc}") from exc


def read_manifest(split_dir: str | os.PathLike) -> Manifest:
    """The manifest of the split dir ``split_dir`` (its ``manifest.json``).

    Raises:
        UserError: not a split dir, not JSON, or not a manifest of this schema (one line).
    """
    return read_json(Path(split_dir) / MANIFEST_NAME, Manifest.from_dict, "manifest",
                     missing=f"'{split_dir}' is not a split dir (no {MANIFEST_NAME}); run dsc-export split first")


PROFILE_SCHEMA = "dsc-export.profile/1"
ROLES = ("device", "server")


@dataclass(kw_only=True)
class Timing:
    """Measured time of one part of one split at one batch size, in milliseconds."""

    split: str
    part: str  # head | tail
    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


@dataclass
class Profile:
    """``dsc-export.profile/1``: the times of one role's engines on one machine.

    The device profile holds the heads (and ``local``'s head = the whole model), the server
    profile the tails (and ``offload``'s tail = the whole model). ``emulation`` is null for a
    plain measurement, else how a weak device was stood in for (threads limited, GPU clocks
    locked, an explicit slowdown): emulated figures are always labelled.
    """

    role: str
    backend: str
    host: dict[str, Any]
    emulation: dict[str, Any] | None
    model_sha256: str
    timings: list[Timing]
    precision: str = "fp32"
    settings: dict[str, Any] = field(default_factory=dict)  # warmup, repeats, min_time, seed
    created: str = ""
    schema: str = PROFILE_SCHEMA

    def to_json(self) -> str:
        """The profile as ``dsc-export.profile/1`` JSON text, ``schema`` first."""
        d = asdict(self)
        return json.dumps({"schema": d.pop("schema"), **d}, indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        """The profile from its parsed JSON.

        Raises:
            UserError: another schema or an unknown role.
            KeyError, TypeError: a missing or malformed field (:func:`read_profile` turns these into
                one line).
        """
        if d.get("schema") != PROFILE_SCHEMA:
            raise UserError(f"not a {PROFILE_SCHEMA} file (schema: {d.get('schema')!r})")
        if d.get("role") not in ROLES:
            raise UserError(f"profile role must be one of {', '.join(ROLES)}, not {d.get('role')!r}")
        return cls(
            role=d["role"], backend=d["backend"], host=d["host"], emulation=d.get("emulation"),
            model_sha256=d["model_sha256"], timings=[Timing(**t) for t in d["timings"]],
            precision=d.get("precision", "fp32"), settings=d.get("settings", {}), created=d.get("created", ""),
        )

    def scaled(self, factor: float) -> Profile:
        """This profile with every time multiplied by ``factor``, labelled as a slowdown."""
        from dataclasses import replace

        return replace(self, timings=[replace(t, median_ms=t.median_ms * factor, p10_ms=t.p10_ms * factor,
                                              p90_ms=t.p90_ms * factor) for t in self.timings],
                       emulation={**(self.emulation or {}), "slowdown": float(factor)})

    def time_of(self, split: str, part: str, batch: int) -> Timing | None:
        """The timing of ``part`` of ``split`` at ``batch``, or None when it was not measured."""
        for t in self.timings:
            if (t.split, t.part, t.batch) == (split, part, batch):
                return t
        return None

    def batches(self) -> list[int]:
        """The batch sizes measured, sorted."""
        return sorted({t.batch for t in self.timings})


def read_profile(path: str | os.PathLike) -> Profile:
    """The profile at ``path`` (``dsc-export.profile/1``, written by ``dsc-export bench``).

    Raises:
        UserError: the file is missing, is not JSON, or is not a profile of this schema (one line).
    """
    path = Path(path)
    return read_json(path, Profile.from_dict, "profile",
                     missing=f"profile '{path}' does not exist; make one with dsc-export bench")


def check_pair(device: Profile, server: Profile) -> None:
    """Refuse a device and a server profile that cannot be combined into one plan.

    Raises:
        UserError: a profile of the wrong role, or the two are of different models.
    """
    if device.role != "device":
        raise UserError(f"the --device profile was taken with --role {device.role}")
    if server.role != "server":
        raise UserError(f"the --server profile was taken with --role {server.role}")
    if device.model_sha256 != server.model_sha256:
        raise UserError(f"the profiles are of different models (model sha256 {device.model_sha256[:12]}… on the "
                        f"device, {server.model_sha256[:12]}… on the server); profile the same split dir on both")
