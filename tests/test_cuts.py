"""Cut points by dominance on small synthetic graphs, checked exactly and against brute force."""


import graphs
import numpy as np
import pytest
from onnx import TensorProto, helper

from dsc_export.graph.cuts import (
    compressive_mask,
    describe_cut_points,
    find_cut_points,
    why_not_cut,
)
from dsc_export.graph.folding import fold_shape_arithmetic
from dsc_export.graph.model import data_dependent, dataflow


def cuts_of(model):
    folded, _ = fold_shape_arithmetic(model)
    return find_cut_points(dataflow(folded.graph))


@pytest.mark.parametrize("name", sorted(graphs.ALL))
def test_exact_cut_points(name):
    model, expected = graphs.ALL[name]()
    assert cuts_of(model) == expected


def brute_force_cuts(df):
    """A tensor is a cut point iff removing it disconnects every input from every output."""
    values, shapes = data_dependent(df)
    dep = values | shapes
    succ = {}
    for n in df.nodes:
        for i in n.inputs:
            if i in dep:
                succ.setdefault(i, set()).update(o for o in n.outputs if o)

    def reaches(removed):
        seen, stack = set(), [i for i in df.inputs if i != removed]
        while stack:
            t = stack.pop()
            if t in seen or t == removed:
                continue
            seen.add(t)
            if t in df.outputs:
                return True
            stack.extend(succ.get(t, ()))
        return False

    ends = set(df.inputs) | set(df.outputs)
    return {t for t in dep if t not in ends and reaches(None) and not reaches(t)
            and any(t in n.inputs for n in df.nodes)}


def random_dag(seed, n_nodes=25):
    rng = np.random.default_rng(seed)
    tensors, nodes = ["x"], []
    for k in range(n_nodes):
        out = f"t{k}"
        if rng.random() < 0.5 and len(tensors) > 1:
            a, b = rng.choice(len(tensors), 2, replace=False)
            nodes.append(helper.make_node("Add", [tensors[a], tensors[b]], [out]))
        else:
            # mostly chain from recent tensors
            a = max(0, len(tensors) - 1 - int(rng.integers(0, 3)))
            nodes.append(helper.make_node("Relu", [tensors[a]], [out]))
        tensors.append(out)
    outs = [tensors[-1]] + ([tensors[int(rng.integers(1, len(tensors)))]] if rng.random() < 0.3 else [])
    outs = list(dict.fromkeys(outs))
    g = helper.make_graph(nodes, "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 4]) for o in outs])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("seed", range(40))
def test_dominance_matches_brute_force_on_random_dags(seed):
    model = random_dag(seed)
    df = dataflow(model.graph)
    assert set(find_cut_points(df)) == brute_force_cuts(df)


@pytest.mark.parametrize("name", sorted(graphs.ALL))
def test_synthetic_graphs_match_brute_force(name):
    model, _ = graphs.ALL[name]()
    folded, _ = fold_shape_arithmetic(model)
    df = dataflow(folded.graph)
    assert set(find_cut_points(df)) == brute_force_cuts(df)


def test_topological_order_does_not_matter():
    model, expected = graphs.inception()
    nodes = list(model.graph.node)
    # move the MaxPool branch first: still a valid topological order (it reads only 'a')
    a_idx = next(k for k, n in enumerate(nodes) if n.output[0] == "a")
    reordered = nodes[: a_idx + 1] + sorted(nodes[a_idx + 1:], key=lambda n: n.op_type != "MaxPool")
    del model.graph.node[:]
    model.graph.node.extend(reordered)
    assert find_cut_points(dataflow(model.graph)) == expected


def test_unfolded_shape_arithmetic_blocks_cuts_until_folded():
    model, expected = graphs.tf_same_pad()
    assert "p" in find_cut_points(dataflow(model.graph))  # Pad reads a too, so p stays a cut
    # the Shape path from a to the Pad bypasses nothing but itself; after folding the Shape is gone
    folded, report = fold_shape_arithmetic(model)
    assert report.folded == ["pads"] and report.batch_dependent == []
    assert not any(n.op_type == "Shape" for n in folded.graph.node)
    assert find_cut_points(dataflow(folded.graph)) == expected


def test_batch_size_read_becomes_one_read_of_the_input_batch():
    model, expected = graphs.batch_reshape()
    assert find_cut_points(dataflow(model.graph)) == ["a"]  # before: Shape(a) bypasses b and c
    folded, report = fold_shape_arithmetic(model)
    assert report.batch_dependent == [] and len(report.batch_reads) == 1
    reads = [n for n in folded.graph.node if n.op_type == "Shape"]
    assert [(n.name, list(n.input)) for n in reads] == [("dsc_export/batch_read", ["x"])]
    assert find_cut_points(dataflow(folded.graph)) == expected
    # same outputs at several batch sizes as the original
    import onnxruntime as ort

    for b in (1, 4):
        x = np.random.default_rng(b).standard_normal((b, 3, 16, 16)).astype(np.float32)
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        got = ort.InferenceSession(folded.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, want)


def test_read_of_a_merged_batch_axis_is_kept_and_explained():
    model, expected = graphs.batch_merge_reshape()
    folded, report = fold_shape_arithmetic(model)
    assert report.batch_dependent == ["shape2"] and report.batch_reads == []
    df = dataflow(folded.graph)
    assert find_cut_points(df) == expected
    reason = why_not_cut(df, "b")
    assert "bypasses" in reason
    assert why_not_cut(df, "a").endswith("is a cut point")


def test_eq3_compressive_mask():
    ratios = [1.5, 0.8, 0.9, 0.8, 0.5, 0.5, 0.7, 0.1, 2.0, 0.05]
    assert compressive_mask(ratios) == [False, True, False, False, True, False, False, True, False, True]
    assert compressive_mask([1.0, 1.0]) == [False, False]  # c < 1 is strict
    assert compressive_mask([]) == []


def test_bytes_vs_elements_with_uint8_input_and_float16_wire():
    shapes = {"a": ([8, 4, 4], "float32"), "b": ([2, 4, 4], "float32"), "i": ([3, 8, 8], "int64")}
    # input: uint8 3x8x8 = 192 bytes and elements
    pts = describe_cut_points(["a", "b", "i"], shapes, input_bytes=192, input_elements=192, wire_dtype="float32")
    assert [p.bytes for p in pts] == [512, 128, 1536]
    assert [p.element_ratio for p in pts] == [128 / 192, 32 / 192, 1.0]
    assert [p.natural for p in pts] == [False, True, False]
    half = describe_cut_points(["a", "b", "i"], shapes, input_bytes=192, input_elements=192, wire_dtype="float16")
    assert [p.bytes for p in half] == [256, 64, 1536]  # int64 is not cast
    assert [p.compressive for p in half] == [False, True, False]


def test_topological_order_puts_every_node_after_its_producers():
    from dsc_export.graph.model import topological_order

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        # a random DAG over t0..t{n-1}: node k writes t{k} and reads some t{j}, j < k
        reads = [[f"t{j}" for j in range(k) if rng.random() < 0.3] + ["x"] for k in range(n)]
        writes = [[f"t{k}"] for k in range(n)]
        perm = rng.permutation(n)
        order, stuck = topological_order([reads[p] for p in perm], [writes[p] for p in perm])
        assert stuck is None and sorted(order) == list(range(n))
        pos = {int(perm[k]): at for at, k in enumerate(order)}
        assert all(pos[int(j[1:])] < pos[k] for k in range(n) for j in reads[k] if j != "x")
        assert topological_order(reads, writes) == (list(range(n)), None)  # sorted: kept as it is


def test_topological_order_reports_a_node_of_a_cycle():
    from dsc_export.graph.model import topological_order

    order, stuck = topological_order([["x"], ["c"], ["b"]], [["a"], ["b"], ["c"]])
    assert order == [0] and stuck in (1, 2)
