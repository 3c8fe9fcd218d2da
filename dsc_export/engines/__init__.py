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
sit in the split dir's root beside ``model.onnx``
(``engine-BACKEND-<part file>-b<N>-<precision>.onnx``) and read the split dir's one store
``weights/`` (:mod:`dsc_export.weight_store`): a tensor equal in the source and in an engine (one
the optimiser left alone), or in the engines of several parts and batch sizes, is stored once, so
another batch size adds kilobytes. Opaque engines (TensorRT plans) go to ``engines/BACKEND/``.

The package, by role:

- :mod:`~dsc_export.engines.jobs`: which engine files a build needs, where they go, batch sizes;
- :mod:`~dsc_export.engines.build`: build one engine, check it, record it (kept or dropped);
- :mod:`~dsc_export.engines.timing`: the keep-or-drop timing against the ONNX;
- :mod:`~dsc_export.engines.runtime`: load a recorded engine, run a part (:class:`PartRunner`).

TensorRT's offline tools (``--emit-trtexec``, ``--import``) are in
:mod:`dsc_export.backends.tensorrt_tools`.
"""

from dsc_export.engines.build import BuildReport, build_engines
from dsc_export.engines.jobs import (
    ENGINES_DIR,
    PARTS,
    Job,
    engine_batch_sizes,
    engine_data,
    engine_path,
    parse_batch_sizes,
    plan_jobs,
)
from dsc_export.engines.runtime import PartRunner, load_engine, load_part
from dsc_export.engines.timing import MARGIN, pays, time_pair

__all__ = ["ENGINES_DIR", "MARGIN", "PARTS", "BuildReport", "Job", "PartRunner", "build_engines",
           "engine_batch_sizes", "engine_data", "engine_path", "load_engine", "load_part",
           "parse_batch_sizes", "pays", "plan_jobs", "time_pair"]
