"""The ``dsc-export`` command line: thin verbs over the library.

Every verb parses, calls one library function and prints. A user error is one line on stderr
and exit status 1; never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from dsc_export import __version__
from dsc_export.artifacts import (
    PRECISIONS,
    ROLES,
    WIRE_DTYPES,
    read_manifest,
    read_profile,
    sha256_file,
    write_json_atomic,
)
from dsc_export.backends import BACKENDS, BuildOptions, get_backend
from dsc_export.bundle import (
    PLATFORMS,
    TRITON_BACKENDS,
    describe_sizes,
    make_bundle,
    open_bundle,
    side_sizes_of_split,
)
from dsc_export.engines import (
    PARTS,
    build_engines,
    engine_batch_sizes,
    import_engines,
    parse_batch_sizes,
)
from dsc_export.engines import emit_trtexec as write_trtexec
from dsc_export.errors import UserError

ENGINES_ROOT = Path("engines")


def _log(msg: str) -> None:
    click.secho(f"· {msg}", err=True, fg="bright_black")


def _note(msg: str) -> None:
    """Progress messages of the library; its ``note: ...`` lines stand out in yellow."""
    if msg.startswith("note: "):
        click.secho(msg, err=True, fg="yellow")
    else:
        _log(msg)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Example (the whole offline pipeline so far):
  dsc-export export efficientnet_b0 -o engines/efficientnet_b0/efficientnet_b0.onnx
  dsc-export analyze engines/efficientnet_b0/efficientnet_b0.onnx --plot b0.png
  dsc-export split engines/efficientnet_b0/efficientnet_b0.onnx""",
)
@click.version_option(__version__, prog_name="dsc-export")
def cli() -> None:
    """Dynamic split computing for ONNX image models.

    Cut a model at its compressive natural bottlenecks into head (device) and tail (server)
    models, each verified numerically against the whole model.
    """


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def models_cmd(as_json: bool) -> None:
    """List the supported EfficientNets (V1 B0-B7, V2 B0-B3, S, M, L).

    \b
    Example:
      dsc-export models
    """
    from dsc_export.zoo import CATALOGUE

    if as_json:
        click.echo(json.dumps([asdict(e) for e in CATALOGUE.values()], indent=2))
        return
    rows = [("name", "family", "timm model", "resolution", "mean", "std")]
    for e in CATALOGUE.values():
        rows.append((e.name, e.family, e.timm_name, str(e.resolution),
                     ",".join(f"{m:g}" for m in e.mean), ",".join(f"{s:g}" for s in e.std)))
    _table(rows)


def _table(rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        line = "  ".join(cells).rstrip()
        click.secho(line, bold=(k == 0))


@cli.command("export")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX file to write [default: engines/NAME/NAME.onnx].")
@click.option("--resolution", type=int, help="Square input size in pixels [default: the model's].")
@click.option("--weights", type=click.Path(path_type=Path),
              help="PyTorch checkpoint: a state dict in timm's naming, or EfficientNet-PyTorch's (mapped by "
                   "order, every shape checked). Default: random weights with re-estimated BatchNorm "
                   "statistics; nothing is downloaded.")
@click.option("--pretrained", is_flag=True,
              help="Trained ImageNet weights from the installed package the catalogue names "
                   "(efficientnet_lite0; the 'weights' extra).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (13 or newer).")
@click.option("--float-input", is_flag=True,
              help="Take normalised float32 NCHW instead of the raw uint8 NHWC image.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime-vs-torch check.")
def export_cmd(name, output, resolution, weights, pretrained, opset, float_input, no_verify) -> None:
    """Export a catalogue model to ONNX with a dynamic batch dimension.

    The exported model takes the raw image, uint8 [N, H, W, 3] (RGB), and normalises it inside
    the graph, so offloading sends 8-bit images; it outputs float32 logits [N, 1000]. The ONNX
    output is checked against torch at batch sizes 1 and 3.

    \b
    Example:
      dsc-export export efficientnet_b0 -o engines/efficientnet_b0/efficientnet_b0.onnx
      dsc-export export efficientnetv2_s --resolution 300 --float-input
      dsc-export export efficientnet_lite0 --pretrained
      dsc-export export efficientnet_b0 --weights efficientnet-b0.pth
    """
    from dsc_export.export import export_model
    from dsc_export.zoo import lookup

    entry = lookup(name)
    output = output or ENGINES_ROOT / entry.name / f"{entry.name}.onnx"
    rep = export_model(entry.name, output, resolution=resolution, weights=str(weights) if weights else None, opset=opset,
                       float_input=float_input, verify=not no_verify, log=_log, pretrained=pretrained)
    click.echo(f"wrote {rep.path}  ({rep.file_bytes / 1e6:.1f} MB, {rep.seconds:.1f} s)")
    click.echo(f"  model   {rep.entry.name} ({rep.entry.timm_name}), weights: {rep.weights}")
    click.echo(f"  input   image  {rep.input_dtype} {rep.input_shape}")
    click.echo("  output  logits float32 ['N', 1000]")
    for b, (a, r) in rep.diffs.items():
        click.echo(f"  verify  batch {b}: max abs diff {a:.2e}, relative {r:.2e} (onnxruntime vs torch)")


def _wire_option(f):
    return click.option("--wire-dtype", type=click.Choice(WIRE_DTYPES), default=WIRE_DTYPES[0],
                        show_default=True,
                        help="dtype of cut tensors on the wire (float16: the head casts down, "
                             "the tail casts back).")(f)


def _wires_option(f):
    return click.option("--wire", "wires", metavar="FORM[,FORM...]",
                        help="Wire forms of every cut, each at its own compressive bottlenecks (Eq. 3 on "
                             "its bytes): float32 (as it is), float16 (Cast down / back), int8 "
                             "(QuantizeLinear / DequantizeLinear, per-tensor affine, calibrated on the "
                             "first half of --inputs, measured on the rest). E.g. --wire "
                             "float32,float16,int8 [default: --wire-dtype alone].")(f)


def _parse_wires(wires: str | None, wire_dtype: str) -> list[str]:
    if not wires:
        return [wire_dtype]
    if wire_dtype != WIRE_DTYPES[0]:
        raise UserError("give --wire FORM,... or --wire-dtype, not both")
    return [w.strip() for w in wires.split(",") if w.strip()]


def _inputs_option(what: str):
    def deco(f):
        return click.option(
            "--inputs", type=click.Path(path_type=Path), metavar="FILE.npz|DIR",
            help=f"Sample inputs for {what} instead of random ones: a .npz of arrays by input name, each "
                 "[K, *per-sample shape], or a folder of images (.jpg .jpeg .png .bmp) resized to the model's input "
                 "(uint8 as they are, float scaled to [0, 1] and ImageNet-normalised). "
                 "E.g. --inputs tokens.npz or --inputs photos/. [default: random, within the ranges the "
                 "graph implies]")(f)
    return deco


@cli.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@_wire_option
@_wires_option
@_inputs_option("sizing the cut points")
@click.option("--json", "as_json", is_flag=True, help="Print the cut points as JSON (manifest fields).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the compression-ratio chart to this PNG.")
@click.option("--all/--bottlenecks", "show_all", default=True, show_default=True,
              help="List every cut point, or only the natural bottlenecks.")
def analyze_cmd(model, wire_dtype, wires, inputs, as_json, plot, show_all) -> None:
    """Find the cut points of an ONNX model and its natural and compressive bottlenecks.

    A cut point is a tensor every input->output path passes through; its compression ratio is
    its bytes on the wire over the input's bytes. Natural: ratio < 1. Compressive: smaller than
    every earlier cut point (paper Eq. 3).

    \b
    Example:
      dsc-export analyze engines/efficientnet_b0/efficientnet_b0.onnx --plot b0.png
      dsc-export analyze model.onnx --wire-dtype float16 --json > cuts.json
      dsc-export analyze model.onnx --wire float32,float16,int8
      dsc-export analyze text-model.onnx --inputs tokens.npz
    """
    from dsc_export.splitting import analyze_file

    forms = _parse_wires(wires, wire_dtype)
    an = analyze_file(model, wire_dtype=forms[0], log=_log if not as_json else (lambda s: None), inputs=inputs,
                      forms=forms)
    if plot:
        from dsc_export.plots import bottleneck_chart

        bottleneck_chart(an, plot)
    if as_json:
        click.echo(json.dumps({
            "model": str(model), "input": asdict(an.input), "input_bytes": an.input_bytes,
            "wire_dtype": forms[0], "wires": forms, "cut_points": [asdict(c) for c in an.cut_points],
            "notes": an.notes,
        }, indent=2))
        return
    click.echo(f"{model}: input {an.input.name} {an.input.dtype} {an.input.shape} "
               f"= {an.input_bytes:,} bytes per sample; wire {', '.join(forms)}")
    several = len(forms) > 1  # bytes and ratio of the first form; compressive: in which forms (Eq. 3 each)
    rows = [("#", "tensor", "shape", "bytes", "ratio", "elem ratio", "natural", "compressive", "scope")]
    for c in an.cut_points:
        if not show_all and not any(f["natural"] for f in c.forms.values()):
            continue
        comp = ",".join(f for f in forms if c.forms[f]["compressive"]) if several else (
            "YES" if c.compressive else "")
        rows.append((str(c.index), _short(c.tensor), "x".join(map(str, c.shape)) or "scalar",
                     f"{c.bytes:,}", f"{c.ratio:.4f}", f"{c.element_ratio:.4f}",
                     "yes" if c.natural else "", comp, c.scope or ""))
    _table(rows, right={0, 3, 4, 5})
    for n in an.notes:
        click.secho(f"note: {n}", fg="yellow")
    click.echo(f"{an.summary()}  ({an.seconds:.2f} s)")
    if plot:
        click.echo(f"wrote {plot}")


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


@cli.command("split")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Split dir to write [default: engines/MODEL_STEM/split].")
@_wire_option
@_wires_option
@click.option("--per-channel", is_flag=True,
              help="int8: one scale per channel (axis 1) where it beats per-tensor on the held-out inputs.")
@click.option("--int8-symmetric", "symmetric", is_flag=True,
              help="int8: zero point 0 (what TensorRT's QuantizeLinear takes) instead of affine.")
@click.option("--at", "at", multiple=True, metavar="TENSOR",
              help="Cut at this cut point instead of the compressive bottlenecks (repeatable).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check tail(head(x)) against the whole model with onnxruntime.")
@_inputs_option("sizing and verification")
@click.option("--offload", "offload", metavar="FORMS",
              help="Offload forms to race too, comma-separated: raw (always), png, webp (lossless), "
                   "jpegNN (JPEG at quality NN, 1..100: lossy, its top-1 agreement is measured), "
                   "e.g. --offload raw,jpeg95. Needs a uint8 image input (dsc-export export's "
                   "default). [default: raw]")
def split_cmd(model, out, wire_dtype, wires, per_channel, symmetric, at, verify, inputs, offload) -> None:
    """Cut a model into head and tail ONNX models at each compressive bottleneck.

    Writes DIR/manifest.json (schema dsc-export.split/3), DIR/model.onnx (the whole model, for
    the offload and local candidates), DIR/head-<id>.onnx and DIR/tail-<id>.onnx, their weights
    once in DIR/weights/ (named by their sha256; build's onnxruntime engines share it). Every split
    is verified (sample inputs, random by default, at batch sizes 1 and 3; a NaN or inf is a
    failure); a mismatch is an error and nothing is written. What split finds and does on the
    way is printed as notes: a model that runs at one batch size only (split and built at it), a
    result that depends on the rest of the batch (never merged by a server), cut points that
    overflow a float16 wire (left out). An output no server can answer per request is refused.

    With --wire, every cut gets each wire form it pays in (ids cutNNN, cutNNN-float16,
    cutNNN-int8), and every split its fidelity: top-1 agreement with the whole model on raw
    held-out inputs (the half of --inputs that did not calibrate int8), max abs/rel difference.
    int8 is lossy: its error is recorded, not refused; plan admits it with --min-agreement.

    \b
    Example:
      dsc-export split engines/efficientnet_b0/efficientnet_b0.onnx
      dsc-export split model.onnx --wire float32,float16,int8 --inputs photos/
      dsc-export split model.onnx -o out/split --wire-dtype float16
      dsc-export split model.onnx --at /blocks/blocks.3/blocks.3.2/Add_output_0
      dsc-export split model.onnx --inputs photos/      # verify on your own images
      dsc-export split model.onnx --inputs photos/ --offload raw,png,jpeg95
    """
    from dsc_export.splitting import split_model

    out = out or ENGINES_ROOT / model.stem / "split"
    forms = _parse_wires(wires, wire_dtype)
    man = split_model(model, out, wire_dtype=forms[0], wires=forms, per_channel=per_channel, symmetric=symmetric,
                      at=list(at) or None, verify=verify, log=_log, inputs=inputs,
                      offload=[offload] if offload else None)
    rows = [("split", "kind", "wire", "bytes/sample", "ratio", "max abs diff", "agreement", "head", "tail")]
    for s in man.splits:
        agree = (s.fidelity or {}).get("top1_agreement")
        rows.append((s.id, s.kind, s.wire or "-", f"{s.bytes:,}", f"{s.ratio:.4f}" if s.ratio is not None else "",
                     "-" if s.max_abs_diff is None else f"{s.max_abs_diff:.1e}",
                     "-" if agree is None else f"{agree:.3f}", s.head or "-", s.tail or "-"))
    _table(rows, right={3, 4, 5, 6})
    held = next((s.fidelity["samples"] for s in man.splits if s.fidelity), None)
    if man.samples and held:
        click.echo(f"agreement: top-1 against the whole model on {held} held-out input(s) "
                   f"({man.samples['source']}; int8 calibrated on the other part)")
    n = sum(1 for s in man.splits if s.kind == "split")
    verdict = "verified" if verify else "NOT verified (--no-verify)"
    for note in man.notes:
        click.secho(f"note: {note}", fg="yellow")
    click.echo(f"wrote {out}/manifest.json: {n} split(s) + offload + local, {verdict}")
    if n == 0 and not any("only candidates are offload" in note for note in man.notes):
        click.secho("note: no compressive bottleneck; only offload and local are possible", fg="yellow")


@contextlib.contextmanager
def _progress(label: str):
    """A ``progress(done, total, item)`` callback whose bar appears on its first call, so that the
    library's checks (a bad dir, a missing backend or engine) fail as one line before any bar."""
    state = {}

    def progress(done: int, total: int, item: str) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(length=max(total, 1), label=label, file=sys.stderr, show_pos=True,
                                             item_show_func=lambda x: x)
            state["bar"].__enter__()
        bar = state["bar"]
        bar.length = max(total, 1)
        bar.update(done - bar.pos, item)

    try:
        yield progress
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


def _batch_sizes(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_batch_sizes(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command("build")
@click.argument("split_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(BACKENDS),
              help="Engine backend.")
@click.option("--batch-sizes", "batch_sizes", default="1,2,4,8,16,32,64", show_default=True, callback=_batch_sizes,
              help="Batch sizes: a list (1,2,4), a range (1-16) or powers of two (1:64).")
@click.option("--parts", type=click.Choice(PARTS), default="all", show_default=True,
              help="heads + whole model (device side), tails + whole model (server side), or all.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=PRECISIONS[0], show_default=True,
              help="fp16 converts the ONNX to float16 compute (inputs/outputs unchanged) before the build.")
@click.option("--workspace-mb", type=click.IntRange(min=1), default=4096, show_default=True,
              help="TensorRT workspace limit.")
@click.option("--version-compatible", is_flag=True, help="TensorRT: engines that later TensorRT versions can run.")
@click.option("--hardware-compatible", is_flag=True, help="TensorRT: engines for every Ampere-or-newer GPU.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check each new engine against its ONNX at its batch size.")
@click.option("--emit-trtexec", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the equivalent trtexec commands to this file instead of building.")
@click.option("--import", "import_", is_flag=True,
              help="Record engines built elsewhere (by the --emit-trtexec commands) instead of building.")
@_inputs_option("the engine checks of the whole model and the heads (tails: random)")
@click.option("--keep-all", is_flag=True,
              help="Keep every engine built, without timing it against its ONNX.")
@click.option("--margin", type=click.FloatRange(0, 0.9), default=0.05, show_default=True,
              help="Keep an engine only where it is faster than its ONNX by more than this fraction.")
def build_cmd(split_dir, backend, batch_sizes, parts, precision, workspace_mb, version_compatible,
              hardware_compatible, verify, emit_trtexec, import_, inputs, keep_all, margin) -> None:
    """Build an engine per (part, batch size) for a split dir and record it in the manifest.

    An engine is the optimised form of a head, a tail or the whole model for one batch size:
    for onnxruntime the model with its batch fixed and graph optimisations saved, for TensorRT a
    serialised .plan. onnxruntime engines go beside the parts
    (DIR/engine-onnxruntime-head-cut033-b8-fp32.onnx) and share the split dir's weights store
    (DIR/weights/) with them, so another batch size adds kilobytes; TensorRT plans go to
    DIR/engines/tensorrt/. Only what is missing or stale is built.
    Each engine is timed against its ONNX (medians, interleaved) and kept only where it is faster
    by more than --margin; elsewhere the ONNX runs (the decision is in the manifest).
    A model that runs at one batch size only (fixed_batch in the manifest) is built at that size
    alone, with a note naming the sizes left out.

    \b
    Example:
      dsc-export build engines/efficientnet_b0/split --batch-sizes 1,2,4,8
      dsc-export build DIR --backend tensorrt --parts heads --precision fp16
      dsc-export build DIR --parts heads --emit-trtexec build-heads.sh   # then, on the Jetson:
      sh build-heads.sh && dsc-export build . --backend tensorrt --parts heads --import
      dsc-export build DIR --inputs photos/   # check the engines on your own images
    """

    options = BuildOptions(workspace_mb=workspace_mb, version_compatible=version_compatible,
                           hardware_compatible=hardware_compatible)
    if emit_trtexec:
        n = write_trtexec(split_dir, emit_trtexec, batch_sizes=batch_sizes, parts=parts, precision=precision,
                          options=options, log=_note)
        click.echo(f"wrote {emit_trtexec}: {n} trtexec command(s); run it in {split_dir} on the target machine, "
                   "then dsc-export build --import there")
        return

    read_manifest(split_dir)  # not a split dir, a missing backend: one line before any progress bar
    get_backend(backend).check()
    if import_:
        rep = import_engines(split_dir, backend, batch_sizes=batch_sizes, parts=parts, precision=precision,
                             options=options, log=_note)
    else:
        with _progress("building") as progress:  # the bar appears after the checks (a bad --inputs: one line)
            rep = build_engines(split_dir, backend, batch_sizes=batch_sizes, parts=parts, precision=precision,
                                options=options, verify=verify, progress=progress, log=_note, inputs=None if inputs is None else str(inputs),
                                keep_all=keep_all, margin=margin)
    rows = [("engine", "batch", "for", "build s", "max rel diff")]
    seen = {}  # a TensorRT engine serves several batch sizes (one profile each)
    for e in rep.built:
        _, uses, batches = seen.setdefault(e.path, (e, {}, {}))
        uses[f"{e.split}/{e.part}"] = batches[e.batch] = None
    for path, (e, uses, batches) in seen.items():
        rows.append((path, ",".join(map(str, batches)), ",".join(uses), "" if e.seconds is None else f"{e.seconds:.2f}",
                     "" if e.max_rel_diff is None else f"{e.max_rel_diff:.1e}"))
    if len(rows) > 1:
        _table(rows, right={1, 3, 4})
    kept = len({e.path for e in rep.kept})
    verb = "imported" if import_ else "built"
    dropped = len({e.path for e in rep.dropped})
    click.echo(f"{verb} {len(seen)} engine(s), {kept} already up to date, {dropped} dropped (not faster than "
               f"the ONNX by {margin:.0%}), {len(rep.failed)} failed; recorded in {split_dir}/manifest.json")

    for side, sizes in side_sizes_of_split(split_dir).items():
        click.echo(describe_sizes(side, sizes))
    for job, why in rep.failed:
        click.secho(f"failed: {job.path}: {why}", fg="red", err=True)
    if rep.failed:
        sys.exit(1)


@cli.command("bench")
@click.argument("split_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="device: the heads and the whole model (local); server: the tails and the whole model (offload).")
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(BACKENDS))
@click.option("--batch-sizes", "batch_sizes", callback=_batch_sizes,
              help="Batch sizes to time [default: every size built for this role].")
@click.option("--precision", type=click.Choice(PRECISIONS), default=PRECISIONS[0], show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs first.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per figure.")
@click.option("--min-time", "min_time", type=click.FloatRange(min=0, min_open=True),
              help="Instead of --repeats: run until this many seconds were measured per figure.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Measure every figure in this many interleaved rounds (steadier on a shared machine).")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads per engine; fewer than the cores is recorded as emulation of a weaker device.")
@click.option("--slowdown", type=click.FloatRange(min=0, min_open=True),
              help="Multiply every measured time by K (a labelled what-if for a K-times slower device).")
@click.option("--lock-gpu-clocks", "lock_mhz", type=click.IntRange(min=1), metavar="MHZ",
              help="Lock this GPU's SM clock while measuring (root, your own GPU, not Jetson); restored after.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Profile to write [default: DIR/profiles/ROLE-BACKEND.json].")
def bench_cmd(split_dir, role, backend, batch_sizes, precision, warmup, repeats, min_time, rounds, threads, slowdown,
              lock_mhz, output) -> None:
    """Time every engine of one role at every batch size and write a profile.

    The device profile (heads) and the server profile (tails) may be taken on different
    machines and brought together by plan. Emulating a weak device (--threads below the core
    count, --lock-gpu-clocks, --slowdown) is recorded in the profile.

    \b
    Example:
      dsc-export bench engines/efficientnet_b0/split --role device --threads 1
      dsc-export bench engines/efficientnet_b0/split --role server -o server.json
      dsc-export bench DIR --role device --backend tensorrt --lock-gpu-clocks 300   # as root
    """
    from dsc_export.profiling import noisy, profile_split_dir

    if batch_sizes:
        batch_sizes, note = engine_batch_sizes(read_manifest(split_dir), batch_sizes)
        if note:
            _note(f"note: {note}")
    output = output or split_dir / "profiles" / f"{role}-{backend}.json"
    with _progress(f"timing the {role} side") as progress:
        prof = profile_split_dir(split_dir, role, backend_name=backend, batch_sizes=batch_sizes,
                                 precision=precision, warmup=warmup, repeats=None if min_time else repeats,
                                 min_time_s=min_time, threads=threads, slowdown=slowdown,
                                 lock_gpu_clocks_mhz=lock_mhz, rounds=rounds, progress=progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, prof.to_json())
    _profile_table(prof)
    bad = noisy(prof)
    if bad:
        worst = max(bad, key=lambda t: t.p90_ms / t.p10_ms)
        click.secho(f"warning: {len(bad)} figure(s) are noisy (p90/p10 up to {worst.p90_ms / worst.p10_ms:.2f} at "
                    f"{worst.split}/{worst.part} batch {worst.batch}); use more --repeats or --min-time, fewer "
                    "--threads, or a quieter machine", fg="yellow", err=True)
    label = "measured" if not prof.emulation else "EMULATED " + json.dumps(prof.emulation)
    click.echo(f"wrote {output} ({role}, {backend}, {label})")


def _profile_table(prof) -> None:
    rows = [("split", "part", "batch", "median ms", "p10", "p90", "p90/p10", "runs")]
    for t in prof.timings:
        rows.append((t.split, t.part, str(t.batch), f"{t.median_ms:.2f}", f"{t.p10_ms:.2f}", f"{t.p90_ms:.2f}",
                     f"{t.p90_ms / t.p10_ms:.2f}" if t.p10_ms else "-", str(t.runs)))
    _table(rows, right={2, 3, 4, 5, 6, 7})


@cli.command("plan")
@click.argument("split_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", "device_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Device profile (bench --role device).")
@click.option("--server", "server_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Server profile (bench --role server).")
@click.option("--batch-sizes", "batch_sizes", callback=_batch_sizes,
              help="Grid rows [default: 1-64 within the profiled range].")
@click.option("--rates", default="1:128", show_default=True,
              help="Data rates in MB/s (1 MB = 10^6 B): LO:HI on a log scale, or a list 1,5,20.")
@click.option("--rate-steps", type=click.IntRange(min=1), default=64, show_default=True,
              help="Number of rates for LO:HI.")
@click.option("--rtt-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Round-trip time added to every candidate that sends.")
@click.option("--privacy", is_flag=True, help="Never send the raw input (no offload candidate).")
@click.option("--static", "static", multiple=True, metavar="SPLIT",
              help="Static split to report the gain against (repeatable) [default: every compressive split].")
@click.option("--margin", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Relative margin a split must win by over one that keeps more on the device (0.05 = 5%).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Plan to write [default: DIR/plan.json].")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path),
              help="Write best-split.png and gain-over-STATIC.png (paper Fig. 2 and 3) here.")
@click.option("--min-agreement", type=float, metavar="X",
              help="Admit lossy wire forms (int8, JPEG) whose top-1 agreement with the whole model on "
                   "held-out inputs is at least X (0.95 = 95 %) [default: lossless forms and float16 "
                   "within its tolerance only].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def plan_cmd(split_dir, device_path, server_path, batch_sizes, rates, rate_steps, rtt_ms, privacy, static, margin,
             min_agreement, output, plots, as_json) -> None:
    """Compute the split lookup table: the best split per batch size and data rate.

    Predicted time of each candidate (paper Eq. 4): head on the device + bytes / rate + rtt +
    tail on the server; the table holds the fastest per cell and the gain of choosing
    dynamically over local-only, full offloading and each static split (Eq. 7).

    \b
    Example:
      dsc-export plan engines/efficientnet_b0/split \\
          --device engines/efficientnet_b0/split/profiles/device-onnxruntime.json \\
          --server engines/efficientnet_b0/split/profiles/server-onnxruntime.json --plots plots/
      dsc-export plan DIR --device dev.json --server srv.json --rtt-ms 20 --privacy --json
      dsc-export plan DIR --device dev.json --server srv.json --min-agreement 0.95
    """
    from dsc_export.fidelity import check_floor
    from dsc_export.planning import best_static, make_plan, rate_grid

    check_floor(min_agreement)
    man = read_manifest(split_dir)
    dev, srv = read_profile(device_path), read_profile(server_path)
    plan = make_plan(man, dev, srv, batch_sizes=batch_sizes, rates=rate_grid(rates, rate_steps), rtt_ms=rtt_ms,
                     privacy=privacy, static=list(static) or None, margin=margin,
                     profile_hashes=(sha256_file(device_path), sha256_file(server_path)),
                     min_agreement=min_agreement)
    output = output or split_dir / "plan.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, plan.to_json())
    pictures = []
    if plots:
        from dsc_export.plots import choice_heatmap, gain_heatmap

        pictures.append(choice_heatmap(plan, plots / "best-split.png"))
        base = (list(static) or [best_static(plan) or "local"])[0]
        pictures.append(gain_heatmap(plan, base, plots / f"gain-over-{base}.png"))
    if as_json:
        click.echo(json.dumps({"plan": str(output), "candidates": plan.candidates,
                               "share": plan.shares(), "excluded": plan.excluded,
                               "mean_gain": {b: g["mean"] for b, g in plan.gain.items()},
                               "best_static": best_static(plan), "plots": [str(p) for p in pictures]}, indent=2))
        return
    _choice_map(plan)
    _candidate_table(plan, man)
    click.echo("mean gain of dynamic splitting (Eq. 7) over:")
    width = max([10] + [len(b) for b in plan.gain])
    for b, g in plan.gain.items():
        click.echo(f"  {b:{width}s} {g['mean'] * 100:6.1f} %")
    for emu, side in ((dev.emulation, "device"), (srv.emulation, "server")):
        if emu:
            click.secho(f"note: the {side} profile is EMULATED ({json.dumps(emu)})", fg="yellow")
    click.echo(f"wrote {output}" + "".join(f"\nwrote {p}" for p in pictures))


def _candidate_table(plan, man) -> None:
    """Per candidate: its wire form, bytes per input, top-1 agreement and share of the grid it wins;
    then the splits the fidelity floor left out, and why."""
    share = plan.shares()
    rows = [("candidate", "wire", "bytes/input", "agreement", "grid won")]
    for s in man.splits:
        if s.id not in share and s.id not in plan.excluded:
            continue
        agree = (s.fidelity or {}).get("top1_agreement")
        rows.append((s.id, s.wire or "-", f"{s.bytes:,}", "-" if agree is None else f"{agree:.3f}",
                     f"{share[s.id] * 100:.1f} %" if s.id in share else "excluded"))
    _table(rows, right={2, 3, 4})
    for sid, why in plan.excluded.items():
        click.echo(f"  {sid}: {why}")


def _choice_map(plan) -> None:
    """A compact text map of the choice grid: rows batch sizes, columns rates, one letter per split."""
    ids = plan.candidates
    sym = {c: ("O" if c == "offload" else "L" if c == "local" else str(k)) for k, c in enumerate(ids)}
    rows = [i for i, b in enumerate(plan.batch_sizes) if b in (1, 2, 4, 8, 16, 32, 64, 128)] or list(range(len(plan.batch_sizes)))
    marks = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    cols = sorted({min(range(len(plan.rates_MBps)), key=lambda j: abs(plan.rates_MBps[j] - m)) for m in marks
                   if plan.rates_MBps[0] / 1.5 <= m <= plan.rates_MBps[-1] * 1.5}) or list(range(len(plan.rates_MBps)))
    click.echo("best split (rows: batch size, columns: MB/s)")
    click.echo("      " + "".join(f"{plan.rates_MBps[j]:>6.3g}" for j in cols))
    for i in rows:
        click.echo(f"{plan.batch_sizes[i]:>5} " + "".join(f"{sym[plan.choice[i][j]]:>6}" for j in cols))
    click.echo("  " + ", ".join(f"{sym[c]} = {c}" for c in ids))


@cli.command("simulate")
@click.argument("plan_path", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--baseline", "baselines", multiple=True, metavar="local|offload|SPLIT",
              help="Baseline to compare with (repeatable) [default: local, offload and every split].")
@click.option("--json", "as_json", is_flag=True, help="Print the per-step choices and the gains as JSON.")
def simulate_cmd(plan_path, scenario, baselines, as_json) -> None:
    """Run a scenario of (batch size, data rate) steps through a plan.

    SCENARIO is a CSV with a header naming the columns batch and rate_MBps, one row per time
    step (the paper's S = ((B1, r1), ...)). Prints the split chosen at each step and the gain of
    dynamic splitting over each baseline (paper Eq. 7).

    \b
    Example:
      dsc-export simulate engines/efficientnet_b0/split/plan.json docs/scenarios/commute.csv
      dsc-export simulate plan.json busy-hour.csv --baseline local --json
    """
    from dsc_export.planning import parse_scenario, read_plan, simulate

    plan = read_plan(plan_path)
    if not scenario.is_file():
        raise UserError(f"scenario '{scenario}' does not exist")
    result = simulate(plan, parse_scenario(scenario.read_text(), str(scenario)), list(baselines) or None)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    rows = [("step", "batch", "MB/s", "split", "predicted ms")]
    for s in result["steps"]:
        rows.append((str(s["step"]), str(s["batch"]), f"{s['rate_MBps']:g}", s["choice"], f"{s['predicted_ms']:.1f}"))
    _table(rows, right={0, 1, 2, 4})
    click.echo(f"total predicted time: dynamic {result['total_ms']['dynamic']:.0f} ms")
    click.echo("gain of dynamic splitting (Eq. 7, mean over steps) over:")
    for b, g in result["gain"].items():
        click.echo(f"  {b:10s} {g * 100:6.1f} %   (total {result['total_ms'][b]:.0f} ms)")


@cli.command("bundle")
@click.argument("split_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", "side", flag_value="device", help="Heads, whole model, device engines, plan.")
@click.option("--server", "side", flag_value="server", help="Tails, whole model, server engines, Triton repository.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Tar file to write.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Plan for the device bundle [default: DIR/plan.json].")
@click.option("--triton-backend", type=click.Choice(list(TRITON_BACKENDS)),
              help="Backend of the server bundle's Triton model repository: onnxruntime (onnxruntime_onnx), "
                   "tensorrt (tensorrt_plan) or python (model.py running onnxruntime; served by the tritonserver "
                   "in PyTriton's wheel) [default: onnxruntime].")
@click.option("--triton-platform", type=click.Choice(PLATFORMS),
              help="The same by Triton's platform name (older spelling of --triton-backend).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Triton instance_group count per model.")
def bundle_cmd(split_dir, side, output, plan_path, triton_backend, triton_platform, max_batch_size, instances) -> None:
    """Pack what one side needs into a tar file, every file listed with its sha256.

    \b
    Example:
      dsc-export bundle engines/efficientnet_b0/split --device -o b0-device.tar
      dsc-export bundle engines/efficientnet_b0/split --server -o b0-server.tar
    """

    if side is None:
        raise click.UsageError("choose --device or --server")
    if triton_backend and triton_platform and TRITON_BACKENDS[triton_backend] != triton_platform:
        raise UserError(f"--triton-backend {triton_backend} and --triton-platform {triton_platform} disagree; "
                               "give one of them")
    platform = TRITON_BACKENDS[triton_backend] if triton_backend else triton_platform or "onnxruntime_onnx"
    index = make_bundle(split_dir, side, output, plan=plan_path, triton_platform=platform,
                      max_batch_size=max_batch_size, instances=instances)
    size = output.stat().st_size
    click.echo(f"wrote {output}: {side} bundle, {len(index['files'])} files, {size / 1e6:.1f} MB")

    click.echo(describe_sizes(side, index["sizes"]))


def _open_dir_or_bundle(path: Path, side: str):
    """A split dir as it is, or a bundle unpacked (and checked) into a temporary directory."""
    import tempfile

    if path.is_dir():
        return path, None

    tmp = tempfile.TemporaryDirectory(prefix="dsc-bundle-")
    dest = Path(tmp.name) / "bundle"
    open_bundle(path, dest, expect_side=side)
    return dest, tmp


@cli.command("serve")
@click.argument("source", type=click.Path(exists=True, path_type=Path), metavar="DIR|BUNDLE")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads per tail.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--dynamic-batching/--no-dynamic-batching", default=None,
              help="Merge concurrent requests into one batch [default: on where the manifest says the model may "
                   "merge requests; never for a batch-dependent or fixed-batch model].")
@click.option("--triton-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Triton's own log, never the terminal [default: TMPDIR/dsc-export-triton-HTTP_PORT.log].")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Request handlers per model: at least the number of devices, so that every request's wait "
                   "is measured (queue_ms) rather than spent in Triton's queue.")
def serve_cmd(source, host, http_port, grpc_port, metrics_port, threads, max_batch_size, dynamic_batching,
              triton_log, instances) -> None:
    """Serve every tail (and the whole model for offload) over Triton's protocol (HTTP + gRPC).

    One Triton model per split, named by its id. Says it is serving only once Triton reports
    every model ready. Stops cleanly on Ctrl-C or SIGTERM and prints per-split request counts and
    compute time. A model that runs at one batch size only is served at that size alone.

    \b
    Example:
      dsc-export serve engines/efficientnet_b0/split
      dsc-export serve b0-server.tar --host 0.0.0.0 --threads 4
    """
    import tempfile

    from dsc_export.serving.server import TailServer, serve_forever

    root, tmp = _open_dir_or_bundle(source, "server")
    triton_log = triton_log or Path(tempfile.gettempdir()) / f"dsc-export-triton-{http_port}.log"
    try:
        server = TailServer(root, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                            threads=threads, max_batch_size=max_batch_size, dynamic_batching=dynamic_batching,
                            instances=instances, log=_log, log_file=triton_log)
        serve_forever(server, on_ready=lambda: click.echo(
            f"serving {len([s for s in server.manifest.splits if s.tail])} model(s), all ready, on "
            f"http://{host}:{http_port} and grpc {host}:{grpc_port} ({server.batching()}); Triton's log: "
            f"{triton_log}; Ctrl-C to stop", err=True))
        _table(server.stats.table())
    finally:
        if tmp:
            tmp.cleanup()


@cli.command("run")
@click.argument("source", type=click.Path(exists=True, path_type=Path), metavar="DIR|BUNDLE")
@click.option("--server", "server_url", required=True, multiple=True,
              help="host:port of the server (HTTP or gRPC port); repeat it, or separate URLs with commas, for "
                   "several servers serving the same model (each batch goes to the one predicted fastest).")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Plan [default: DIR/plan.json].")
@click.option("--privacy", is_flag=True, help="Never send the raw input.")
@click.option("--input", "input_kind", type=click.Choice(["random", "images"]), default="random", show_default=True)
@click.option("--images", "image_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of images for --input images, preprocessed as the model was evaluated (resize, "
                   "centre crop); prints each image's top-5 ImageNet labels (--json: with scores).")
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Samples per batch [default: 4, or the model's fixed batch size].")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="CPU threads here.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds before a request is abandoned and the batch finished locally.")
@click.option("--split", "static", metavar="SPLIT", help="Always use this split (a static baseline).")
@click.option("--wait-ready", "wait_ready", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="SECONDS", help="Wait this long for the server's models to be ready before the first batch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per batch.")
def run_cmd(source, server_url, protocol, plan_path, privacy, input_kind, image_dir, batches, batch_size, threads,
            deadline, static, wait_ready, as_json) -> None:
    """Run batches with dynamic split computing against a server.

    Per batch: estimate the data rate from recent transfers, ask the plan for the split, run
    the head here, send the cut tensor, get the result; finish locally if the server fails.
    First waits (--wait-ready) until the server has every model of this split dir ready, and
    refuses a server that is not ready in time or serves another model. With several servers,
    each batch goes to the server and split predicted fastest for that server's rate, wait and
    slowdown; a failed server is skipped for its back-off (1 s doubling to 30 s) and the batch
    retried on the next one, or finished here.

    \b
    Example:
      dsc-export run engines/efficientnet_b0/split --server 127.0.0.1:8000 --batches 50
      dsc-export run b0-device.tar --server 10.0.0.5:8001 --protocol grpc --privacy
      dsc-export run b0-device.tar --server 10.0.0.5:8000 --server 10.0.0.6:8000
      dsc-export run engines/efficientnet_lite0/split --server 127.0.0.1:8000 --input images --images photos/
    """
    from dataclasses import asdict

    import numpy as np

    from dsc_export.planning import read_plan
    from dsc_export.serving.client import DynamicSplitClient

    root, tmp = _open_dir_or_bundle(source, "device")
    try:
        plan = read_plan(plan_path) if plan_path else None
        rows = [("batch", "size", "split", "bytes", "rate est", "measured", "predicted ms", "measured ms", "note")]

        ran: list[str] = []  # the split each batch ran on

        def log(b):
            ran.append(b.split)
            if as_json:
                click.echo(json.dumps(asdict(b)))
            else:
                where = f"{b.split} @ {b.server}" if b.server and len(server_url) > 1 else b.split
                rows.append((str(b.index), str(b.batch), where, f"{b.bytes:,}", f"{b.rate_MBps:.1f}",
                             "" if b.measured_rate_MBps is None else f"{b.measured_rate_MBps:.1f}",
                             f"{b.predicted_ms:.1f}", f"{b.measured_ms:.1f}", b.fallback or ""))

        from dsc_export.artifacts import read_manifest
        from dsc_export.serving.protocol import fixed_batch

        fixed = fixed_batch(read_manifest(root))
        if fixed is not None and batch_size not in (None, fixed):
            raise UserError(f"the model runs at batch size {fixed} only; run it with --batch-size {fixed} "
                            "(or leave --batch-size out)")
        batch_size = batch_size or fixed or 4
        with DynamicSplitClient(root, list(server_url), plan, protocol=protocol, privacy=privacy, threads=threads,
                                deadline_s=deadline, log=log,
                                static=static, ready_timeout_s=wait_ready, say=_log) as client:
            shape = [batch_size] + list(client.manifest.model.input.shape[1:])
            dtype = np.dtype(client.manifest.model.input.dtype)
            names, images = _images(image_dir, root / client.manifest.model.path, shape, dtype) \
                if input_kind == "images" else ([], None)
            rng = np.random.default_rng(0)
            from dsc_export.ort import random_array

            labels = {}  # image index -> (split it ran on, top-5), the first time it ran
            for k in range(batches):
                x = images[k % len(images)] if images is not None else random_array(shape, dtype, rng)
                out = client.infer(x)
                if images is not None:
                    from dsc_export.images import top_k

                    for i, top in enumerate(top_k(out[client.manifest.model.output.name])):
                        labels.setdefault((k * batch_size + i) % len(names), (ran[-1], top))
        if not as_json:
            _table(rows, right={0, 1, 3, 4, 5, 6, 7})
        for i, (split, top) in sorted(labels.items()):
            if as_json:
                click.echo(json.dumps({"image": names[i], "split": split, "top5": [asdict(t) for t in top]}))
            else:
                click.echo(f"{names[i]}  [{split}]  " + "; ".join(f"{t.name.split(',')[0]} {t.score:.2f}" for t in top))
    finally:
        if tmp:
            tmp.cleanup()


def _images(folder, model_path, shape, dtype):
    """The images of a folder, preprocessed for the model, in full batches (cycled), and their names."""
    import numpy as np

    from dsc_export.images import Preprocess, batches, read_folder

    if folder is None:
        raise UserError("--input images needs --images FOLDER")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
        raise UserError("--input images needs a model that takes square uint8 NHWC images (dsc-export export's default)")
    pre = Preprocess.for_onnx(model_path, shape[1])
    named = read_folder(folder)
    return [n for n, _ in named], batches([pre(a) for _, a in named], shape[0])


@cli.command("demo")
@click.option("--model", help="Catalogue model (dsc-export models) [default: efficientnet_lite0 with trained weights "
                                "on real photos when the 'weights' extra is installed, else efficientnet_b0 with random "
                                "weights].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("engines/demo"),
              show_default=True, help="Where everything goes.")
@click.option("--batch-sizes", "batch_sizes", default="1,2,4,8,16", show_default=True, callback=_batch_sizes,
              help="Engines and profiles at these batch sizes (the plan interpolates between them).")
@click.option("--slowdown", type=click.FloatRange(min=1), default=4.0, show_default=True,
              help="The device stands for a K-times slower device than this machine on 1 thread (labelled).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per figure.")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="Serve the tails on loopback and run a short dynamic session (needs the serve extra).")
@click.option("--resolution", type=int, hidden=True)
def demo_cmd(model, out, batch_sizes, slowdown, repeats, serve, resolution) -> None:
    """The whole idea on one machine: export, analyze, split, build, profile, plan, serve, run.

    Runs in a few minutes on a 2-core laptop without a GPU and ends with a summary of where
    every file is and what the plan concluded.

    \b
    Example:
      dsc-export demo
      dsc-export demo --model efficientnetv2_b0 --out engines/demo-v2   # random weights
    """
    from dsc_export.demo import run_demo

    t0 = time.perf_counter()
    rep = run_demo(model, out, batch_sizes=batch_sizes, slowdown=slowdown, repeats=repeats, serve=serve,
                   step=lambda s: click.secho(f"== {s}", bold=True, err=True), log=_log, resolution=resolution)
    ps = rep.plan_summary
    click.echo("")
    click.secho(f"dsc-export demo: {rep.model} ({rep.weights} weights), {time.perf_counter() - t0:.0f} s", bold=True)
    for k, v in rep.files.items():
        click.echo(f"  {k:28s} {v}")
    click.echo(f"the plan (device: this machine on 1 thread, labelled as {slowdown:g}x slower; server: every core):")
    for c, where in ps["where"].items():
        click.echo(f"  {c:8s} wins at {where} ({ps['share_of_cells'][c] * 100:.0f} % of the grid)")
    g = ps["mean_gain"]
    click.echo(f"  mean gain of dynamic splitting: {g['local'] * 100:.1f} % over local-only, "
               f"{g['offload'] * 100:.1f} % over full offloading, "
               f"{g.get(ps['best_static'], 0) * 100:.1f} % over the best static split ({ps['best_static']})")
    for line in rep.wire_lines():
        click.echo(line)
    if rep.session:
        click.echo(f"short dynamic session (simulated data rates, batch {rep.session[0]['batch']}; predicted at the "
                   "client's own rate estimate, which lags a change of rate by a batch or more):")
        by_rate = {}
        for r in rep.session:
            by_rate.setdefault(r["rate_MBps"], []).append(r)
        for rate, rows in by_rate.items():
            splits = ",".join(dict.fromkeys(r["split"] for r in rows))
            mean = sum(r["measured_ms"] for r in rows) / len(rows)
            pred = sum(r["predicted_ms"] for r in rows) / len(rows)
            click.echo(f"  {rate:6.1f} MB/s -> {splits:20s} measured {mean:6.1f} ms, predicted {pred:6.1f} ms")
    if rep.labels:
        click.echo("labels of the real photos (top-1) through each split the session ran them on, and by the whole model:")
        for r in rep.labels:
            through = ", ".join(f"{k}: {v.split(',')[0]}" for k, v in r["splits"].items())
            same = "same" if all(v == r["whole"] for v in r["splits"].values()) else "DIFFERENT"
            click.echo(f"  {r['photo']:18s} whole model: {r['whole'].split(',')[0]:22s} {through}  ({same})")
    for n in rep.notes:
        click.secho(f"note: {n}", fg="yellow")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main() -> None:
    """Entry point: run the CLI, turning user errors into one line and a non-zero exit."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # bad flag or argument: one line, with where to look
        where = exc.ctx.command_path if exc.ctx else "dsc-export"
        click.secho(f"error: {_one_line(exc.format_message())} (see '{where} --help')", err=True, fg="red")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.secho(f"error: {_one_line(exc.format_message())}", err=True, fg="red")
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.secho(f"error: {_one_line(exc)}", err=True, fg="red")
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
