import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import exporters.passes as passes
import runtime.metadata as meta
from exporters import ExportError, export_onnx
from exporters.passes import pretranspose_int8_weights
from runtime import open_session
from runtime.graph import layer_of, weight_name, weight_scale_name
from runtime.state import ScaleState
from sasq_edge.calibrate import calibrate
from sasq_edge.modules import prepare
from sasq_edge.state import state_from_model
from sasq_edge.train import train_scales


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model, calibrated and trained 3 steps, exported once for the tests below."""
    from sasq_edge.config import QuantConfig
    from sasq_edge.models import tiny_random_llama

    lm = tiny_random_llama()
    cfg = QuantConfig.plain(seq_len=64, calib_batches=2, train_steps=3, lr=0.05)
    windows = torch.randint(0, 257, (6, 64), generator=torch.Generator().manual_seed(1))
    prepare(lm.model, cfg)
    calibrate(lm.model, [windows[:1], windows[1:2]], cfg)
    train_scales(lm.model, windows, cfg, progress=False)
    state = state_from_model(lm.model, cfg, lm.source)
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    res = export_onnx(lm.model, out, state=state, tokenizer=lm.tokenizer)
    return lm, state, res, onnx.load(str(out))


def _init(model, name):
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def test_exact_qdq_counts(exported):
    _, state, res, model = exported
    n = len(state.scales)  # 14
    counts = passes.op_counts(model)
    assert counts["QuantizeLinear"] == n
    assert counts["DequantizeLinear"] == 2 * n  # activation + weight per layer
    assert res.to_dict()["quantize_linear"] == n and res.to_dict()["dequantize_linear"] == 2 * n
    assert counts.get("DynamicQuantizeLinear", 0) == 0


def test_weights_are_int8_kn_feeding_matmul_directly(exported):
    lm, _, _, model = exported
    consumers = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_int")]
    assert len(weight_dqs) == 14
    for dq in weight_dqs:
        w = _init(model, dq.input[0])
        assert w.dtype == np.int8
        axis = helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis"))
        assert axis == 1
        assert _init(model, dq.input[1]).shape == (w.shape[1],)  # one scale per output channel N
        assert [c.op_type for c in consumers[dq.output[0]]] == ["MatMul"]
        assert consumers[dq.output[0]][0].input[1] == dq.output[0]
        # the transposed codes are the module's codes
        name = layer_of(dq.input[0])
        assert dq.input[0] == weight_name(name) and dq.input[1] == weight_scale_name(name)
        mod = lm.model.get_submodule(name)
        assert np.array_equal(w, mod.weight_int.numpy().T)


def test_activation_scales_equal_the_state(exported):
    _, state, _, model = exported
    q_scales = []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            q_scales.append(float(_init(model, n.input[1])))
            zp = _init(model, n.input[2])
            assert zp.dtype == np.int8 and int(zp) == 0
    assert sorted(q_scales) == sorted(float(np.float32(v)) for v in state.scales.values())


def test_metadata_and_folder(exported):
    _, state, res, model = exported
    props = {p.key: p.value for p in model.metadata_props}
    assert props[meta.META_FORMAT] == meta.FORMAT_TAG and props[meta.META_PROFILE] == "trt"
    assert json.loads(props[meta.META_SESSION_OPTIONS]) == {"session.qdqisint8allowed": "1"}
    assert meta.read_metadata(res.onnx) == props
    folder = res.onnx.parent
    for f in ("config.json", "tokenizer.json", "recipe.json", "scales.safetensors"):
        assert (folder / f).is_file(), f
    assert ScaleState.load(folder).scales == state.scales
    onnx.checker.check_model(model, full_check=True)


def test_onnx_runtime_matches_torch_fake_quant(exported):
    lm, _, res, _ = exported
    sess = open_session(res.onnx)
    assert sess.profile == "trt"
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits.numpy()
    out = sess.logits(ids.numpy())
    # measured: max |diff| ~4e-7 on this model; a one-level flip in any quantizer would be ~1e-3
    assert np.abs(out - ref).max() < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_float_export_has_no_qdq(tiny, tmp_path):
    res = export_onnx(tiny.model, tmp_path / "model.onnx", tokenizer=tiny.tokenizer)
    counts = passes.op_counts(onnx.load(str(res.onnx)))
    assert counts.get("QuantizeLinear", 0) == 0 and counts.get("DequantizeLinear", 0) == 0
    assert res.profile is None and not (tmp_path / "recipe.json").exists()
    ids = np.arange(40, dtype=np.int64)[None] % 257
    with torch.no_grad():
        ref = tiny.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    # no quantizer: float32 reordering only, <= K * 2^-24 = 7.6e-6 relative per dot product (K = 128); a loose bound
    assert np.abs(open_session(res.onnx).logits(ids) - ref).max() < 1e-4


def test_quantized_export_needs_state(tiny, config, tmp_path):
    prepare(tiny.model, config)
    with pytest.raises(ExportError, match="ScaleState"):
        export_onnx(tiny.model, tmp_path / "model.onnx")
    with pytest.raises(ExportError, match=".onnx"):
        export_onnx(tiny.model, tmp_path / "model.bin")
    assert not list(tmp_path.glob("*.onnx*"))


def _hand_built_graph(k=6, n=4):
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)  # (N, K), as torch stores it
    scale = rng.uniform(0.01, 0.1, size=n).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["w_dq"], axis=0),
        helper.make_node("Transpose", ["w_dq"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "w_scale"),
         numpy_helper.from_array(np.zeros(n, np.int8), "w_zp")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), w


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_pretranspose_pass_on_hand_built_graph():
    model, w = _hand_built_graph()
    out = pretranspose_int8_weights(model)
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "MatMul"]
    dq = out.graph.node[0]
    assert helper.get_attribute_value(dq.attribute[0]) == 1
    assert np.array_equal(_init(out, "w"), w.T)
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Transpose", "MatMul"]  # input untouched
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    assert np.array_equal(_run(model, x), _run(out, x))


def test_pretranspose_pass_leaves_shared_weights_alone():
    model, _ = _hand_built_graph()
    model.graph.output.append(helper.make_tensor_value_info("w_dq", TensorProto.FLOAT, [4, 6]))
    out = pretranspose_int8_weights(model)
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Transpose", "MatMul"]


def test_external_data_above_threshold(tiny, config, monkeypatch, tmp_path):
    import exporters.onnx_export as oe

    monkeypatch.setattr(oe, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the model were over 2 GB
    prepare(tiny.model, config)
    calibrate(tiny.model, [torch.randint(0, 257, (1, 32))], config)
    state = state_from_model(tiny.model, config, tiny.source)
    res = export_onnx(tiny.model, tmp_path / "model.onnx", state=state)
    data = tmp_path / "model.onnx.data"
    assert res.external_data and data.is_file()
    assert res.bytes == res.onnx.stat().st_size + data.stat().st_size
    # every tensor of 1 KiB or more lives in the data file: the INT8 weights and the float embedding
    from sasq_edge.modules import quant_linears

    int8 = sum(m.weight_int.numel() for _, m in quant_linears(tiny.model))
    assert data.stat().st_size == int8 + tiny.model.model.embed_tokens.weight.numel() * 4
    ids = np.arange(20, dtype=np.int64)[None]
    with torch.no_grad():
        ref = tiny.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    # as in test_onnx_runtime_matches_torch_fake_quant: float32 noise (~4e-7 there), one flipped code ~1e-3
    assert np.abs(open_session(res.onnx).logits(ids) - ref).max() < 1e-4
