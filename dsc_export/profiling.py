"""Profiling: time every engine of one role at every batch size and write a profile.

The device role times the heads (and the whole model, for ``local``), the server role the tails
(and the whole model, for ``offload``), as the paper measures the head on a weak device and the
tail on a strong server (Section 4: one GPU underclocked to 300 MHz, and at full speed). Each
figure is the median of repeated runs after a warm-up, on what the part really receives
(:mod:`dsc_export.feeds`): the heads and the whole model the model's sample inputs, a tail its
head's outputs on them (a wire form's float16 or int8 cut, a quantized model's uint8 cut, an
int64 mask: their own dtype and values), a few distinct batches cycled. A GPU engine is timed
with device events around its execution. An offload codec form (``offload-jpeg95``:
:mod:`dsc_export.offload`) has its encoder as its head on the device and its decoder plus the
whole model as its tail on the server, both timed on real photos (a codec's time depends on the
picture).

Standing in for a weak device is recorded in the profile's ``emulation`` field, so an emulated
figure can never pass for a measured one: fewer threads than cores, GPU clocks locked through
NVML (on a GPU the user owns, as root; restored afterwards whatever happens), or an explicit
slowdown factor applied to the measured times.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.artifacts import ROLES, Profile, Timing, read_manifest, verify_files
from dsc_export.backends.cuda import gpu_facts, text
from dsc_export.engines.runtime import load_part
from dsc_export.errors import UserError
from dsc_export.feeds import PartFeeds, model_samples
from dsc_export.offload import codec_images, codec_timer, form_of, layout_of
from dsc_export.ort import cpu_isa, cpu_name

NOISY_SPREAD = 1.5  # p90 / p10 above this: the median is not to be trusted
FEED_BATCHES = 4  # distinct input batches per part and batch size, cycled through the timed runs
FEED_BYTES = 256 << 20  # ... fewer where they would hold more than this


@dataclass
class Measurement:
    """The times of repeated runs of one thing, in ms."""

    samples_ms: list[float]

    @property
    def median(self) -> float:
        """The median time, ms."""
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0-1) of the times, ms."""
        return float(np.quantile(self.samples_ms, q))


def measure(run_once_ms: Callable[[], float], *, warmup: int = 3, repeats: int | None = 20,
            min_time_s: float | None = None, max_runs: int = 10_000) -> Measurement:
    """Time a workload: ``warmup`` untimed runs, then ``repeats`` timed runs, or as many as fit
    in ``min_time_s`` seconds of measured time (at least 5).

    Args:
        run_once_ms: runs the workload once and returns its time in milliseconds (the caller
            decides what is timed: wall clock around the run, or device events).
        warmup: runs before timing starts.
        repeats: number of timed runs (ignored when ``min_time_s`` is given).
        min_time_s: keep running until this much measured time has accumulated.
        max_runs: a cap for ``min_time_s`` with a very fast workload.
    """
    for _ in range(max(0, warmup)):
        run_once_ms()
    samples: list[float] = []
    if min_time_s is not None:
        total = 0.0
        while (total < min_time_s * 1e3 or len(samples) < 5) and len(samples) < max_runs:
            samples.append(run_once_ms())
            total += samples[-1]
    else:
        for _ in range(max(1, repeats or 1)):
            samples.append(run_once_ms())
    return Measurement(samples)


# --- what runs where -------------------------------------------------------------------------

def role_parts(manifest, role: str) -> list[tuple[str, str]]:
    """(split id, part) pairs a role times: device -> heads (local = whole model), server -> tails.

    Raises:
        UserError: ``role`` is not ``device`` or ``server``.
    """
    if role not in ROLES:
        raise UserError(f"--role must be device or server, not '{role}'")
    part = "head" if role == "device" else "tail"
    return [(sid, part) for sid, _ in manifest.parts(part)]


# --- the host --------------------------------------------------------------------------------

def host_info(threads: int | None, backend: str) -> dict[str, Any]:
    """CPU model, cores, threads used and, where there is a GPU, its name and current clocks."""

    host: dict[str, Any] = {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(),
                            "threads": threads or os.cpu_count(), "hostname": platform.node(),
                            "platform": platform.platform(), "backend": backend}
    gpu = gpu_facts()
    if gpu:
        host["gpu"] = gpu
    try:
        import onnxruntime

        host["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return host


# --- GPU clock locking (the paper's underclocked GPU, on the user's own GPU) -------------------

def _is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists() or "tegra" in platform.release().lower()


@contextlib.contextmanager
def locked_gpu_clocks(mhz: int, index: int = 0, nvml=None) -> Iterator[dict[str, Any]]:
    """Lock the GPU's SM clock to ``mhz`` while the block runs; always reset it afterwards.

    The reset runs on normal exit, on an exception, on Ctrl-C and on SIGTERM (turned into an
    exception while the lock is held). Refused without root and on Jetson, where ``nvpmodel``
    and ``jetson_clocks`` are the tools.

    Args:
        mhz: the SM clock to lock to (the paper: 300 MHz).
        index: GPU index.
        nvml: the NVML module (tests pass a fake; default ``pynvml`` from nvidia-ml-py).

    Yields:
        The emulation record: ``{"gpu_clock_mhz": mhz, "gpu": name}``.

    Raises:
        UserError: on Jetson, without root, without NVML bindings, or NVML refuses the clocks.
        KeyboardInterrupt: on SIGTERM while the clocks are locked (the clocks are reset as it propagates).
    """
    if _is_jetson():
        raise UserError("--lock-gpu-clocks does not apply to Jetson: set the clocks with nvpmodel and "
                        "jetson_clocks, then run bench without it")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise UserError("--lock-gpu-clocks needs root (NVML changes the GPU's clocks for every user); "
                        "run as root on a GPU you own, or use --slowdown / --threads")
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as exc:
            raise UserError("--lock-gpu-clocks needs NVML bindings: pip install nvidia-ml-py") from exc
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    locked = False
    try:
        signal.signal(signal.SIGTERM, on_term)
        try:
            nvml.nvmlDeviceSetGpuLockedClocks(handle, int(mhz), int(mhz))
        except Exception as exc:
            raise UserError(f"NVML refused to lock the GPU clocks at {mhz} MHz: {exc}") from exc
        locked = True
        yield {"gpu_clock_mhz": int(mhz), "gpu": text(nvml.nvmlDeviceGetName(handle))}
    finally:
        try:
            if locked:
                nvml.nvmlDeviceResetGpuLockedClocks(handle)
        finally:
            signal.signal(signal.SIGTERM, previous)
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()


# --- profiling a split dir -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What ``bench`` times and how (in the style of PyTriton's ``TritonConfig``).

    Args:
        backend_name: which engines to time.
        batch_sizes: default every batch size built for this role.
        precision: which engines (``fp32`` / ``fp16``).
        warmup, repeats, min_time_s: see :func:`measure`.
        threads: intra-op threads for CPU engines (fewer than the cores: recorded as emulation).
        slowdown: multiply every measured time by this factor (a labelled what-if).
        lock_gpu_clocks_mhz: lock the GPU's SM clock while measuring (root, not Jetson).
        seed: seed of the random sample inputs.
        inputs: the model's sample inputs (a ``.npz`` or a folder of images, see
            :meth:`dsc_export.inputs.SampleInputs.from_path`) [default: random within the ranges
            the graph implies]. Every part is timed on what it receives
            (:mod:`dsc_export.feeds`): a tail on its head's outputs on them.
        rounds: measure every figure in this many interleaved rounds (repeats and min time split
            between them) so slow drift and bursts of noise on a shared machine spread over all
            figures instead of landing on a few.

    Raises:
        UserError: a non-positive slowdown, or fewer than 1 thread.
    """

    backend_name: str = "onnxruntime"
    batch_sizes: list[int] | None = None
    precision: str = "fp32"
    warmup: int = 3
    repeats: int | None = 20
    min_time_s: float | None = None
    threads: int | None = None
    slowdown: float | None = None
    lock_gpu_clocks_mhz: int | None = None
    seed: int = 0
    rounds: int = 1
    inputs: str | os.PathLike | None = None

    def __post_init__(self):
        if self.slowdown is not None and not self.slowdown > 0:
            raise UserError("--slowdown must be a positive factor, e.g. 4 for a device 4x slower")
        if self.threads is not None and self.threads < 1:
            raise UserError("--threads must be at least 1")


def profile_split_dir(
    split_dir: str | os.PathLike,
    role: str,
    options: BenchOptions | None = None,
    *,
    progress: Callable[[int, int, str], None] = lambda done, total, label: None,
    **settings,
) -> Profile:
    """Time every engine of ``role`` in a split dir at every batch size (where build dropped an
    engine that did not pay, the ONNX the runner uses instead).

    Args:
        split_dir: a split dir with engines built for this role and backend.
        role: ``device`` (heads + whole model) or ``server`` (tails + whole model).
        options: what to time and how; default :class:`BenchOptions`'s defaults.
        progress: ``progress(done, total, label)``.
        settings: :class:`BenchOptions` fields, given here instead of (or over) ``options``.

    Returns:
        The profile (not yet written).

    Raises:
        UserError: a non-positive slowdown, fewer than 1 thread, or an engine missing for a
            part and batch size to time.
    """

    o = replace(options or BenchOptions(), **settings)
    backend_name, precision, threads, slowdown = o.backend_name, o.precision, o.threads, o.slowdown
    warmup, repeats, min_time_s, rounds = o.warmup, o.repeats, o.min_time_s, o.rounds
    root = Path(split_dir)
    manifest = read_manifest(root)
    pairs = role_parts(manifest, role)
    built = sorted({e.batch for e in manifest.engines + manifest.dropped if e.backend == backend_name
                    and e.precision == precision and (e.split, e.part) in pairs})
    batch_sizes = o.batch_sizes or built
    missing = [(sid, part, b) for b in batch_sizes for sid, part in pairs
               if manifest.engine(sid, part, backend_name, b, precision) is None
               and manifest.dropped_engine(sid, part, backend_name, b, precision) is None]
    if missing:
        sizes = ",".join(str(b) for b in sorted({m[2] for m in missing}))
        parts = "heads" if role == "device" else "tails"
        raise UserError(f"no {backend_name} {precision} engine for {missing[0][0]}/{missing[0][1]} at batch "
                        f"{missing[0][2]} ({len(missing)} missing); run: dsc-export build {root} --backend "
                        f"{backend_name} --parts {parts} --batch-sizes {sizes}"
                        + (f" --precision {precision}" if precision != "fp32" else ""))
    verify_files(manifest, root, list(dict.fromkeys([manifest.model.path] + [
        e.source for e in manifest.dropped if e.backend == backend_name and (e.split, e.part) in pairs])))

    emulation: dict[str, Any] = {}
    cores = os.cpu_count() or 1
    if threads is not None and threads < cores and backend_name == "onnxruntime":
        emulation["threads"] = threads
        emulation["of_cores"] = cores
    if slowdown is not None and slowdown != 1:
        emulation["slowdown"] = float(slowdown)

    # what each part really receives (a tail: its head's outputs), a few batches each, cycled
    sample_inputs = model_samples(root, manifest, o.inputs, o.seed)
    rng = np.random.default_rng(o.seed)  # the codecs' draws of photos
    batches_of = {(sid, part): feeds_for(root, manifest, sid, part, sample_inputs, batch_sizes)
                  for sid, part in pairs if not form_of(manifest.split(sid))}

    # offload codec forms: the encoder is the head (no engine), decode + whole model the tail
    codec = {s.id: form_of(s) for s in manifest.splits if form_of(s)}
    if codec:
        images, codec_what = codec_images(manifest.model.input)
        layout = layout_of(manifest)
    if role == "device":
        pairs = pairs + [(sid, "head") for sid in codec]
    timings: list[Timing] = []
    jobs = [(sid, part, b) for b in batch_sizes for sid, part in pairs]
    rounds = max(1, int(rounds))
    per_repeats = None if repeats is None else max(1, -(-repeats // rounds))
    per_time = None if min_time_s is None else min_time_s / rounds
    samples: dict[tuple[str, str, int], list[float]] = {j: [] for j in jobs}
    mhz = o.lock_gpu_clocks_mhz
    lock = locked_gpu_clocks(mhz) if mhz else contextlib.nullcontext(None)
    with lock as locked:
        if locked:
            emulation.update(locked)
        for rnd in range(rounds):  # a burst of noise then touches one round of every figure, not one figure
            for k, (sid, part, b) in enumerate(jobs):
                progress(rnd * len(jobs) + k, rounds * len(jobs), f"{sid}/{part} b{b}")
                # an engine build dropped: its ONNX, as the runner does; a codec has its own timer
                ring = batches_of.get((sid, part), {}).get(b)
                turn = iter(range(1 << 62))
                with (contextlib.nullcontext() if sid in codec else
                      load_part(root, manifest, sid, part, backend_name, b, precision, threads)) as runner:
                    def once(runner=runner, ring=ring, turn=turn) -> float:
                        return runner.time_ms(ring[next(turn) % len(ring)])

                    if sid in codec:
                        once = codec_timer(codec[sid], layout, images, b, rng, side=role)

                    m = measure(once, warmup=warmup if rnd == 0 else min(warmup, 1), repeats=per_repeats,
                                min_time_s=per_time)
                samples[(sid, part, b)].extend(m.samples_ms)
        scale = float(slowdown) if slowdown else 1.0
        for (sid, part, b), xs in samples.items():
            m = Measurement(xs)
            # a codec's tail: its decode + the whole model as timed for offload (one figure for the
            # engine every offload form shares, so noise cannot rank the forms by the model's time)
            whole = Measurement(samples[("offload", part, b)]) if part == "tail" and sid in codec else None
            add = (lambda q, whole=whole: whole.quantile(q)) if whole else (lambda q: 0.0)
            timings.append(Timing(split=sid, part=part, batch=b, median_ms=(m.median + add(0.5)) * scale,
                                  p10_ms=(m.quantile(0.1) + add(0.1)) * scale,
                                  p90_ms=(m.quantile(0.9) + add(0.9)) * scale, runs=len(xs)))
        progress(rounds * len(jobs), rounds * len(jobs), "done")
    return Profile(
        role=role, backend=backend_name, host=host_info(threads, backend_name), emulation=emulation or None,
        model_sha256=manifest.model.sha256, timings=timings, precision=precision,
        settings={"warmup": warmup, "repeats": None if min_time_s else repeats, "min_time_s": min_time_s,
                  "rounds": rounds,
                  "seed": o.seed,
                  "inputs": f"what each part receives: the model's sample inputs "
                            f"({sample_inputs.description}) for the heads and the whole model, "
                            f"the head's outputs on them for a tail; up to {FEED_BATCHES} "
                            "batches per part and batch size, cycled",
                  **({"codec_inputs": f"offload forms {', '.join(codec.values())}: a fresh draw per "
                      f"run of {codec_what}"} if codec else {}),
                  "timer": "device events" if backend_name == "tensorrt" else "wall clock around the run"},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def feeds_for(root: Path, manifest, split_id: str, part: str, samples, batch_sizes: list[int],
              limit_bytes: int = FEED_BYTES) -> dict[int, list[dict[str, np.ndarray]]]:
    """Up to :data:`FEED_BATCHES` distinct batches per batch size of what ``part`` of
    ``split_id`` receives (:class:`dsc_export.feeds.PartFeeds`), fewer where they would hold more
    than ``limit_bytes`` (at least one). The head that feeds a tail is freed before returning."""
    feeds = PartFeeds(root, manifest, split_id, part, samples)
    out = {}
    for b in batch_sizes:
        first = feeds.feeds(b, 0)
        size = sum(x.nbytes for x in first.values()) or 1
        out[b] = [first] + [feeds.feeds(b, k) for k in range(1, max(1, min(FEED_BATCHES, limit_bytes // size)))]
    feeds.release()
    return out


def noisy(profile: Profile, limit: float = NOISY_SPREAD) -> list[Timing]:
    """Timings whose spread p90/p10 exceeds ``limit``."""
    return [t for t in profile.timings if t.p10_ms > 0 and t.p90_ms / t.p10_ms > limit]
