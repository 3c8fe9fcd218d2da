"""Deployment verbs: bundle, serve, run, demo.

Each parses its flags, calls the library and prints.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import click

from dsc_export.bundle import (
    PLATFORMS,
    TRITON_BACKENDS,
    describe_sizes,
    make_bundle,
    open_bundle,
)
from dsc_export.cli.format import (
    log_line,
    print_table,
)
from dsc_export.cli.options import batch_sizes_option, cli
from dsc_export.errors import UserError


@cli.command("bundle")
@click.argument("split_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", "side", flag_value="device", help="Heads, whole model, device engines, plan.")
@click.option("--server", "side", flag_value="server", help="Tails, whole model, server engines, Triton repository.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Tar file to write.")
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
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False, path_type=Path),
              help="This server's profile (dsc-export bench --role server): the load answer then reports "
                   "the tails' slowdown s against it.")
def serve_cmd(source, host, http_port, grpc_port, metrics_port, threads, max_batch_size, dynamic_batching,
              triton_log, instances, profile_path) -> None:
    """Serve every tail (and the whole model for offload) over Triton's protocol (HTTP + gRPC).

    One Triton model per split, named by its id. Says it is serving only once Triton reports
    every model ready. Stops cleanly on Ctrl-C or SIGTERM and prints per-split request counts and
    compute time. A model that runs at one batch size only is served at that size alone.

    \b
    Example:
      dsc-export serve engines/efficientnet_b0/split
      dsc-export serve b0-server.tar --host 0.0.0.0 --threads 4
      dsc-export serve engines/efficientnet_b0/split --profile profiles/server-onnxruntime.json
    """
    import tempfile

    from dsc_export.artifacts import read_profile
    from dsc_export.serving.server import ServeOptions, TailServer, serve_forever

    root, tmp = _open_dir_or_bundle(source, "server")
    triton_log = triton_log or Path(tempfile.gettempdir()) / f"dsc-export-triton-{http_port}.log"
    try:
        server = TailServer(root, ServeOptions(
            host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
            threads=threads, max_batch_size=max_batch_size, dynamic_batching=dynamic_batching,
            instances=instances, log_file=triton_log), log=log_line,
            profile=read_profile(profile_path) if profile_path else None)
        serve_forever(server, on_ready=lambda: click.echo(
            f"serving {len([s for s in server.manifest.splits if s.tail])} model(s), all ready, on "
            f"http://{host}:{http_port} and grpc {host}:{grpc_port} ({server.batching()}); Triton's log: "
            f"{triton_log}; Ctrl-C to stop", err=True))
        print_table(server.stats.table())
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
@click.option("--switch-p", "switch_p", type=click.FloatRange(min=0, min_open=True, max=1), default=1.0,
              show_default=True, metavar="P",
              help="Move to a better server and split only with this probability per batch (many devices "
                   "sharing a server: 0.3 damps herding, see docs/serving.md); 1: at once.")
@click.option("--wait-price", "wait_price", type=click.FloatRange(min=0, max=10), default=3.0, show_default=True,
              metavar="W", help="Charge a request to a server W times the delays it meets, for those it adds to "
                                "other devices' requests (a fleet's fair share, see docs/serving.md); 0: each device "
                                "chooses for itself alone.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per batch.")
def run_cmd(source, server_url, protocol, plan_path, privacy, input_kind, image_dir, batches, batch_size, threads,
            deadline, static, wait_ready, switch_p, wait_price, as_json) -> None:
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
      dsc-export run b0-device.tar --server 10.0.0.5:8000 --switch-p 0.3   # one of many devices
      dsc-export run engines/efficientnet_lite0/split --server 127.0.0.1:8000 --input images --images photos/
    """

    import numpy as np

    from dsc_export.planning import read_plan
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient
    from dsc_export.session import Labels, image_feed, random_feed, run_batches

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
        from dsc_export.contract import fixed_batch

        fixed = fixed_batch(read_manifest(root))
        if fixed is not None and batch_size not in (None, fixed):
            raise UserError(f"the model runs at batch size {fixed} only; run it with --batch-size {fixed} "
                            "(or leave --batch-size out)")
        batch_size = batch_size or fixed or 4
        options = ClientOptions(protocol=protocol, privacy=privacy, threads=threads,
                                deadline_s=deadline, static=static, ready_timeout_s=wait_ready,
                                switch_p=switch_p, wait_price=wait_price)
        with DynamicSplitClient(root, list(server_url), plan, options=options, log=log,
                                say=log_line) as client:
            shape = [batch_size] + list(client.manifest.model.input.shape[1:])
            dtype = np.dtype(client.manifest.model.input.dtype)
            if input_kind != "images":
                feed, labels = random_feed(shape, dtype), None
            elif image_dir is None:
                raise UserError("--input images needs --images FOLDER")
            else:
                feed = image_feed(root / client.manifest.model.path, shape, dtype, image_dir,
                                  what="--input images")
                labels = Labels(feed, client.manifest.model.output.name)
            for k, out in run_batches(client, feed, batches):
                if labels is not None:
                    labels.add(k, ran[-1], out)
        if not as_json:
            print_table(rows, right={0, 1, 3, 4, 5, 6, 7})
        for i, by_split in sorted(labels.by_image.items()) if labels is not None else ():
            split, top = next(iter(by_split.items()))  # the split the image first ran on
            if as_json:
                click.echo(json.dumps({"image": feed.names[i], "split": split,
                                       "top5": [asdict(t) for t in top]}))
            else:
                click.echo(f"{feed.names[i]}  [{split}]  "
                           + "; ".join(f"{t.name.split(',')[0]} {t.score:.2f}" for t in top))
    finally:
        if tmp:
            tmp.cleanup()


@cli.command("demo")
@click.option("--model", help="Catalogue model (dsc-export models) [default: efficientnet_lite0 with trained "
                                "weights on real photos when the 'weights' extra is installed, else efficientnet_b0 "
                                "with random weights].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("engines/demo"),
              show_default=True, help="Where everything goes.")
@click.option("--batch-sizes", "batch_sizes", default="1,2,4,8,16", show_default=True,
              callback=batch_sizes_option,
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
    from dsc_export.demo import run_demo, session_by_rate

    t0 = time.perf_counter()
    rep = run_demo(model, out, batch_sizes=batch_sizes, slowdown=slowdown, repeats=repeats, serve=serve,
                   step=lambda s: click.secho(f"== {s}", bold=True, err=True), log=log_line,
                   resolution=resolution)
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
                   "client's own rate estimate: the batch that meets a change of rate was planned at the old one, "
                   "and after a step up the next one too):")
        for g in session_by_rate(rep.session):
            line = (f"  {g['rate_MBps']:6.1f} MB/s -> {','.join(g['splits']):20s} measured {g['measured_ms']:6.1f} ms, "
                    f"predicted {g['predicted_ms']:6.1f} ms")
            if g["stale"] and g["rest_measured_ms"] is not None:
                line += (f"; {g['stale']} batch(es) planned at the old rate estimate, the others: measured "
                         f"{g['rest_measured_ms']:.1f}, predicted {g['rest_predicted_ms']:.1f} ms")
            click.echo(line)
    if rep.labels:
        click.echo("labels of the real photos (top-1) through each split the session ran them on, "
                   "and by the whole model:")
        for r in rep.labels:
            through = ", ".join(f"{k}: {v.split(',')[0]}" for k, v in r["splits"].items())
            same = "same" if all(v == r["whole"] for v in r["splits"].values()) else "DIFFERENT"
            click.echo(f"  {r['photo']:18s} whole model: {r['whole'].split(',')[0]:22s} {through}  ({same})")
    for n in rep.notes:
        click.secho(f"note: {n}", fg="yellow")
