"""The only code in :mod:`dsc_export.graph` that runs a model (with onnxruntime): tensors
recorded from real runs where static evaluation cannot size them, and activation peaks for the
float16 conversion. Sessions come from :func:`dsc_export.ort.make_session` (non-spinning).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from dsc_export.errors import ModelRunError
from dsc_export.graph.signature import TWO_GB
from dsc_export.ort import make_session, random_inputs


def run_with_outputs(
    model: onnx.ModelProto, names: list[str], batches: tuple[int, ...], *, seed: int = 0, inputs=None,
) -> list[dict[str, np.ndarray]]:
    """Run ``model`` once per batch size, returning the named tensors.

    The tensors are added as graph outputs to a copy of the model; models over 2 GB are run
    from a temporary folder with external data.

    Args:
        model: the model.
        names: tensors to return.
        batches: batch sizes to run at.
        seed: seed of the random inputs (when ``inputs`` is None).
        inputs: sample inputs (an object with ``feeds(batch, index)``, e.g.
            :class:`dsc_export.inputs.SampleInputs`); None: random inputs.

    Raises:
        ModelRunError: onnxruntime fails at one of the batch sizes (its ``batch`` says which).
    """

    graph_outputs = model.graph.output
    n_before = len(graph_outputs)
    existing = {o.name for o in graph_outputs}
    for name in names:
        if name not in existing:
            graph_outputs.append(onnx.ValueInfoProto(name=name))
    rng = np.random.default_rng(seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="dsc-probe-") as tmp:
        try:
            if model.ByteSize() > TWO_GB:
                path = Path(tmp) / "probe.onnx"
                onnx.save(model, os.fspath(path), save_as_external_data=True,
                          location="probe.onnx.data", convert_attribute=False)
                onnx.load_external_data_for_model(model, tmp)  # onnx.save moved the data out
                sess = make_session(path, optimization="none", arena=False)
            else:
                data = model.SerializeToString()
                sess = make_session(data, optimization="none", arena=False)
                del data
        finally:
            while len(graph_outputs) > n_before:
                graph_outputs.pop()
        for b in batches:
            feeds = random_inputs(sess, b, rng) if inputs is None else inputs.feeds(b)
            try:
                values = sess.run(names, feeds) if names else []
            except Exception as exc:  # onnxruntime raises several unrelated types
                raise ModelRunError("the model", b, exc) from exc
            results.append(dict(zip(names, values)))
    return results


def run_samples(model: onnx.ModelProto, names: list[str], samples: list[dict[str, np.ndarray]]):
    """Run ``model`` (onnxruntime, CPU, basic graph optimisation) once per sample.

    Args:
        model: the model (serialized whole: under protobuf's 2 GB).
        names: the outputs to return.
        samples: feeds by input name.

    Yields:
        Per sample, the arrays of ``names`` in that order.
    """
    session = make_session(model.SerializeToString(), optimization="basic", arena=False)
    for feeds in samples:
        yield session.run(names, feeds)
