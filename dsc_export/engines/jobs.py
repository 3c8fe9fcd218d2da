"""The engines a build needs: jobs (one engine file each), their paths and batch sizes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dsc_export.artifacts import PRECISIONS, Engine, Manifest, read_manifest, verify_files
from dsc_export.backends import Backend, get_backend
from dsc_export.backends.base import BackendOptions, BuildOptions
from dsc_export.contract import fixed_batch, served_outputs
from dsc_export.errors import UserError
from dsc_export.graph.model import load_model
from dsc_export.graph.wire import check_symmetric
from dsc_export.weight_store import referenced

PARTS = ("heads", "tails", "all")
ENGINES_DIR = "engines"


@dataclass
class Job:
    """One engine file to build and the (split, part) records it serves.

    ``batches``: the batch sizes the file serves: one for a batch-fixed engine (onnxruntime);
    every size for an engine with one optimisation profile per batch size (TensorRT), where
    ``batches[k]`` is served by profile ``k``.
    """

    source: str  # ONNX path relative to the split dir
    batches: list[int]
    precision: str
    path: str  # engine path relative to the split dir
    records: list[tuple[str, str]] = field(default_factory=list)  # (split id, part)

    @property
    def batch(self) -> int:
        """The batch size of a batch-fixed engine (the first profile's of a profiled one)."""
        return self.batches[0]

    def profile(self, backend: Backend, batch: int) -> int | None:
        """The optimisation profile that serves ``batch``, or None for a batch-fixed engine."""
        return self.batches.index(batch) if backend.profiles else None


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,2,4"`` or ``"1-16"`` (every size) or ``"1:64"`` (powers of two) -> sorted unique sizes.

    Raises:
        UserError: an entry that is not a positive integer or range.
    """
    sizes: set[int] = set()
    for item in str(text).split(","):
        item = item.strip()
        try:
            if "-" in item or ":" in item:
                sep = "-" if "-" in item else ":"
                lo, hi = (int(x) for x in item.split(sep))
                if lo < 1 or hi < lo:
                    raise ValueError
                if sep == "-":
                    sizes.update(range(lo, hi + 1))
                else:
                    b = lo
                    while b <= hi:
                        sizes.add(b)
                        b *= 2
            else:
                b = int(item)
                if b < 1:
                    raise ValueError
                sizes.add(b)
        except ValueError:
            raise UserError(f"batch sizes must be positive integers, e.g. 1,2,4 or 1-16 or 1:64; "
                            f"got '{item}'") from None
    if not sizes:
        raise UserError("no batch sizes given")
    return sorted(sizes)


def engine_batch_sizes(manifest: Manifest, requested: list[int]) -> tuple[list[int], str | None]:
    """The batch sizes to build (or time) for ``requested``, and a note when they differ.

    A model that runs at one batch size only (``fixed_batch``, or a fixed batch in its input)
    gets engines, profiles and a plan for that size alone, whatever was asked.

    Returns:
        (sizes, note): the sizes to use, and None or one sentence saying what was left out.
    """
    fb = fixed_batch(manifest)
    requested = sorted(set(requested))
    if fb is None or requested == [fb]:
        return requested, None
    others = [b for b in requested if b != fb]
    return [fb], (f"the model runs at batch size {fb} only: using batch {fb}, "
                  f"not {', '.join(map(str, others))}")


def engine_path(backend: Backend, source: str, batch: int | None, precision: str) -> str:
    """Where the engine of ``source`` (an ONNX path relative to the split dir) at ``batch`` goes,
    relative to the split dir (``batch`` None: the one engine of a backend with a profile per
    batch size).

    An ONNX engine sits in the split dir's root (``engine-onnxruntime-head-cut033-b8-fp32.onnx``),
    so that it reads the split dir's one weights store: onnxruntime refuses external data
    outside the model file's folder. An opaque engine goes to ``engines/BACKEND/``
    (``engines/tensorrt/head-cut033-fp32.plan``: every batch size, one profile each).
    """
    stem = Path(source).stem  # model, head-cut003, tail-cut003
    sized = "" if batch is None else f"-b{batch}"
    if backend.suffix == ".onnx":
        return f"engine-{backend.name}-{stem}{sized}-{precision}{backend.suffix}"
    return f"{ENGINES_DIR}/{backend.name}/{stem}{sized}-{precision}{backend.suffix}"


def plan_jobs(manifest: Manifest, backend: Backend, *, parts: str, batch_sizes: list[int], precision: str) -> list[Job]:
    """The engine files a build of ``parts`` needs, grouped by source ONNX then batch size.

    A backend with ``profiles`` (TensorRT) gets one file per source serving every batch size,
    one optimisation profile each: the sizes asked for and those already recorded for that file
    (a rebuild must not drop a profile that another record names), in ascending order.

    Raises:
        UserError: ``parts`` is not one of ``PARTS``.
    """
    if parts not in PARTS:
        raise UserError(f"--parts must be one of {', '.join(PARTS)}")
    sides = {"heads": ("head",), "tails": ("tail",), "all": ("head", "tail")}[parts]
    wanted = [(sid, part, source) for part in sides for sid, source in manifest.parts(part)]
    jobs: dict[tuple[str, int | None], Job] = {}
    for source in dict.fromkeys(src for _, _, src in wanted):
        if backend.profiles:
            path = engine_path(backend, source, None, precision)
            recorded = {e.batch for e in manifest.engines if e.path == path and e.backend == backend.name}
            jobs[(source, None)] = Job(source, sorted(set(batch_sizes) | recorded), precision, path)
            continue
        for b in batch_sizes:
            jobs[(source, b)] = Job(source, [b], precision, engine_path(backend, source, b, precision))
    for sid, part, source in wanted:
        for job in (jobs[(source, None)],) if backend.profiles else (jobs[(source, b)] for b in batch_sizes):
            job.records.append((sid, part))
    return list(jobs.values())


def prepare_build(split_dir, backend_name: str, parts: str, batch_sizes, precision: str,
                  options: BackendOptions | BuildOptions | None,
                  log: Callable[[str], None] = lambda s: None):
    """Read and check everything a build or an import needs, before anything is written.

    Returns:
        (root, manifest, backend, options, recorded, jobs): the split dir, its manifest, the
        backend (checked usable here), the backend's own options (picked from ``options``), those
        options as the manifest records them, and the jobs (:func:`plan_jobs`).

    Raises:
        UserError: a bad precision, split dir, backend, batch size or changed source file.
    """

    if precision not in PRECISIONS:
        raise UserError(f"--precision must be fp32 or fp16, not '{precision}'")
    root = Path(split_dir)
    manifest = read_manifest(root)
    backend = get_backend(backend_name)
    backend.check()
    options = backend.options_type.pick(options)
    _, jobs = checked_jobs(root, manifest, backend, batch_sizes=batch_sizes, parts=parts,
                           precision=precision, log=log)
    return root, manifest, backend, options, options.recorded(), jobs


def checked_jobs(root: Path, manifest: Manifest, backend: Backend, *, batch_sizes, parts: str,
                 precision: str, log) -> tuple[list[int], list[Job]]:
    """The batch sizes and jobs of a build (or of the trtexec script), after the checks both
    make: an output no server can answer, a wire form the backend cannot build, a changed file.

    Returns:
        (batch sizes, jobs): the batch sizes the model runs at (:func:`engine_batch_sizes`) and
        :func:`plan_jobs`'s jobs.

    Raises:
        UserError: any of those checks, naming the file or split.
    """
    served_outputs(root, manifest)  # an output no server can answer: refused here as by serve and bundle
    batch_sizes, note = engine_batch_sizes(manifest, list(batch_sizes))
    if note:
        log(f"note: {note}")
    jobs = plan_jobs(manifest, backend, parts=parts, batch_sizes=batch_sizes, precision=precision)
    check_wires(manifest, backend, jobs)
    verify_files(manifest, root, list(dict.fromkeys(j.source for j in jobs)))  # refuse, naming the file
    return batch_sizes, jobs


def check_wires(manifest: Manifest, backend: Backend, jobs: list[Job]) -> None:
    """Refuse, in one line, a wire form the backend cannot build (TensorRT: affine int8).

    Raises:
        UserError: a job's split has an int8 wire with a non-zero zero point on TensorRT.
    """
    if backend.name == "tensorrt":
        ids = {sid for j in jobs for sid, _ in j.records}
        check_symmetric({s.id: s.quant for s in manifest.splits if s.id in ids}, "TensorRT")


def engine_key(e: Engine) -> tuple:
    """What one engine record is for: (split, part, backend, batch, precision)."""
    return (e.split, e.part, e.backend, e.batch, e.precision)


def engine_data(root: Path, rel: str) -> list[str]:
    """The weights files an engine reads, relative to the split dir (an opaque engine: none)."""
    if not rel.endswith(".onnx"):
        return []
    folder = Path(rel).parent
    return [(folder / loc).as_posix() for loc in referenced(load_model(root / rel, load_data=False))]
