"""Engines per (part, batch size, precision, backend) for a split dir, recorded in its manifest.

Heads are what a device needs (every split's head and the whole model for ``local``), tails
what a server needs (every split's tail and the whole model for ``offload``). The whole model
is built once per batch size and recorded for both candidates.

Building is idempotent: an engine is rebuilt only when its file is missing or changed, or its
ONNX, build options or backend version changed. Each engine is checked against its ONNX source
(run by onnxruntime at the same batch size) before it is recorded, and the manifest is rewritten
after every engine, so an interrupted build keeps what it finished.

Only engines that pay are kept: each is timed against the dynamic ONNX of the same part at its
batch size (medians of interleaved runs) and kept only when it is faster by more than the margin
(:data:`MARGIN`); the decision is recorded (``Engine.speed``; a dropped engine goes to
``Manifest.dropped``, its file removed) and :class:`PartRunner` runs the ONNX there. ONNX engines
sit in the split dir's root beside ``model.onnx`` (``engine-BACKEND-<part file>-b<N>-<precision>.onnx``)
and read the split dir's one store ``weights/`` (:mod:`dsc_export.weight_store`): a tensor equal in
the source and in an engine (one the optimiser left alone), or in the engines of several parts and
batch sizes, is stored once, so another batch size adds kilobytes. Opaque engines (TensorRT plans)
go to ``engines/BACKEND/``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsc_export.artifacts import (
    MANIFEST_NAME,
    PRECISIONS,
    Engine,
    Manifest,
    read_manifest,
    sha256_file,
    verify_files,
    write_json_atomic,
)
from dsc_export.backends import Backend, BuildOptions, Runner, get_backend
from dsc_export.compare import compare, quantized_steps, tolerance
from dsc_export.errors import UserError, VerificationError
from dsc_export.graph.model import load_model
from dsc_export.graph.precision import to_float16_for_build
from dsc_export.graph.signature import input_signature
from dsc_export.graph.wire import check_symmetric
from dsc_export.inputs import SampleInputs
from dsc_export.ort import make_session
from dsc_export.serving.protocol import fixed_batch, served_outputs
from dsc_export.weight_store import check_blobs, prune, referenced

PARTS = ("heads", "tails", "all")
ENGINES_DIR = "engines"
MARGIN = 0.05  # an engine is kept when its median is below (1 - MARGIN) x its ONNX's
SPEED_ROUNDS = 5  # interleaved (engine, ONNX) pairs of timed runs per decision


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


@dataclass
class BuildReport:
    """Outcome of :func:`build_engines`: engines built, kept (up to date), dropped (not
    faster than the ONNX by the margin), failed (with the reason), and the seconds taken.
    """

    built: list[Engine] = field(default_factory=list)
    kept: list[Engine] = field(default_factory=list)
    dropped: list[Engine] = field(default_factory=list)  # built, not faster than the ONNX by the margin
    failed: list[tuple[Job, str]] = field(default_factory=list)
    seconds: float = 0.0


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
            raise UserError(f"batch sizes must be positive integers, e.g. 1,2,4 or 1-16 or 1:64; got '{item}'") from None
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


def _prepare(split_dir, backend_name: str, parts: str, batch_sizes, precision: str, options: BuildOptions | None,
             log: Callable[[str], None] = lambda s: None):
    """Read and check everything a build or an import needs, before anything is written."""

    if precision not in PRECISIONS:
        raise UserError(f"--precision must be fp32 or fp16, not '{precision}'")
    root = Path(split_dir)
    manifest = read_manifest(root)
    served_outputs(root, manifest)  # an output no server can answer: refused here as by serve and bundle
    backend = get_backend(backend_name)
    backend.check()
    options = options or BuildOptions()
    batch_sizes, note = engine_batch_sizes(manifest, list(batch_sizes))
    if note:
        log(f"note: {note}")
    jobs = plan_jobs(manifest, backend, parts=parts, batch_sizes=batch_sizes, precision=precision)
    if backend.name == "tensorrt":
        ids = {sid for j in jobs for sid, _ in j.records}
        check_symmetric({s.id: s.quant for s in manifest.splits if s.id in ids}, "TensorRT")
    verify_files(manifest, root, list(dict.fromkeys(j.source for j in jobs)))  # refuse, naming the file
    return root, manifest, backend, options, options.for_backend(backend.name), jobs


def _up_to_date(rec: Engine | None, root: Path, job: Job, source_sha: str, opts: dict, version: str) -> bool:
    return (rec is not None and rec.path == job.path and (root / rec.path).is_file()
            and rec.source_sha256 == source_sha and rec.options == opts
            and rec.target.get("version") == version and sha256_file(root / rec.path) == rec.sha256)


def _dropped_up_to_date(rec: Engine | None, job: Job, source_sha: str, opts: dict, version: str) -> bool:
    """A dropped engine's decision still holds: same ONNX, options and backend version."""
    return (rec is not None and rec.path == job.path and rec.source_sha256 == source_sha and rec.options == opts
            and rec.target.get("version") == version)


def _key(e: Engine) -> tuple:
    return (e.split, e.part, e.backend, e.batch, e.precision)


def pays(engine_ms: float, onnx_ms: float, margin: float = MARGIN) -> bool:
    """True when an engine is faster than its ONNX by more than ``margin`` (0.05: 5 %), medians in ms."""
    return engine_ms < onnx_ms * (1.0 - margin)


def time_pair(engine: Runner, onnx: Runner, feeds: dict[str, np.ndarray], rounds: int = SPEED_ROUNDS) -> tuple[float, float]:
    """Median ms of ``engine`` and of ``onnx`` on ``feeds``, runs interleaved (order alternating
    each round, so drift and bursts of noise touch both), after one untimed run each. Both
    runners must be active."""
    import statistics

    engine.infer(feeds)
    onnx.infer(feeds)
    times: dict[int, list[float]] = {0: [], 1: []}
    pair = (engine, onnx)
    for r in range(max(1, rounds)):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[k].append(pair[k].time_ms(feeds))
    return statistics.median(times[0]), statistics.median(times[1])


def engine_data(root: Path, rel: str) -> list[str]:
    """The weights files an engine reads, relative to the split dir (an opaque engine: none)."""
    if not rel.endswith(".onnx"):
        return []

    folder = Path(rel).parent
    return [(folder / loc).as_posix() for loc in referenced(load_model(root / rel, load_data=False))]


def _prune_weights(root: Path, manifest: Manifest) -> None:
    """Remove the blobs of the split dir's store that no file of the dir reads: not the model,
    a part (``manifest.data``) or a kept engine of any backend (``Engine.data``)."""

    keep = {d for ds in manifest.data.values() for d in ds} | {d for e in manifest.engines for d in e.data}
    prune(root, keep)


def build_engines(
    split_dir: str | os.PathLike,
    backend_name: str = "onnxruntime",
    *,
    batch_sizes: list[int] = (1,),
    parts: str = "all",
    precision: str = "fp32",
    options: BuildOptions | None = None,
    verify: bool = True,
    progress: Callable[[int, int, str], None] = lambda done, total, label: None,
    log: Callable[[str], None] = lambda s: None,
    inputs: str | os.PathLike | None = None,
    keep_all: bool = False,
    margin: float = MARGIN,
) -> BuildReport:
    """Build the missing or stale engines of a split dir and record them in its manifest.

    Args:
        split_dir: a split dir written by ``dsc-export split``.
        backend_name: a name from :data:`dsc_export.backends.BACKENDS`.
        batch_sizes: batch sizes to build (one engine per size).
        parts: ``heads`` (device side), ``tails`` (server side) or ``all``.
        precision: ``fp32`` or ``fp16``.
        options: build options (TensorRT workspace and compatibility flags, onnxruntime level).
        verify: check each new engine against its ONNX at its batch size.
        progress: called as ``progress(done, total, label)`` before each engine.
        log: progress messages.
        inputs: a ``.npz`` or a folder of images (see
            :meth:`dsc_export.inputs.SampleInputs.from_path`) that the checks of the whole model
            and the heads run on; tails are checked on random inputs within the ranges of their
            own graph. None: random inputs for every check.
        keep_all: keep every engine built, without timing it against its ONNX.
        margin: keep an engine only where its median time (ms, interleaved with the ONNX's, on
            this machine with onnxruntime's default threads) is below ``(1 - margin)`` x the
            ONNX's; the decision is recorded in the engine's ``speed``.

    Returns:
        What was built, what was already up to date, what was dropped (not faster by the
        margin) and what failed (and why). One engine that fails (e.g. out of memory) does not
        stop the others.

    Raises:
        UserError: a bad split dir, backend or ``inputs`` (before anything is built).
    """
    root, manifest, backend, options, opts, jobs = _prepare(split_dir, backend_name, parts, batch_sizes, precision,
                                                            options, log)
    samples = None
    if inputs is not None and not verify:
        log(f"--inputs {inputs} is not used: --no-verify skips the engine checks")
    elif inputs is not None:  # a bad --inputs is refused before anything is built

        samples = SampleInputs.from_path(inputs, load_model(root / manifest.model.path, load_data=False))
    target = backend.target()
    report = BuildReport()
    t_all = time.perf_counter()
    reference: dict[str, object] = {}
    onnx_runner: dict[str, Runner] = {}  # the dynamic ONNX each engine is timed against, one at a time
    measure = not keep_all and backend.runs_onnx
    dropped = {_key(e): e for e in manifest.dropped}
    for k, job in enumerate(jobs):
        progress(k, len(jobs), f"{Path(job.path).name}")
        source_sha = manifest.files[job.source]
        recs = [(manifest.engine(sid, part, backend.name, b, precision), job.profile(backend, b))
                for b in job.batches for sid, part in job.records]
        if all(_up_to_date(r, root, job, source_sha, opts, target["version"]) and r.profile == prof
               for r, prof in recs):
            report.kept.extend(r for r, _ in recs)
            continue
        gone = [dropped.get((sid, part, backend.name, job.batch, precision)) for sid, part in job.records]
        if measure and all(_dropped_up_to_date(r, job, source_sha, opts, target["version"]) for r in gone):
            report.dropped.extend(gone)
            continue
        t0 = time.perf_counter()
        try:
            notes: list[str] = []
            backend.build(root / job.source, root / job.path, batch=job.batches if backend.profiles else job.batch,
                          precision=precision, options=options, cache_dir=root / ENGINES_DIR / backend.name,
                          log=notes.append)
            for note in dict.fromkeys(notes):
                log(f"{Path(job.path).name}: {note}")
            diffs = {b: (None, None) for b in job.batches}
            if verify:
                if job.source not in reference:
                    reference.clear()  # one reference session at a time

                    check_inputs = _check_inputs(root, manifest, job, samples)  # before the session's memory
                    reference[job.source] = (make_session(root / job.source, optimization="extended", arena=False),
                                             check_inputs)
                for b in job.batches:  # every profile of the engine, at its batch size
                    diffs[b] = _check_engine(backend, root / job.path, *reference[job.source], job, precision,
                                             batch=b, profile=job.profile(backend, b))
            speed = None
            if measure:
                if job.source not in onnx_runner:
                    for r in onnx_runner.values():
                        r.deactivate()
                    onnx_runner.clear()
                    onnx_runner[job.source] = backend.load_onnx(root / job.source)
                    onnx_runner[job.source].activate()
                feeds = _speed_feeds(root, manifest, job, samples, reference, onnx_runner[job.source])
                with backend.load(root / job.path) as runner:
                    e_ms, o_ms = time_pair(runner, onnx_runner[job.source], feeds)
                speed = {"engine_ms": round(e_ms, 3), "onnx_ms": round(o_ms, 3), "margin": margin,
                         "threads": None, "kept": pays(e_ms, o_ms, margin)}
        except MemoryError:
            _remove(root / job.path)
            report.failed.append((job, "out of host memory"))
            log(f"out of host memory building {job.path}; the other engines go on")
            continue
        except UserError as exc:
            _remove(root / job.path)
            report.failed.append((job, str(exc)))
            log(f"{job.path}: {exc}")
            continue
        seconds = time.perf_counter() - t0
        keep = speed is None or speed["kept"]
        sha = sha256_file(root / job.path) if keep else ""
        data = engine_data(root, job.path) if keep else []
        if not keep:
            _remove(root / job.path)
            log(f"{Path(job.path).name}: dropped, {speed['engine_ms']:.1f} ms against {speed['onnx_ms']:.1f} ms "
                f"for the ONNX (not {margin:.0%} faster); the ONNX runs at batch {job.batch}")
        for b in job.batches:
            for sid, part in job.records:
                key = (sid, part, backend.name, b, precision)
                manifest.engines = [e for e in manifest.engines if _key(e) != key]
                manifest.dropped = [e for e in manifest.dropped if _key(e) != key]
                abs_diff, rel_diff = diffs[b]
                rec = Engine(split=sid, part=part, backend=backend.name, batch=b, precision=precision,
                             path=job.path, sha256=sha, target=dict(target), source=job.source,
                             source_sha256=source_sha, options=dict(opts), seconds=round(seconds, 3),
                             max_abs_diff=abs_diff, max_rel_diff=rel_diff, data=data, speed=speed,
                             profile=job.profile(backend, b))
                (manifest.engines if keep else manifest.dropped).append(rec)
                (report.built if keep else report.dropped).append(rec)
        write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    for r in onnx_runner.values():
        r.deactivate()
    _prune_weights(root, manifest)
    progress(len(jobs), len(jobs), "done")
    report.seconds = time.perf_counter() - t_all
    return report


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _speed_feeds(root: Path, manifest: Manifest, job: Job, samples, reference: dict, onnx: Runner) -> dict:
    """One batch of ``job.batch`` for timing an engine: the verification's inputs where there
    were any, else random within the source's ranges."""
    inputs = reference[job.source][1] if job.source in reference else _check_inputs(root, manifest, job, samples)
    wanted = {t.name for t in onnx.inputs}
    return {name: x for name, x in inputs.feeds(job.batch).items() if name in wanted}


def _check_inputs(root: Path, manifest: Manifest, job: Job, samples):
    """The SampleInputs an engine of ``job.source`` is checked on: the user's samples for the whole
    model and the heads (their input is the model's), else random within the source's ranges."""

    reads_model_input = job.source == manifest.model.path or all(part == "head" for _, part in job.records)
    if samples is not None and reads_model_input:
        return samples
    return SampleInputs.random(load_model(root / job.source, load_data=False))


def _check_engine(backend: Backend, engine: Path, reference, inputs, job: Job, precision: str, *,
                  batch: int, profile: int | None = None) -> tuple[float, float]:
    """Run the engine (``profile``: the optimisation profile serving ``batch``, or None) and its
    ONNX on one batch of ``batch`` from ``inputs`` (a SampleInputs); refuse a mismatch.

    The tolerance follows the dtypes compared (:func:`dsc_export.compare.tolerance`): the
    outputs' dtypes, and float16 for an fp16 engine; a NaN or inf is a failure of its own.
    """

    wanted = {i.name for i in reference.get_inputs()}
    feeds = {name: x for name, x in inputs.feeds(batch).items() if name in wanted}
    want = reference.run(None, feeds)
    with backend.load(engine, threads=None, profile=profile) as runner:
        got = runner.infer(feeds)
    names = [o.name for o in reference.get_outputs()]
    # an int8 wire (graph/wire.py) may round one step apart where the floats before it differ by
    # a few ulps
    quantized = [k for k, n in enumerate(names)
                 if n.endswith(".wire_int8") and want[k].dtype == np.int8]
    steps = 0
    for k in quantized:
        steps = max(steps, quantized_steps(want[k], got[names[k]]))
        if not 0 <= steps <= 1:
            raise VerificationError(
                f"engine {job.path} differs from {job.source} at batch {batch}: its int8 wire "
                f"'{names[k]}' is {steps} quantization steps off (at most 1 is rounding)")
    keep = [k for k in range(len(names)) if k not in quantized]
    want, names = [want[k] for k in keep], [names[k] for k in keep]
    result = compare(want, [got[n] for n in names], names, what=f"engine {job.path}")
    tol = tolerance(*(w.dtype for w in want), "float16" if precision == "fp16" else None, engine=True)
    if not result.ok(tol):
        raise VerificationError(f"engine {job.path} differs from {job.source} at batch {batch}: "
                                f"{result.describe(tol)}")
    # an int8 wire's figure: its steps, relative to the 255 steps of its range
    return max(result.max_abs, float(steps)), max(result.max_rel, steps / 255)


def load_engine(split_dir: str | os.PathLike, rec: Engine, threads: int | None = None) -> Runner:
    """A runner for a recorded engine, after checking its sha256 and that it was built for here.

    The weights files it reads (``rec.data``) are checked too: each one's sha256 is its name.

    Raises:
        UserError: the file or one of its weights files is missing or changed (named), or it was
            built for another backend version or device.
    """
    path = Path(split_dir) / rec.path
    if not path.is_file():
        raise UserError(f"engine '{path}' is missing; run dsc-export build again")
    if sha256_file(path) != rec.sha256:
        raise UserError(f"engine '{path}' does not match its sha256 in the manifest; refusing to load it "
                        "(rebuild with dsc-export build)")

    check_blobs(split_dir, rec.data)
    backend = get_backend(rec.backend)
    why = backend.compatible(rec.target, rec.options)
    if why:
        raise UserError(f"engine '{path}' was built elsewhere: {why}; rebuild it here with dsc-export build")
    return backend.load(path, threads, profile=rec.profile)


def dropped_engine(manifest: Manifest, split_id: str, part: str, backend: str, batch: int,
                   precision: str = "fp32") -> Engine | None:
    """The record of an engine built and dropped (not faster than its ONNX by the margin), or None."""
    return next((e for e in manifest.dropped if _key(e) == (split_id, part, backend, batch, precision)), None)


def load_part(split_dir: str | os.PathLike, manifest: Manifest, split_id: str, part: str, backend: str, batch: int,
              precision: str = "fp32", threads: int | None = None) -> Runner | None:
    """A runner for what runs ``part`` of ``split_id`` at ``batch``: its engine, or its ONNX where
    build dropped the engine (as :class:`PartRunner` does); None when neither was built.

    Raises:
        UserError: as :func:`load_engine`.
    """
    rec = manifest.engine(split_id, part, backend, batch, precision)
    if rec is not None:
        return load_engine(split_dir, rec, threads)
    gone = dropped_engine(manifest, split_id, part, backend, batch, precision)
    return None if gone is None else get_backend(backend).load_onnx(Path(split_dir) / gone.source, threads)


def emit_trtexec(split_dir: str | os.PathLike, out_file: str | os.PathLike, *, batch_sizes: list[int],
                 parts: str = "all", precision: str = "fp32", options: BuildOptions | None = None,
                 log: Callable[[str], None] = lambda s: None) -> int:
    """Write the ``trtexec`` commands that build this split dir's engines on another machine.

    The commands are relative to the split dir and write the engine files where ``build
    --import`` looks for them: one engine per part, one optimisation profile per batch size
    (``--profile=K`` then that profile's ``--minShapes`` = ``--optShapes`` = ``--maxShapes``, in
    ascending batch order, as :meth:`TensorrtBackend.build` adds them). For fp16 the converted ONNX
    files are written first (the commands read them), since TensorRT 11 takes precision from the
    ONNX types. Every argument is quoted for ``sh`` (tensor names may hold ``;``, spaces, quotes,
    ``$``); an input that is fully static gets no shapes.

    Returns:
        The number of engine commands written.

    Raises:
        UserError: not a split dir, a changed file, an output no server can answer, or an input
            name trtexec cannot express (a ``,`` or ``'``).
    """
    import shlex

    from dsc_export.backends.tensorrt import TIMING_CACHE, TensorrtBackend, shape_spec

    root = Path(split_dir)
    manifest = read_manifest(root)
    served_outputs(root, manifest)
    backend = TensorrtBackend()
    options = options or BuildOptions()
    batch_sizes, note = engine_batch_sizes(manifest, list(batch_sizes))
    if note:
        log(f"note: {note}")
    jobs = plan_jobs(manifest, backend, parts=parts, batch_sizes=batch_sizes, precision=precision)
    if backend.name == "tensorrt":
        ids = {sid for j in jobs for sid, _ in j.records}
        check_symmetric({s.id: s.quant for s in manifest.splits if s.id in ids}, "TensorRT")
    verify_files(manifest, root, list(dict.fromkeys(j.source for j in jobs)))
    import_cmd = shlex.join(["dsc-export", "build", ".", "--backend", "tensorrt", "--import", "--batch-sizes",
                             ",".join(map(str, batch_sizes)), "--parts", parts, "--precision", precision])
    lines = ["#!/bin/sh", "# Build the TensorRT engines of this split dir on the machine that will run them",
             "# (engines are tied to its GPU and TensorRT version). Run from the split dir, then:",
             f"#   {import_cmd}", "set -e", shlex.join(["mkdir", "-p", f"{ENGINES_DIR}/tensorrt"])]
    commands, inputs = [], {}
    for job in jobs:
        if job.source not in inputs:
            inputs[job.source] = _onnx_input(root / job.source)
        name, dims = inputs[job.source]
        static = all(isinstance(d, int) and d > 0 for d in dims)
        if not static and any(not (isinstance(d, int) and d > 0) for d in dims[1:]):
            raise UserError(f"input '{name}' of {job.source} has dynamic dimensions other than the batch: {dims}")
        shapes = [[b] + list(dims[1:]) for b in job.batches]
        if not static:
            shape_spec(name, shapes[0])  # refuse a name trtexec cannot take before anything is written
        commands.append((job, None if static else name, shapes))
    converted: dict[str, str] = {}
    for job, name, shapes in commands:  # every name checked before any file is written
        onnx_path = job.source
        if precision == "fp16":
            if job.source not in converted:
                converted[job.source] = _fp16_copy(root, job.source)
            onnx_path = converted[job.source]
        lines.append(backend.trtexec_command(onnx_path, job.path, input_name=name, input_shapes=shapes,
                                             precision=precision, options=options, cache_path=f"{ENGINES_DIR}/tensorrt/{TIMING_CACHE}"))
    text = "\n".join(lines) + "\n"
    out_file = Path(out_file)
    write_json_atomic(out_file, text)
    out_file.chmod(0o755)
    return len(jobs)


def _onnx_input(path: Path) -> tuple[str, list]:
    """Name and shape (ints, symbolic dims as strings) of an ONNX file's one data input."""

    name, dims, _ = input_signature(load_model(path, load_data=False))[0]
    return name, dims


def _fp16_copy(root: Path, source: str) -> str:
    import onnx


    rel = f"{ENGINES_DIR}/tensorrt/onnx-fp16/{source.replace('/', '-')}"
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(root / source)
    model = to_float16_for_build(model, SampleInputs.random(model))
    onnx.save(model, os.fspath(dst), save_as_external_data=model.ByteSize() > 1_500_000_000,
              location=dst.name + ".data")
    return rel


def import_engines(split_dir: str | os.PathLike, backend_name: str, *, batch_sizes: list[int], parts: str = "all",
                   precision: str = "fp32", options: BuildOptions | None = None,
                   log: Callable[[str], None] = lambda s: None) -> BuildReport:
    """Record engines built outside dsc-export (e.g. by the ``--emit-trtexec`` commands).

    Each expected engine file that exists is loaded once per batch size it serves (so a wrong or
    corrupt file, or one without the optimisation profile a batch size needs, is refused) and
    recorded with this machine's target; missing files are reported as failed.
    """
    root, manifest, backend, options, opts, jobs = _prepare(split_dir, backend_name, parts, batch_sizes, precision,
                                                            options, log)
    target = backend.target()
    report = BuildReport()
    for job in jobs:
        path = root / job.path
        if not path.is_file():
            report.failed.append((job, "not found"))
            continue
        for b in job.batches:
            with backend.load(path, profile=job.profile(backend, b)):
                pass
        sha = sha256_file(path)
        for b in job.batches:
            for sid, part in job.records:
                manifest.engines = [e for e in manifest.engines if _key(e) != (sid, part, backend.name, b, precision)]
                rec = Engine(split=sid, part=part, backend=backend.name, batch=b, precision=precision,
                             path=job.path, sha256=sha, target=dict(target), source=job.source,
                             source_sha256=manifest.files[job.source], options=dict(opts), seconds=None,
                             data=engine_data(root, job.path), profile=job.profile(backend, b))
                manifest.engines.append(rec)
                report.built.append(rec)
        log(f"imported {job.path}")
    write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    return report


class PartRunner:
    """Runs one part (a head, a tail or the whole model) at any batch size: the engine built for
    that batch size where there is one (loaded on first use and warmed up), else its ONNX.

    Engines are batch-fixed and optimised, so they are what the profiles measured; the ONNX
    fallback serves batch sizes without an engine (dynamic batching on a server, an odd batch
    on a device). A model that runs at one batch size only (``fixed_batch``) is run at that size
    only: any other batch is refused, never handed to an engine or the ONNX.
    """

    def __init__(self, split_dir: str | os.PathLike, manifest: Manifest, split: str, part: str,
                 *,
                 backend: str = "onnxruntime", precision: str = "fp32", threads: int | None = None):
        self.root, self.manifest, self.split, self.part = Path(split_dir), manifest, split, part
        self.backend, self.precision, self.threads = backend, precision, threads
        s = manifest.split(split)
        self.source = s.head if part == "head" else s.tail
        self.records = {e.batch: e for e in manifest.engines if (e.split, e.part, e.backend, e.precision)
                        == (split, part, backend, precision)}
        self._engines: dict[int, Runner] = {}
        self._onnx = None
        self.input_name: str | None = None

        self.fixed_batch = fixed_batch(manifest)

    def onnx_session(self):
        """The part's ONNX session (created on first use)."""
        if self._onnx is None:

            self._onnx = make_session(self.root / self.source, self.threads)
        return self._onnx

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the part on ``feeds`` (batch first) and return ``outputs`` [default: every output].

        Raises:
            UserError: a batch size other than the model's fixed batch size.
        """
        batch = int(next(iter(feeds.values())).shape[0])
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise UserError(f"the model runs at batch size {self.fixed_batch} only, not {batch} "
                            f"({self.split} {self.part})")
        rec = self.records.get(batch)
        if rec is not None:
            runner = self._engines.get(batch)
            if runner is None:
                runner = load_engine(self.root, rec, self.threads)
                runner.activate()
                runner.infer(feeds)  # first run: allocations and kernel choices
                self._engines[batch] = runner
            got = runner.infer(feeds)
            names = outputs or [o.name for o in runner.outputs]
            return [got[n] for n in names]
        return self.onnx_session().run(outputs, feeds)

    def close(self) -> None:
        """Deactivate every runner this part opened."""
        for r in self._engines.values():
            r.deactivate()
        self._engines.clear()
        self._onnx = None
