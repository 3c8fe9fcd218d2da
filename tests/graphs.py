"""Tiny synthetic ONNX graphs for the cut analysis and surgery tests.

Every builder returns a ModelProto with one float32 input ``x`` [N, C, H, W] and a dynamic
batch dimension; conv weights are random so that every cut carries real numbers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class G:
    """A small graph builder: ``g.conv("a", "x", 8)`` adds a Conv and returns its output name."""

    def __init__(self, c=3, hw=16, dtype=TensorProto.FLOAT, input_name="x"):
        self.nodes, self.inits, self.c, self.hw = [], [], {}, hw
        self.input = helper.make_tensor_value_info(input_name, dtype, ["N", c, hw, hw])
        self.c[input_name] = c
        # One generator per graph: a graph's weights do not depend on which graphs were built
        # before it (module collection order changed them, and with them what a test saw).
        self.rng = np.random.default_rng(0)

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, ins, out, **attrs):
        outs = [out] if isinstance(out, str) else out
        self.nodes.append(helper.make_node(op, ins, outs, name=f"n_{outs[0]}", **attrs))
        return out

    def conv(self, out, x, cout, k=1, stride=1):
        cin = self.c[x]
        w = self.init(f"{out}.w",
                      (self.rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32))
        self.c[out] = cout
        return self.node("Conv", [x, w], out, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[k // 2] * 4)

    def relu(self, out, x):
        self.c[out] = self.c[x]
        return self.node("Relu", [x], out)

    def add(self, out, a, b):
        self.c[out] = self.c[a]
        return self.node("Add", [a, b], out)

    def concat(self, out, *xs):
        self.c[out] = sum(self.c[x] for x in xs)
        return self.node("Concat", list(xs), out, axis=1)

    def model(self, outputs, opset=17, ir=None, out_dtype=TensorProto.FLOAT):
        outs = [helper.make_tensor_value_info(o, out_dtype, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", [self.input], outs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        # IR 10 (onnx 1.16): what torch exports and what older onnxruntime releases still load
        m.ir_version = ir if ir is not None else 10
        inferred = onnx.shape_inference.infer_shapes(m)
        del m.graph.output[:]
        m.graph.output.extend(inferred.graph.output)
        return m


def chain():
    """x -> a -> b -> c -> y: every intermediate is a cut point."""
    g = G()
    g.conv("a", "x", 8)
    g.relu("b", "a")
    g.conv("c", "b", 2, stride=2)
    g.relu("y", "c")
    return g.model(["y"]), ["a", "b", "c"]


def residual():
    """x -> a -> (b -> c) + a -> s -> y: b and c are bypassed by the skip connection."""
    g = G()
    g.conv("a", "x", 4)
    g.conv("b", "a", 8)
    g.conv("c", "b", 4)
    g.add("s", "c", "a")
    g.conv("y", "s", 2, stride=2)
    return g.model(["y"]), ["a", "s"]


def squeeze_excite():
    """x -> a -> GAP -> r -> sigmoid -> a*gate -> y: the gate path bypasses nothing but itself."""
    g = G()
    g.conv("a", "x", 8)
    g.node("GlobalAveragePool", ["a"], "p")
    g.c["p"] = 8
    g.conv("r", "p", 2)
    g.conv("e", "r", 8)
    g.node("Sigmoid", ["e"], "gate")
    g.c["gate"] = 8
    g.node("Mul", ["a", "gate"], "m")
    g.c["m"] = 8
    g.conv("y", "m", 2, stride=2)
    return g.model(["y"]), ["a", "m"]


def inception():
    """Four branches from a concatenated into one tensor: only a and the concat are cuts."""
    g = G()
    g.conv("a", "x", 8)
    g.conv("b1", "a", 2)
    g.conv("b2a", "a", 4)
    g.conv("b2", "b2a", 2, k=3)
    g.node("MaxPool", ["a"], "b3a", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    g.c["b3a"] = 8
    g.conv("b3", "b3a", 2)
    g.concat("cat", "b1", "b2", "b3", "a")
    g.conv("y", "cat", 2, stride=2)
    return g.model(["y"]), ["a", "cat"]


def dense():
    """DenseNet-style: each concatenation re-reads every earlier tensor, so c1 is bypassed."""
    g = G()
    g.conv("a", "x", 4)
    g.conv("l1", "a", 2)
    g.concat("c1", "a", "l1")
    g.conv("l2", "c1", 2)
    g.concat("c2", "a", "l1", "l2")
    g.conv("y", "c2", 2, stride=2)
    return g.model(["y"]), ["a", "c2"]


def constant_weights():
    """Conv weights produced by a constant subgraph (Constant -> Mul -> Reshape), which is no path."""
    g = G()
    g.conv("a", "x", 4)
    w = g.rng.standard_normal(4 * 4).astype(np.float32)
    g.nodes.append(helper.make_node("Constant", [], ["wflat"], value=numpy_helper.from_array(w, "wv")))
    g.init("two", np.array(2.0, np.float32))
    g.node("Mul", ["wflat", "two"], "wscaled")
    g.init("wshape", np.array([4, 4, 1, 1], np.int64))
    g.node("Reshape", ["wscaled", "wshape"], "w2")
    g.node("Conv", ["a", "w2"], "b", kernel_shape=[1, 1])
    g.c["b"] = 4
    g.relu("y", "b")
    return g.model(["y"]), ["a", "b"]


def two_outputs():
    """x -> a -> b -> {y1, y2}: b feeds both outputs, so a and b are cuts; y1 and y2 are not."""
    g = G()
    g.conv("a", "x", 4)
    g.conv("b", "a", 2, stride=2)
    g.relu("y1", "b")
    g.node("Sigmoid", ["b"], "y2")
    return g.model(["y1", "y2"]), ["a", "b"]


def early_output():
    """An output taken from an early tensor: ``a`` is itself an output and dominates ``y``, so it
    is a cut point (the head returns it, the tail computes ``y`` from it); the path x -> a ->
    output bypasses b, so b is not one."""
    g = G()
    g.conv("a", "x", 4)
    g.conv("b", "a", 2, stride=2)
    g.relu("y", "b")
    return g.model(["a", "y"]), ["a"]


def tf_same_pad():
    """timm tf_-style run-time "same" padding: Shape -> Gather(H) -> arithmetic -> Pad.

    Before folding, Shape(a) and the Pad both read ``a``; after folding, the pads are a constant.
    """
    g = G(hw=15)
    g.conv("a", "x", 4)
    g.node("Shape", ["a"], "sh")
    g.init("idx2", np.array(2, np.int64))
    g.node("Gather", ["sh", "idx2"], "h", axis=0)
    g.init("two", np.array(2, np.int64))
    g.node("Mod", ["h", "two"], "odd")  # 1 for odd sizes
    g.init("zero", np.array([0], np.int64))
    g.init("ax0", np.array([0], np.int64))
    g.node("Unsqueeze", ["odd", "ax0"], "odd1")
    g.node("Concat", ["zero", "zero", "zero", "zero", "zero", "zero", "odd1", "odd1"], "pads", axis=0)
    g.node("Pad", ["a", "pads"], "p")
    g.c["p"] = 4
    g.conv("b", "p", 4, k=3, stride=2)
    g.relu("y", "b")
    return g.model(["y"]), ["a", "p", "b"]


def batch_reshape():
    """Shape(a)[0] (the batch size) feeds a Reshape near the end (``x.view(x.size(0), -1)``):
    the tail can read the batch size from any cut tensor, so a, b and c are all cut points."""
    g = G()
    g.conv("a", "x", 4)
    g.node("Shape", ["a"], "sh")
    g.init("idx0", np.array([0], np.int64))
    g.node("Gather", ["sh", "idx0"], "n", axis=0)
    g.conv("b", "a", 2, stride=2)
    g.relu("c", "b")
    g.init("minus1", np.array([-1], np.int64))
    g.node("Concat", ["n", "minus1"], "shape2", axis=0)
    g.node("Reshape", ["c", "shape2"], "y")
    return g.model(["y"]), ["a", "b", "c"]


def batch_merge_reshape():
    """The batch size is read from a tensor whose leading axis is 2N (the batch merged with
    another axis), then halved for a Reshape near the end: that read is not the batch dimension
    itself, so it stays a path, and nothing between a and the Reshape can be cut."""
    g = G()
    g.conv("a", "x", 4)
    g.init("pairs", np.array([-1, 2, 16, 16], np.int64))
    g.node("Reshape", ["a", "pairs"], "a2")  # [2N, 2, 16, 16]
    g.node("Shape", ["a2"], "sh")
    g.init("idx0", np.array([0], np.int64))
    g.node("Gather", ["sh", "idx0"], "n2", axis=0)
    g.init("two", np.array([2], np.int64))
    g.node("Div", ["n2", "two"], "n")
    g.conv("b", "a", 2, stride=2)
    g.relu("c", "b")
    g.init("minus1", np.array([-1], np.int64))
    g.node("Concat", ["n", "minus1"], "shape2", axis=0)
    g.node("Reshape", ["c", "shape2"], "y")
    return g.model(["y"]), ["a"]


def if_outer_scope():
    """An If whose branches read ``a`` from the outer scope: a stays a cut, the If is opaque."""
    g = G()
    g.conv("a", "x", 4)
    g.conv("b", "a", 4)
    then_g = helper.make_graph([helper.make_node("Relu", ["a"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Sigmoid", ["a"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    g.init("cond", np.array(True))
    g.nodes.append(helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"))
    g.c["branch"] = 4
    g.add("s", "b", "branch")
    g.conv("y", "s", 2, stride=2)
    return g.model(["y"]), ["a", "s"]


def expanding():
    """Every cut point is bigger than the input: no natural bottleneck."""
    g = G(c=1, hw=8)
    g.conv("a", "x", 4)
    g.relu("b", "a")
    g.conv("y", "b", 4)
    return g.model(["y"]), ["a", "b"]


def old_opset():
    """Opset 9 / IR 3: initializers are listed among the graph inputs too."""
    m, cuts = chain()
    m = onnx.ModelProto.FromString(m.SerializeToString())
    m.ir_version = 3
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", 9))
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m, cuts


def odd_names():
    """Tensor names with '/' and ':' as exporters make them."""
    g = G(input_name="input:0")
    g.conv("/stem/conv:0", "input:0", 8)
    g.relu("/stem/act:0", "/stem/conv:0")
    g.conv("/head/conv:0", "/stem/act:0", 1, stride=2)
    return g.model(["/head/conv:0"]), ["/stem/conv:0", "/stem/act:0"]


ALL = {
    "chain": chain, "residual": residual, "squeeze_excite": squeeze_excite, "inception": inception,
    "dense": dense, "constant_weights": constant_weights, "two_outputs": two_outputs,
    "early_output": early_output, "tf_same_pad": tf_same_pad, "batch_reshape": batch_reshape,
    "if_outer_scope": if_outer_scope, "expanding": expanding, "old_opset": old_opset,
    "odd_names": odd_names,
}
