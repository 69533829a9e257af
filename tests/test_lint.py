"""The TensorRT explicit-quantization lint: one hand-built graph broken one rule at a time, then
the tiny model exported with the ``trt`` (clean) and ``cpu-avx2`` (uint8 activations) profiles."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.lint import RULES, Violation, format_report, lint

K, N = 8, 6


def _clean(attention: bool = True) -> onnx.ModelProto:
    """X [1, 4, 8] -> Q/DQ (int8, scalar scale) -> MatMul with DQ(int8 W [K, N], scale [N], axis 1)
    -> y [1, 4, 6]; with ``attention``, also a float MatMul of y with its own transpose."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(rng.integers(-127, 128, size=(K, N), dtype=np.int8), "w"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, N).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(N, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["w_dq"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="proj"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, N])]
    if attention:
        nodes += [
            helper.make_node("Transpose", ["y"], ["y_t"], name="k_t", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["y", "y_t"], ["scores"], name="attn_scores"),
        ]
        outputs.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 4]))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, K])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _node(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.name == name)


def _set_init(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value, name))
            return
    m.graph.initializer.append(numpy_helper.from_array(value, name))


def _drop_init(m: onnx.ModelProto, name: str) -> None:
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == name))


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("axis", axis))


# --- mutations: each breaks exactly one rule --------------------------------------------------


def _opset_12(m):
    m.opset_import[0].version = 12


def _uint8_zp(m):
    _set_init(m, "x_zp", np.array(128, np.uint8))


def _q_without_zp(m):  # no zero point and no output_dtype: QuantizeLinear produces uint8
    del _node(m, "q_x").input[2]
    del _node(m, "dq_x").input[2]


def _nonzero_zp(m):
    _set_init(m, "x_zp", np.array(3, np.int8))


def _per_channel_activation(m):
    _set_init(m, "x_scale", np.full(K, 0.05, np.float32))
    _set_init(m, "x_zp", np.zeros(K, np.int8))
    for name in ("q_x", "dq_x"):
        _set_axis(_node(m, name), -1)


def _weight_axis_0(m):  # per-input-channel: one scale per K row
    _set_init(m, "w_scale", np.full(K, 0.05, np.float32))
    _set_init(m, "w_zp", np.zeros(K, np.int8))
    _set_axis(_node(m, "dq_w"), 0)


def _transpose_after_weight_dq(m):  # the torch layout [N, K] transposed in the graph
    _set_init(m, "w", numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w")).T.copy())
    _set_axis(_node(m, "dq_w"), 0)
    _node(m, "proj").input[1] = "w_t"
    m.graph.node.insert(3, helper.make_node("Transpose", ["w_dq"], ["w_t"], name="w_transpose", perm=[1, 0]))


def _float_weight(m):  # A quantized, B a plain float initializer
    m.graph.node.remove(_node(m, "dq_w"))
    for name in ("w", "w_scale", "w_zp"):
        _drop_init(m, name)
    _set_init(m, "w_float", np.ones((K, N), np.float32))
    _node(m, "proj").input[1] = "w_float"


def _bias_dq(dtype):
    def mutate(m):
        _set_init(m, "b", np.arange(N, dtype=dtype))
        _set_init(m, "b_scale", np.array(0.01, np.float32))
        _set_init(m, "b_zp", np.array(0, dtype))
        _node(m, "proj").output[0] = "y_nobias"
        m.graph.node.insert(4, helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zp"], ["b_dq"], name="dq_b"))
        m.graph.node.insert(5, helper.make_node("Add", ["y_nobias", "b_dq"], ["y"], name="add_bias"))
    return mutate


def _dynamic_quant(m):
    m.graph.node.append(helper.make_node("DynamicQuantizeLinear", ["x"], ["dx_q", "dx_scale", "dx_zp"], name="dyn_q"))


def _matmul_integer(m):
    _set_init(m, "a_int", np.ones((4, K), np.int8))
    m.graph.node.append(helper.make_node("MatMulInteger", ["a_int", "w"], ["y_int"], name="mm_int"))
    m.graph.output.append(helper.make_tensor_value_info("y_int", TensorProto.INT32, [4, N]))


def _scale_value(name, index, value):
    def mutate(m):
        v = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name)).copy()
        v[index] = value
        _set_init(m, name, v)
    return mutate


def _scale_from_input(m):
    _drop_init(m, "x_scale")
    m.graph.input.append(helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, []))


def _q_feeds_cast(m):
    m.graph.node.append(helper.make_node("Cast", ["x_q"], ["x_peek"], name="peek", to=TensorProto.FLOAT))
    m.graph.output.append(helper.make_tensor_value_info("x_peek", TensorProto.FLOAT, [1, 4, K]))


def _dq_other_scale(m):
    _set_init(m, "x_scale_dq", np.array(0.1, np.float32))
    _node(m, "dq_x").input[1] = "x_scale_dq"


# (case id, mutation, the one rule that must fire, exactly the nodes it names, a word of the message)
CASES: list[tuple[str, Callable, str, set[str], str]] = [
    ("opset-12", _opset_12, "opset", {"opset_import"}, "opset is 12"),
    ("uint8-zp", _uint8_zp, "int8-type", {"q_x", "dq_x"}, "--profile trt"),
    ("q-without-zp", _q_without_zp, "int8-type", {"q_x", "dq_x"}, "uint8"),
    ("nonzero-zp", _nonzero_zp, "symmetric", {"q_x", "dq_x"}, "is 3"),
    ("per-channel-activation", _per_channel_activation, "per-tensor-activation", {"q_x", "dq_x"}, "[8]"),
    ("weight-axis-0", _weight_axis_0, "per-channel-weight", {"dq_w"},
     "axis 0 (attribute 0), but MatMul 'proj' input B [8, 6] needs axis 1"),
    ("transpose-after-dq", _transpose_after_weight_dq, "qdq-before-matmul", {"w_transpose"}, "Transpose between"),
    ("half-quantized", _float_weight, "qdq-before-matmul", {"proj"}, "input B 'w_float' is float (an initializer)"),
    ("int32-bias-dq", _bias_dq(np.int32), "no-bias-dq", {"dq_b"}, "int32 tensor 'b'"),
    ("int8-bias-dq-add", _bias_dq(np.int8), "no-bias-dq", {"dq_b"}, "Add 'add_bias' after quantized MatMul 'proj'"),
    ("dynamic-quantize", _dynamic_quant, "no-dynamic-quant", {"dyn_q"}, "DynamicQuantizeLinear"),
    ("matmul-integer", _matmul_integer, "no-dynamic-quant", {"mm_int"}, "MatMulInteger"),
    ("zero-scale", _scale_value("x_scale", (), 0.0), "constant-positive-scale", {"q_x", "dq_x"}, "(first 0 at index 0)"),
    ("negative-scale", _scale_value("w_scale", 3, -0.05), "constant-positive-scale", {"dq_w"}, "(first -0.05 at index 3)"),
    ("nan-scale", _scale_value("w_scale", 0, np.nan), "constant-positive-scale", {"dq_w"}, "(first nan at index 0)"),
    ("scale-from-input", _scale_from_input, "constant-positive-scale", {"q_x", "dq_x"}, "a graph input"),
    ("q-feeds-cast", _q_feeds_cast, "qdq-pair", {"q_x"}, "feeds Cast 'peek'"),
    ("q-dq-scale-mismatch", _dq_other_scale, "qdq-pair", {"dq_x"}, "scale 'x_scale_dq' = 0.1, not 'x_scale' = 0.05"),
]


def test_clean_graph_passes_with_exact_counts():
    m = _clean()
    onnx.checker.check_model(m, full_check=True)
    report = lint(m)
    assert report.violations == [] and report.passed
    assert report.checked == {"nodes": 6, "quantize_linear": 1, "dequantize_linear": 2, "weight_dq": 1,
                              "quantized_matmuls": 1, "float_matmuls": 1}
    assert lint(_clean(attention=False)).checked["float_matmuls"] == 0


@pytest.mark.parametrize("case_id, mutate, rule, nodes, words", CASES, ids=[c[0] for c in CASES])
def test_each_mutation_breaks_exactly_its_rule(case_id, mutate, rule, nodes, words):
    m = _clean()
    mutate(m)
    report = lint(m)
    assert {v.rule for v in report.violations} == {rule}, format_report(report)
    assert {v.node for v in report.violations} == nodes
    assert len(report.violations) == len(nodes)
    assert all(words in v.message for v in report.violations), format_report(report)


def test_every_rule_has_a_breaking_case():
    assert {c[2] for c in CASES} == set(RULES)


def test_gemm_weight_axis_and_bias():
    """Gemm with transB=1 takes W as [N, K]: its per-channel scale lies on axis 0; a DQ on input C is a bias."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, N])
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.ones((N, K), np.int8), "w"),
        numpy_helper.from_array(np.full(N, 0.02, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(N, np.int8), "w_zp"),
        numpy_helper.from_array(np.ones(N, np.int32), "b"),
    ]

    def build(axis: int, bias_dq: bool) -> onnx.ModelProto:
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="dq"),
            helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wdq"], name="dq_w", axis=axis),
        ]
        c = []
        if bias_dq:
            nodes.append(helper.make_node("DequantizeLinear", ["b", "w_scale"], ["bdq"], name="dq_b", axis=0))
            c = ["bdq"]
        nodes.append(helper.make_node("Gemm", ["xdq", "wdq", *c], ["y"], name="fc", transB=1))
        g = helper.make_graph(nodes, "gemm", [x], [y], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    assert lint(build(0, False)).passed
    bad_axis = lint(build(1, False)).violations
    assert [(v.rule, v.node) for v in bad_axis] == [("per-channel-weight", "dq_w")]
    assert "needs axis 0" in bad_axis[0].message
    assert [(v.rule, v.node) for v in lint(build(0, True)).violations] == [("no-bias-dq", "dq_b")]


def test_output_dtype_int8_without_zero_point_is_clean():
    m = _clean()
    _q_without_zp(m)
    _node(m, "q_x").attribute.append(helper.make_attribute("output_dtype", TensorProto.INT8))
    onnx.checker.check_model(m, full_check=True)
    assert lint(m).passed


def test_unnamed_node_is_named_by_type_and_index():
    m = _clean()
    _float_weight(m)
    _node(m, "proj").name = ""
    assert [v.node for v in lint(m).violations] == ["MatMul#2"]  # q_x, dq_x, then the MatMul


def test_external_data_is_not_needed(tmp_path):
    m = _clean()
    _scale_value("w_scale", 0, -1.0)(m)  # only detectable with the values
    path = tmp_path / "model.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    report = lint(path)
    assert report.passed  # every initializer is external: value checks are skipped, not crashed
    assert report.checked == lint(_clean()).checked


def test_report_formats(tmp_path, capsys):
    m = _clean()
    _nonzero_zp(m)
    report = lint(m)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is False and d["counts"]["quantized_matmuls"] == 1
    assert d["violations"][0] == {"rule": "symmetric", "node": "q_x", "message": report.violations[0].message}
    assert report.by_rule() == {"symmetric": 2}
    text = format_report(report).splitlines()
    assert text[:2] == [str(v) for v in report.violations] and len(text) == 3
    assert str(Violation("symmetric", "q_x", "m")) == "[symmetric] q_x: m"
    assert "FAILED: 2 violation(s) (symmetric x2)" in text[2]
    assert format_report(lint(_clean())).startswith("TensorRT lint passed: 1 quantized MatMul/Gemm")

    onnx.save_model(m, str(tmp_path / "m.onnx"))
    assert lint(tmp_path / "m.onnx").to_dict() == d  # by path: the same report


# --- the real exporter ---------------------------------------------------------------------------


def _export(profile: str, folder: Path) -> tuple[Path, int]:
    """The tiny model, calibrated on one batch, exported with ``profile``; returns the path and
    the number of quantized linear layers."""
    import torch

    from exporters import export_onnx
    from sasq_edge.calibrate import calibrate
    from sasq_edge.config import QuantConfig
    from sasq_edge.models import tiny_random_llama
    from sasq_edge.modules import prepare, quant_linears
    from sasq_edge.state import state_from_model

    lm = tiny_random_llama()
    cfg = QuantConfig.plain(profile=profile, calib_batches=1)
    prepare(lm.model, cfg)
    calibrate(lm.model, [torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(1))], cfg)
    res = export_onnx(lm.model, folder / "model.onnx", state=state_from_model(lm.model, cfg, lm.source))
    return res.onnx, sum(1 for _ in quant_linears(lm.model))


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    return _export("trt", tmp_path_factory.mktemp("lint_trt"))


@pytest.fixture(scope="module")
def avx2_export(tmp_path_factory):
    return _export("cpu-avx2", tmp_path_factory.mktemp("lint_avx2"))


def test_trt_export_passes(trt_export):
    path, n_linear = trt_export
    report = lint(path)
    assert report.passed, format_report(report)
    assert n_linear == 14  # 2 layers x (q, k, v, o, gate, up, down)
    c = report.checked
    assert c["quantized_matmuls"] == n_linear and c["weight_dq"] == n_linear
    # every activation Q has exactly one DQ (q/k/v and gate/up share theirs when their scales are equal)
    assert c["dequantize_linear"] == c["quantize_linear"] + n_linear
    assert c["float_matmuls"] == 5  # QK^T and AV per layer, and the float lm_head


def test_cpu_avx2_export_breaks_only_int8_type(avx2_export):
    path, n_linear = avx2_export
    report = lint(path)
    c = report.checked
    assert c["quantized_matmuls"] == n_linear
    # the uint8 activation zero point (128) on every activation Q and its DQ; weights stay int8
    assert report.by_rule() == {"int8-type": 2 * c["quantize_linear"]}
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert Counter(ops[v.node] for v in report.violations) == {"QuantizeLinear": c["quantize_linear"],
                                                                  "DequantizeLinear": c["quantize_linear"]}
    assert all(v.message.startswith("uint8 zero point") and v.message.endswith("export with --profile trt")
               for v in report.violations)

