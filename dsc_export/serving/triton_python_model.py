"""Triton Python-backend model of one tail, written as ``<split>/1/model.py`` by ``dsc-export bundle
--server --triton-backend python``.

It runs in Triton's Python-backend stub with the server's own Python environment, so it imports
only numpy, onnxruntime and ``triton_python_backend_utils`` (never dsc_export; Pillow for a codec). Beside it lie
``model.onnx`` (the tail in the form the output contract serves: input ``input``, outputs named
as served, batch first, constants left out) and, per batch size an engine was built for,
``model.b<N>.onnx`` (that onnxruntime engine in the same form). Its ``config.pbtxt`` parameters
say which: ``dsc_engines`` (JSON: batch size -> ``{"file", "onnxruntime"}``) and
``dsc_threads`` (onnxruntime intra-op threads per session; 0: onnxruntime's default), and for an
offload codec form ``dsc_codec`` (JSON ``form``, ``layout``, ``shape``): each request's encoded
images are decoded with ``dsc_codecs.py`` beside this file (Pillow) before the model runs.

A batch runs on the engine for its batch size where one was built with this onnxruntime version
(engines are optimised for one version; another version runs everything on ``model.onnx``),
else on ``model.onnx``. With ``dynamic_batching`` in the config, the requests Triton hands over
together are run as one batch and each gets its own samples back; without it (a model whose
samples depend on their batch-mates, or one that runs at one batch size only) each request runs
as it came. Source: the Python backend's ``TritonPythonModel`` interface
(``initialize`` / ``execute`` / ``finalize``, github.com/triton-inference-server/python_backend).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

INPUT = "input"


def usable_engines(engines: dict[str, dict[str, str]], version: str) -> dict[int, str]:
    """Batch size -> engine file, for the engines built with onnxruntime ``version`` (pure)."""
    return {int(b): e["file"] for b, e in engines.items() if e.get("onnxruntime") == version}


def run_requests(run: Callable[[np.ndarray], dict[str, np.ndarray]], inputs: list[np.ndarray],
                 merge: bool) -> list[dict[str, np.ndarray]]:
    """Answer a list of requests (pure but for ``run``).

    Args:
        run: runs one batch (batch first) and returns the outputs by name, batch first.
        inputs: each request's input, batch first.
        merge: run the requests as one batch (dynamic batching) and split the outputs back along
            axis 0; otherwise each request runs as it came.

    Returns:
        Per request, its outputs.
    """
    if not merge or len(inputs) == 1:
        return [run(x) for x in inputs]
    out = run(np.concatenate(inputs))
    bounds = np.cumsum([0] + [len(x) for x in inputs])
    return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def _decoder(here: Path, codec: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """None, or (an offload codec form: the ``dsc_codec`` parameter) the function that decodes a
    request's ``BYTES`` ``[B, 1]`` into uint8 pixels with ``dsc_codecs.py`` beside this file."""
    if not codec:
        return None
    import importlib.util

    spec = json.loads(codec)
    loader = importlib.util.spec_from_file_location("dsc_codecs", here / "dsc_codecs.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    return lambda z: mod.decode_batch(z, spec["form"], spec["shape"], spec["layout"])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class TritonPythonModel:
    """One tail: sessions per batch size, created on first use."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the model config's parameters and open the onnxruntime sessions (Triton calls
        it once per model instance).
        """
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.here = Path(__file__).parent
        self.outputs = [o["name"] for o in config["output"]]
        self.merge = "dynamic_batching" in config and int(config.get("max_batch_size", 0)) > 0
        engines = json.loads(params.get("dsc_engines") or "{}")
        self.engines = usable_engines(engines, ort.__version__)
        if len(self.engines) < len(engines):
            pb_utils.Logger.log_warn(f"{config['name']}: engines built with another onnxruntime than "
                                     f"{ort.__version__}; running those batch sizes on model.onnx")
        self.threads = int(params.get("dsc_threads") or 0)
        self.decode = _decoder(self.here, params.get("dsc_codec"))
        self.sessions: dict[int | None, object] = {}
        self._session(None)  # model.onnx now: a tail that cannot load fails the load, not a request

    def _session(self, batch: int | None):
        import onnxruntime as ort

        key = batch if batch in self.engines else None
        if key not in self.sessions:
            opts = ort.SessionOptions()
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
            if self.threads:
                opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
            if key is not None:  # engines were optimised when built
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            path = self.here / (self.engines[key] if key is not None else "model.onnx")
            try:
                self.sessions[key] = ort.InferenceSession(str(path), sess_options=opts,
                                                          providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises several types
                raise RuntimeError(f"onnxruntime cannot load {path.name}: {_first_line(exc)}") from exc
        return self.sessions[key]

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self._session(len(x)).run(self.outputs, {INPUT: x})))

    def execute(self, requests):
        """Run the requests Triton hands over (one batch when dynamic batching merges them);
        one response per request, an error response for each when the run fails.
        """
        import triton_python_backend_utils as pb_utils

        inputs = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy() for r in requests]
        try:
            inputs = [self.decode(x) for x in inputs] if self.decode else inputs
            answers = run_requests(self._run, inputs, self.merge)
        except Exception as exc:  # onnxruntime, Pillow raise several types: each request gets the error
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(_first_line(exc)))
                    for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(a[n]))
                                                           for n in self.outputs]) for a in answers]

    def finalize(self) -> None:
        """Drop the sessions (Triton calls it when the model is unloaded)."""
        self.sessions.clear()
