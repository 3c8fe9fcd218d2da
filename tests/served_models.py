"""Tiny ONNX models for the output contract, the server and the files other tools read.

``outputs_model`` has one output of every kind a server must answer: batch first (``logits``),
batch on axis 1 (``scores_t``: ``[10, N]``), symbolic non-batch dimensions (``feat`` declared
``[N, 'c', 'h', 'w']``) and a constant (``prototypes``, an initializer that is also an output).
``stub_trtexec`` and ``run_script`` run an emitted shell script with a ``trtexec`` stub that
records its argv.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _w(rng, name, *shape):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def conv_net(input_name="image", names=None, batch="N", outputs=("logits",), batch_norm=False, channels=(8, 16),
             hw=16, seed=0) -> onnx.ModelProto:
    """image [batch, 3, hw, hw] -> conv -> relu -> conv (stride 2) -> relu -> GAP -> flatten -> MatMul.

    Args:
        names: the intermediate tensor names (6), to test names that shells and tools mangle.
        outputs: any of ``logits`` [N, 10], ``scores_t`` [10, N], ``feat`` [N, 'c', 'h', 'w'],
            ``prototypes`` (the MatMul's weight [C, 10], also a graph output), ``batch_mean``
            ([10]: logits averaged over the batch; no batch axis, not a constant).
        batch_norm: a BatchNormalization after each conv (engines fuse it: their results differ
            from the ONNX by a few float32 ulps).
    """
    rng = np.random.default_rng(seed)
    c1, c2 = channels
    a, b, c, d, e, f = names or ["c1", "r1", "c2", "r2", "gap", "emb"]
    inits = [_w(rng, "w1", c1, 3, 3, 3), _w(rng, "b1", c1), _w(rng, "w2", c2, c1, 3, 3), _w(rng, "b2", c2),
             _w(rng, "prototypes", c2, 10)]
    nodes = [helper.make_node("Conv", [input_name, "w1", "b1"], [a + ("_pre" if batch_norm else "")], pads=[1] * 4)]
    if batch_norm:
        inits += [numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), f"bn{k}.{p}")
                  for k, c in ((1, c1), (2, c2)) for p in ("s", "v")]
        inits += [numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"bn{k}.{p}")
                  for k, c in ((1, c1), (2, c2)) for p in ("b", "m")]
        nodes.append(helper.make_node("BatchNormalization", [a + "_pre", "bn1.s", "bn1.b", "bn1.m", "bn1.v"], [a]))
    nodes += [helper.make_node("Relu", [a], [b]),
              helper.make_node("Conv", [b, "w2", "b2"], [c + ("_pre" if batch_norm else "")], strides=[2, 2],
                               pads=[1] * 4)]
    if batch_norm:
        nodes.append(helper.make_node("BatchNormalization", [c + "_pre", "bn2.s", "bn2.b", "bn2.m", "bn2.v"], [c]))
    nodes += [helper.make_node("Relu", [c], [d]),
              helper.make_node("GlobalAveragePool", [d], [e]),
              helper.make_node("Flatten", [e], [f]),
              helper.make_node("MatMul", [f, "prototypes"], ["logits"])]
    outs = []
    for o in outputs:
        if o == "logits":
            outs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10]))
        elif o == "scores_t":
            nodes.append(helper.make_node("Transpose", ["logits"], ["scores_t"], perm=[1, 0]))
            outs.append(helper.make_tensor_value_info("scores_t", TensorProto.FLOAT, [10, batch]))
        elif o == "feat":
            nodes.append(helper.make_node("Sigmoid", [e], ["feat"]))
            outs.append(helper.make_tensor_value_info("feat", TensorProto.FLOAT, [batch, "c", "h", "w"]))
        elif o == "prototypes":
            outs.append(helper.make_tensor_value_info("prototypes", TensorProto.FLOAT, [c2, 10]))
        elif o == "batch_mean":
            nodes.append(helper.make_node("ReduceMean", ["logits"], ["batch_mean"], axes=[0], keepdims=0))
            outs.append(helper.make_tensor_value_info("batch_mean", TensorProto.FLOAT, [10]))
        else:
            raise ValueError(o)
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                           [batch, 3, hw, hw])], outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def outputs_model() -> onnx.ModelProto:
    return conv_net(outputs=("logits", "scores_t", "feat", "prototypes"))


def set_batch_fields(split_dir: Path, fixed_batch=None, batch_independent=None) -> None:
    """Write ``model.fixed_batch`` / ``model.batch_independent`` into a split dir's manifest, as
    ``split`` will once it finds them (the manifest is not among the hashed files)."""
    path = Path(split_dir) / "manifest.json"
    d = json.loads(path.read_text())
    d["model"]["fixed_batch"], d["model"]["batch_independent"] = fixed_batch, batch_independent
    path.write_text(json.dumps(d, indent=2) + "\n")


def stub_trtexec(tmp_path: Path) -> tuple[Path, Path]:
    """A ``trtexec`` on PATH that records its argv (one JSON list per line) and writes the engine."""
    bin_dir, log = tmp_path / "bin", tmp_path / "argv.jsonl"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "trtexec"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    "for a in sys.argv[1:]:\n"
                    "    if a.startswith('--saveEngine='):\n"
                    "        open(a.split('=', 1)[1], 'w').write('plan')\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return bin_dir, log


def run_script(script: Path, cwd: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(["sh", str(script)], cwd=cwd, env=env, capture_output=True, text=True)
