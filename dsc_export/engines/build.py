"""Build: the missing or stale engines of a split dir, each checked and timed, then recorded.

Each job (:mod:`dsc_export.engines.jobs`) is built, checked against its ONNX source and timed
against it (:mod:`dsc_export.engines.timing`), one at a time (:meth:`_Build.build_one`), then
recorded in the manifest, kept or dropped (:meth:`_Build.record`); the manifest is rewritten
after every engine, so an interrupted build keeps what it finished.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsc_export.artifacts import MANIFEST_NAME, Engine, Manifest, sha256_file, write_json_atomic
from dsc_export.backends.base import Backend, BackendOptions, BuildOptions, Runner
from dsc_export.compare import compare, quantized_steps, tolerance
from dsc_export.engines.jobs import ENGINES_DIR, Job, engine_data, engine_key, prepare_build
from dsc_export.engines.timing import MARGIN, speed_record, time_pair
from dsc_export.errors import UserError, VerificationError
from dsc_export.feeds import PartFeeds, model_samples
from dsc_export.graph.model import load_model
from dsc_export.inputs import SampleInputs
from dsc_export.ort import make_session
from dsc_export.weight_store import prune


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


def _up_to_date(rec: Engine | None, root: Path, job: Job, source_sha: str, opts: dict, version: str) -> bool:
    return (rec is not None and rec.path == job.path and (root / rec.path).is_file()
            and rec.source_sha256 == source_sha and rec.options == opts
            and rec.target.get("version") == version and sha256_file(root / rec.path) == rec.sha256)


def _dropped_up_to_date(rec: Engine | None, job: Job, source_sha: str, opts: dict, version: str) -> bool:
    """A dropped engine's decision still holds: same ONNX, options and backend version."""
    return (rec is not None and rec.path == job.path and rec.source_sha256 == source_sha and rec.options == opts
            and rec.target.get("version") == version)


def _prune_weights(root: Path, manifest: Manifest) -> None:
    """Remove the blobs of the split dir's store that no file of the dir reads: not the model,
    a part (``manifest.data``) or a kept engine of any backend (``Engine.data``)."""
    keep = {d for ds in manifest.data.values() for d in ds} | {d for e in manifest.engines for d in e.data}
    prune(root, keep)


@dataclass
class _Build:
    """One run of :func:`build_engines`: what every job shares, and the one reference session and
    the one ONNX runner (timing) it keeps open at a time."""

    root: Path
    manifest: Manifest
    backend: Backend
    options: BackendOptions
    opts: dict  # the options as recorded
    precision: str
    target: dict
    samples: SampleInputs | None
    verify: bool
    measure: bool  # time each engine against its ONNX (keep or drop)
    margin: float
    log: Callable[[str], None]
    reference: dict = field(default_factory=dict)  # source -> (onnxruntime session, SampleInputs)
    onnx_runner: dict = field(default_factory=dict)  # source -> the dynamic ONNX's active runner

    def build_one(self, job: Job) -> tuple[dict, dict | None]:
        """Build the engine of ``job``, check it at every batch size it serves and time it.

        Returns:
            (diffs, speed): batch -> (max abs, max rel) difference from the ONNX ((None, None)
            unchecked), and the keep-or-drop timing (None: not timed).

        Raises:
            UserError: the build, the check or the timing failed (the engine file is left).
            MemoryError: out of host memory.
        """
        root, backend = self.root, self.backend
        notes: list[str] = []
        backend.build(root / job.source, root / job.path,
                      batch=job.batches if backend.profiles else job.batch, precision=self.precision,
                      options=self.options, cache_dir=root / ENGINES_DIR / backend.name, log=notes.append)
        for note in dict.fromkeys(notes):
            self.log(f"{Path(job.path).name}: {note}")
        diffs = {b: (None, None) for b in job.batches}
        if self.verify:
            if job.source not in self.reference:
                self.reference.clear()  # one reference session at a time
                # the inputs before the session's memory
                check_inputs = _check_inputs(root, self.manifest, job, self.samples)
                session = make_session(root / job.source, optimization="extended", arena=False)
                self.reference[job.source] = (session, check_inputs)
            for b in job.batches:  # every profile of the engine, at its batch size
                diffs[b] = _check_engine(backend, root / job.path, *self.reference[job.source], job,
                                         self.precision, batch=b, profile=job.profile(backend, b))
        if not self.measure:
            return diffs, None
        onnx = self._onnx_runner(job.source)
        feeds = self._speed_feeds(job, onnx)
        with backend.load(root / job.path) as runner:
            e_ms, o_ms = time_pair(runner, onnx, feeds)
        return diffs, speed_record(e_ms, o_ms, self.margin)

    def record(self, job: Job, diffs: dict, speed: dict | None, seconds: float,
               report: BuildReport) -> None:
        """Record the engine of ``job`` for each (split, part) and batch size it serves: kept in
        ``manifest.engines``, or dropped (its file removed) in ``manifest.dropped``."""
        root, backend, precision = self.root, self.backend, self.precision
        keep = speed is None or speed["kept"]
        sha = sha256_file(root / job.path) if keep else ""
        data = engine_data(root, job.path) if keep else []
        if not keep:
            (root / job.path).unlink(missing_ok=True)
            self.log(f"{Path(job.path).name}: dropped, {speed['engine_ms']:.1f} ms against "
                     f"{speed['onnx_ms']:.1f} ms for the ONNX (not {self.margin:.0%} faster); the ONNX "
                     f"runs at batch {job.batch}")
        manifest = self.manifest
        for b in job.batches:
            for sid, part in job.records:
                key = (sid, part, backend.name, b, precision)
                manifest.engines = [e for e in manifest.engines if engine_key(e) != key]
                manifest.dropped = [e for e in manifest.dropped if engine_key(e) != key]
                abs_diff, rel_diff = diffs[b]
                rec = Engine(split=sid, part=part, backend=backend.name, batch=b,
                             precision=precision, path=job.path, sha256=sha, target=dict(self.target),
                             source=job.source, source_sha256=manifest.files[job.source],
                             options=dict(self.opts), seconds=round(seconds, 3), max_abs_diff=abs_diff,
                             max_rel_diff=rel_diff, data=data, speed=speed,
                             profile=job.profile(backend, b))
                (manifest.engines if keep else manifest.dropped).append(rec)
                (report.built if keep else report.dropped).append(rec)

    def _onnx_runner(self, source: str) -> Runner:
        """The active runner of the dynamic ONNX ``source`` (the previous one deactivated)."""
        if source not in self.onnx_runner:
            self.close()
            self.onnx_runner[source] = self.backend.load_onnx(self.root / source)
            self.onnx_runner[source].activate()
        return self.onnx_runner[source]

    def _speed_feeds(self, job: Job, onnx: Runner) -> dict:
        """One batch of ``job.batch`` for timing an engine: the verification's inputs where there
        were any, else random within the source's ranges."""
        inputs = (self.reference[job.source][1] if job.source in self.reference
                  else _check_inputs(self.root, self.manifest, job, self.samples))
        wanted = {t.name for t in onnx.inputs}
        return {name: x for name, x in inputs.feeds(job.batch).items() if name in wanted}

    def close(self) -> None:
        """Deactivate the ONNX runner kept for timing."""
        for r in self.onnx_runner.values():
            r.deactivate()
        self.onnx_runner.clear()


def build_engines(
    split_dir: str | os.PathLike,
    backend_name: str = "onnxruntime",
    *,
    batch_sizes: list[int] = (1,),
    parts: str = "all",
    precision: str = "fp32",
    options: BackendOptions | BuildOptions | None = None,
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
        options: build options: the backend's own (e.g. ``TensorrtOptions``), or a
            :class:`BuildOptions` it picks them from [default: the backend's defaults].
        verify: check each new engine against its ONNX at its batch size.
        progress: called as ``progress(done, total, label)`` before each engine.
        log: progress messages.
        inputs: a ``.npz`` or a folder of images (see
            :meth:`dsc_export.inputs.SampleInputs.from_path`) that the checks and timings of the
            whole model and the heads run on; a tail is fed its head's outputs on them
            (:mod:`dsc_export.feeds`). None: random model inputs within the graph's ranges.
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
    root, manifest, backend, options, opts, jobs = prepare_build(
        split_dir, backend_name, parts, batch_sizes, precision, options, log)
    samples = None
    if inputs is not None and not verify:
        log(f"--inputs {inputs} is not used: --no-verify skips the engine checks")
    elif inputs is not None:  # a bad --inputs is refused before anything is built
        model = load_model(root / manifest.model.path, load_data=False)
        samples = SampleInputs.from_path(inputs, model)
    target = backend.target()
    report = BuildReport()
    t_all = time.perf_counter()
    run = _Build(root, manifest, backend, options, opts, precision, target, samples, verify,
                 measure=not keep_all and backend.runs_onnx, margin=margin, log=log)
    dropped = {engine_key(e): e for e in manifest.dropped}
    for k, job in enumerate(jobs):
        progress(k, len(jobs), f"{Path(job.path).name}")
        source_sha = manifest.files[job.source]
        recs = [(manifest.engine(sid, part, backend.name, b, precision), job.profile(backend, b))
                for b in job.batches for sid, part in job.records]
        if all(_up_to_date(r, root, job, source_sha, opts, target["version"]) and r.profile == prof
               for r, prof in recs):
            report.kept.extend(r for r, _ in recs)
            continue
        gone = [dropped.get((sid, part, backend.name, job.batch, precision))
                for sid, part in job.records]
        if run.measure and all(_dropped_up_to_date(r, job, source_sha, opts, target["version"])
                               for r in gone):
            report.dropped.extend(gone)
            continue
        t0 = time.perf_counter()
        try:
            diffs, speed = run.build_one(job)
        except MemoryError:
            (root / job.path).unlink(missing_ok=True)
            report.failed.append((job, "out of host memory"))
            log(f"out of host memory building {job.path}; the other engines go on")
            continue
        except UserError as exc:
            (root / job.path).unlink(missing_ok=True)
            report.failed.append((job, str(exc)))
            log(f"{job.path}: {exc}")
            continue
        run.record(job, diffs, speed, time.perf_counter() - t0, report)
        write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    run.close()
    _prune_weights(root, manifest)
    progress(len(jobs), len(jobs), "done")
    report.seconds = time.perf_counter() - t_all
    return report


def _check_inputs(root: Path, manifest: Manifest, job: Job, samples):
    """What an engine of ``job.source`` is checked and timed on (:class:`dsc_export.feeds.PartFeeds`):
    the model's sample inputs (the user's, else random) for the whole model and the heads, the
    head's outputs on them for a tail (computed now, before the caller's sessions load)."""
    sid, part = job.records[0]  # every record of one source reads the same input
    feeds = PartFeeds(root, manifest, sid, part, model_samples(root, manifest, samples))
    return feeds.prepare(job.batches)


def _check_engine(backend: Backend, engine: Path, reference, inputs, job: Job, precision: str, *,
                  batch: int, profile: int | None = None) -> tuple[float, float]:
    """Run the engine (``profile``: the optimisation profile serving ``batch``, or None) and its
    ONNX on one batch of ``batch`` from ``inputs`` (a PartFeeds); refuse a mismatch.

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
