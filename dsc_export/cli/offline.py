"""Offline verbs: models, export, analyze, split, build, bench, plan, simulate.

Each parses its flags, calls one library function and prints.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from dsc_export.artifacts import (
    PRECISIONS,
    ROLES,
    read_manifest,
    read_profile,
    sha256_file,
    write_json_atomic,
)
from dsc_export.backends import BACKENDS, BuildOptions, get_backend
from dsc_export.backends.tensorrt_tools import emit_trtexec as write_trtexec
from dsc_export.backends.tensorrt_tools import import_engines
from dsc_export.bundle import (
    describe_sizes,
    side_sizes_of_split,
)
from dsc_export.cli.format import (
    log_line,
    log_note,
    print_candidates,
    print_choice_map,
    print_profile,
    print_table,
    progress_bar,
    shorten,
)
from dsc_export.cli.options import (
    ENGINES_ROOT,
    batch_sizes_option,
    cli,
    inputs_option,
    parse_wires,
    wire_option,
    wires_option,
)
from dsc_export.engines import (
    PARTS,
    build_engines,
    engine_batch_sizes,
)
from dsc_export.errors import UserError


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
    print_table(rows)


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
    rep = export_model(entry.name, output, resolution=resolution,
                       weights=str(weights) if weights else None, opset=opset,
                       float_input=float_input, verify=not no_verify, log=log_line,
                       pretrained=pretrained)
    click.echo(f"wrote {rep.path}  ({rep.file_bytes / 1e6:.1f} MB, {rep.seconds:.1f} s)")
    click.echo(f"  model   {rep.entry.name} ({rep.entry.timm_name}), weights: {rep.weights}")
    click.echo(f"  input   image  {rep.input_dtype} {rep.input_shape}")
    click.echo("  output  logits float32 ['N', 1000]")
    for b, (a, r) in rep.diffs.items():
        click.echo(f"  verify  batch {b}: max abs diff {a:.2e}, relative {r:.2e} (onnxruntime vs torch)")


@cli.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@wire_option
@wires_option
@inputs_option("sizing the cut points")
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

    forms = parse_wires(wires, wire_dtype)
    an = analyze_file(model, wire_dtype=forms[0], inputs=inputs, forms=forms,
                      log=log_line if not as_json else (lambda s: None))
    if plot:
        from dsc_export.plots import bottleneck_chart

        bottleneck_chart(an, plot)
    if as_json:
        click.echo(json.dumps({
            "model": str(model), "input": asdict(an.input), "input_bytes": an.input_bytes,
            "wire_dtype": forms[0], "wires": forms,
            "cut_points": [asdict(c) for c in an.cut_points],
            "notes": an.notes,
        }, indent=2))
        return
    click.echo(f"{model}: input {an.input.name} {an.input.dtype} {an.input.shape} "
               f"= {an.input_bytes:,} bytes per sample; wire {', '.join(forms)}")
    # bytes and ratio of the first form; compressive: in which forms (Eq. 3 each)
    several = len(forms) > 1
    rows = [("#", "tensor", "shape", "bytes", "ratio", "elem ratio", "natural", "compressive", "scope")]
    for c in an.cut_points:
        if not show_all and not any(f["natural"] for f in c.forms.values()):
            continue
        comp = ",".join(f for f in forms if c.forms[f]["compressive"]) if several else (
            "YES" if c.compressive else "")
        rows.append((str(c.index), shorten(c.tensor), "x".join(map(str, c.shape)) or "scalar",
                     f"{c.bytes:,}", f"{c.ratio:.4f}", f"{c.element_ratio:.4f}",
                     "yes" if c.natural else "", comp, c.scope or ""))
    print_table(rows, right={0, 3, 4, 5})
    for n in an.notes:
        click.secho(f"note: {n}", fg="yellow")
    click.echo(f"{an.summary()}  ({an.seconds:.2f} s)")
    if plot:
        click.echo(f"wrote {plot}")


@cli.command("split")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Split dir to write [default: engines/MODEL_STEM/split].")
@wire_option
@wires_option
@click.option("--per-channel", is_flag=True,
              help="int8: one scale per channel (axis 1) where it beats per-tensor on the "
                   "held-out inputs.")
@click.option("--int8-symmetric", "symmetric", is_flag=True,
              help="int8: zero point 0 (what TensorRT's QuantizeLinear takes) instead of affine.")
@click.option("--at", "at", multiple=True, metavar="TENSOR",
              help="Cut at this cut point instead of the compressive bottlenecks (repeatable).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check tail(head(x)) against the whole model with onnxruntime.")
@inputs_option("sizing and verification")
@click.option("--offload", "offload", metavar="FORMS",
              help="Offload forms to race too, comma-separated: raw (always), png, webp (lossless), "
                   "jpegNN (JPEG at quality NN, 1..100: lossy, its top-1 agreement is measured), "
                   "e.g. --offload raw,jpeg95. Needs a uint8 image input (dsc-export export's "
                   "default). [default: raw]")
def split_cmd(model, out, wire_dtype, wires, per_channel, symmetric, at, verify, inputs,
              offload) -> None:
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
    forms = parse_wires(wires, wire_dtype)
    man = split_model(model, out, wire_dtype=forms[0], wires=forms, per_channel=per_channel,
                      symmetric=symmetric, at=list(at) or None, verify=verify, log=log_line,
                      inputs=inputs, offload=[offload] if offload else None)
    rows = [("split", "kind", "wire", "bytes/sample", "ratio", "max abs diff", "agreement", "head",
             "tail")]
    for s in man.splits:
        agree = (s.fidelity or {}).get("top1_agreement")
        rows.append((s.id, s.kind, s.wire or "-", f"{s.bytes:,}",
                     f"{s.ratio:.4f}" if s.ratio is not None else "",
                     "-" if s.max_abs_diff is None else f"{s.max_abs_diff:.1e}",
                     "-" if agree is None else f"{agree:.3f}", s.head or "-", s.tail or "-"))
    print_table(rows, right={3, 4, 5, 6})
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


@cli.command("build")
@click.argument("split_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(BACKENDS),
              help="Engine backend.")
@click.option("--batch-sizes", "batch_sizes", default="1,2,4,8,16,32,64", show_default=True,
              callback=batch_sizes_option,
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
@inputs_option("the engine checks of the whole model and the heads (a tail: its head's outputs on them)")
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
                          options=options, log=log_note)
        click.echo(f"wrote {emit_trtexec}: {n} trtexec command(s); run it in {split_dir} on the target machine, "
                   "then dsc-export build --import there")
        return

    read_manifest(split_dir)  # not a split dir, a missing backend: one line before any progress bar
    get_backend(backend).check()
    if import_:
        rep = import_engines(split_dir, backend, batch_sizes=batch_sizes, parts=parts, precision=precision,
                             options=options, log=log_note)
    else:
        # the bar appears after the checks (a bad --inputs: one line)
        with progress_bar("building") as progress:
            rep = build_engines(split_dir, backend, batch_sizes=batch_sizes, parts=parts,
                                precision=precision, options=options, verify=verify,
                                progress=progress, log=log_note,
                                inputs=None if inputs is None else str(inputs),
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
        print_table(rows, right={1, 3, 4})
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
@click.option("--batch-sizes", "batch_sizes", callback=batch_sizes_option,
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
@inputs_option("the model's input (a tail is fed its head's outputs on them)")
def bench_cmd(split_dir, role, backend, batch_sizes, precision, warmup, repeats, min_time, rounds, threads, slowdown,
              lock_mhz, output, inputs) -> None:
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
    from dsc_export.profiling import BenchOptions, noisy, profile_split_dir

    if batch_sizes:
        batch_sizes, note = engine_batch_sizes(read_manifest(split_dir), batch_sizes)
        if note:
            log_note(f"note: {note}")
    output = output or split_dir / "profiles" / f"{role}-{backend}.json"
    with progress_bar(f"timing the {role} side") as progress:
        options = BenchOptions(backend_name=backend, batch_sizes=batch_sizes, precision=precision,
                               warmup=warmup, repeats=None if min_time else repeats,
                               min_time_s=min_time, threads=threads, slowdown=slowdown,
                               lock_gpu_clocks_mhz=lock_mhz, rounds=rounds, inputs=inputs)
        prof = profile_split_dir(split_dir, role, options, progress=progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, prof.to_json())
    print_profile(prof)
    bad = noisy(prof)
    if bad:
        worst = max(bad, key=lambda t: t.p90_ms / t.p10_ms)
        click.secho(f"warning: {len(bad)} figure(s) are noisy (p90/p10 up to {worst.p90_ms / worst.p10_ms:.2f} at "
                    f"{worst.split}/{worst.part} batch {worst.batch}); use more --repeats or --min-time, fewer "
                    "--threads, or a quieter machine", fg="yellow", err=True)
    label = "measured" if not prof.emulation else "EMULATED " + json.dumps(prof.emulation)
    click.echo(f"wrote {output} ({role}, {backend}, {label})")


@cli.command("plan")
@click.argument("split_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", "device_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Device profile (bench --role device).")
@click.option("--server", "server_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Server profile (bench --role server).")
@click.option("--batch-sizes", "batch_sizes", callback=batch_sizes_option,
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
              help="Admit lossy wire forms (int8, JPEG) whose top-1 agreement with the whole "
                   "model on held-out inputs is at least X (0.95 = 95 %) [default: lossless forms "
                   "and float16 within its tolerance only].")
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
    print_choice_map(plan)
    print_candidates(plan, man)
    click.echo("mean gain of dynamic splitting (Eq. 7) over:")
    width = max([10] + [len(b) for b in plan.gain])
    for b, g in plan.gain.items():
        click.echo(f"  {b:{width}s} {g['mean'] * 100:6.1f} %")
    for emu, side in ((dev.emulation, "device"), (srv.emulation, "server")):
        if emu:
            click.secho(f"note: the {side} profile is EMULATED ({json.dumps(emu)})", fg="yellow")
    click.echo(f"wrote {output}" + "".join(f"\nwrote {p}" for p in pictures))


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
    print_table(rows, right={0, 1, 2, 4})
    click.echo(f"total predicted time: dynamic {result['total_ms']['dynamic']:.0f} ms")
    click.echo("gain of dynamic splitting (Eq. 7, mean over steps) over:")
    for b, g in result["gain"].items():
        click.echo(f"  {b:10s} {g * 100:6.1f} %   (total {result['total_ms'][b]:.0f} ms)")
