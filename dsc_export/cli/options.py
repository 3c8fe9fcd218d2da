"""The ``dsc-export`` command group and the options several verbs share.
"""

from __future__ import annotations

from pathlib import Path

import click

from dsc_export import __version__
from dsc_export.artifacts import (
    WIRE_DTYPES,
)
from dsc_export.engines import (
    parse_batch_sizes,
)
from dsc_export.errors import UserError

ENGINES_ROOT = Path("engines")


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


def wire_option(f):
    return click.option("--wire-dtype", type=click.Choice(WIRE_DTYPES), default=WIRE_DTYPES[0],
                        show_default=True,
                        help="dtype of cut tensors on the wire (float16: the head casts down, "
                             "the tail casts back).")(f)


def wires_option(f):
    return click.option("--wire", "wires", metavar="FORM[,FORM...]",
                        help="Wire forms of every cut, each at its own compressive bottlenecks "
                             "(Eq. 3 on its bytes): float32 (as it is), float16 (Cast down / "
                             "back), int8 (QuantizeLinear / DequantizeLinear, per-tensor affine, "
                             "calibrated on the first half of --inputs, measured on the rest). "
                             "E.g. --wire float32,float16,int8 [default: --wire-dtype alone].")(f)


def parse_wires(wires: str | None, wire_dtype: str) -> list[str]:
    """The wire forms of ``--wire A,B`` (checked by the library), or ``[--wire-dtype]``.

    Raises:
        UserError: both options given.
    """
    if not wires:
        return [wire_dtype]
    if wire_dtype != WIRE_DTYPES[0]:
        raise UserError("give --wire FORM,... or --wire-dtype, not both")
    return [w.strip() for w in wires.split(",") if w.strip()]


def inputs_option(what: str):
    def deco(f):
        return click.option(
            "--inputs", type=click.Path(path_type=Path), metavar="FILE.npz|DIR",
            help=f"Sample inputs for {what} instead of random ones: a .npz of arrays by input name, each "
                 "[K, *per-sample shape], or a folder of images (.jpg .jpeg .png .bmp) resized to the model's input "
                 "(uint8 as they are, float scaled to [0, 1] and ImageNet-normalised). "
                 "E.g. --inputs tokens.npz or --inputs photos/. [default: random, within the ranges the "
                 "graph implies]")(f)
    return deco


def batch_sizes_option(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_batch_sizes(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None
