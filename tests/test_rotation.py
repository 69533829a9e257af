"""Online block-Hadamard rotation of the MLP down projections' input (runtime.rotation): the
float function is unchanged, the quantized one equals a float64 reference, the exported graphs
carry exactly three extra nodes a rotated input, ONNX Runtime matches the twin, TensorRT's rules
hold, and the scale state records it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from bounds import HOST_PROFILE, assert_matches_twin

import exporters.passes as passes
from exporters import export_onnx
from runtime import open_session
from runtime.errors import StateError
from runtime.grids import encode_weight
from runtime.lint import lint
from runtime.rotation import block_for, hadamard, rotate_input, rotate_weight
from runtime.state import ScaleState
from sasq_edge.calibrate import calibrate
from sasq_edge.config import ConfigError, QuantConfig
from sasq_edge.models import tiny_random_llama
from sasq_edge.modules import QuantLinear, prepare, quant_linears
from sasq_edge.state import apply_state, state_from_model
from sasq_edge.train import train_scales

WINDOWS = torch.randint(0, 257, (6, 64), generator=torch.Generator().manual_seed(1))
ROTATED = tuple(f"model.layers.{i}.{leaf}" for i in (0, 1) for leaf in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def test_hadamard_is_orthogonal_and_symmetric():
    for b in (2, 4, 64, 128, 512):
        h = hadamard(b).astype(np.float64)
        assert h.shape == (b, b) and np.array_equal(h, h.T)
        assert np.abs(h @ h - np.eye(b)).max() < 1e-6  # float32 entries of 1/sqrt(b): 2 * 2^-24 (measured 3.4e-8)
        assert np.allclose(np.abs(h), 1 / np.sqrt(b))  # float32 rounding, 2^-24 relative: inside the default rtol 1e-5
    for bad in (0, 1, 3, 48):
        with pytest.raises(ValueError, match="power of two"):
            hadamard(bad)


@pytest.mark.parametrize("features, block", [(1536, 64), (11008, 64), (4864, 64), (8960, 64), (100, 4), (7, 1), (128, 64)])
def test_block_is_the_largest_power_of_two_dividing_the_width(features, block):
    assert block_for(features, 64) == block


def test_rotated_product_equals_the_float64_product():
    g = np.random.default_rng(0)
    w, x = g.standard_normal((48, 256)).astype(np.float32), g.standard_normal((5, 256)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    got = rotate_input(x, 64).astype(np.float64) @ rotate_weight(w, 64).astype(np.float64).T
    # x rotated in float32 (64-term sums: <= 64 * 2^-24 = 3.8e-6 relative), W R rounded to float32: measured 1.5e-7
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_rotation_spreads_an_outlier_channel():
    """One channel 100x the others: a static per-tensor INT8 grid loses the rest to rounding;
    rotated in blocks of 64, the same grid keeps them (measured MSE ratio above 50)."""
    g = np.random.default_rng(1)
    x = g.standard_normal((512, 256)).astype(np.float32)
    x[:, 3] *= 100.0

    def mse(t: np.ndarray) -> float:
        s = np.abs(t).max() / 127
        return float(((np.clip(np.rint(t / s), -128, 127) * s - t) ** 2).mean())

    assert mse(x) > 50 * mse(rotate_input(x, 64))


def test_prepare_rotates_every_linear_but_the_attention_output():
    lm = tiny_random_llama()
    prepare(lm.model, QuantConfig.plain(seq_len=64, rotate_block=64))
    rotated = {n: m.rotation for n, m in quant_linears(lm.model) if m.rotation > 1}
    assert rotated == dict.fromkeys(ROTATED, 64)  # hidden 64, intermediate 128: blocks of 64
    lm = tiny_random_llama()
    prepare(lm.model, QuantConfig.plain(seq_len=64, rotate_block=32))
    assert {m.rotation for n, m in quant_linears(lm.model) if n in ROTATED} == {32}
    lm = tiny_random_llama()
    prepare(lm.model, QuantConfig.plain(seq_len=64, rotate_block=0))
    assert all(m.rotation == 1 and m.hadamard is None for _, m in quant_linears(lm.model))


def test_config_rejects_a_block_that_is_not_a_power_of_two():
    for bad in (1, 3, 48, -64, True):
        with pytest.raises(ConfigError, match="rotate_block"):
            QuantConfig.plain(rotate_block=bad)


def test_quant_linear_float_mode_unchanged_fake_mode_equals_float64_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 32)
    with torch.no_grad():
        lin.weight[:, 5] *= 30  # an outlier input channel
    before = lin.weight.detach().clone()
    q = QuantLinear(lin, QuantConfig.plain().deploy.act, QuantConfig.plain().deploy.weight, "clip", rotation=64)
    x = torch.randn(3, 10, 128)
    x[..., 7] *= 50
    assert torch.equal(q(x), F.linear(x, lin.weight, lin.bias))  # float mode: W x, untouched
    q.act_quant.set_scale(0.05)
    q.act_quant.set_mode("fake")
    with torch.no_grad():
        y = q(x).double()
    # reference in float64: codes of R x on the grid, times the INT8 codes of W R
    xr = rotate_input(x.numpy(), 64)
    codes_x = np.clip(np.rint(xr / np.float32(0.05)), -128, 127).astype(np.float64)
    codes_w, sw = encode_weight(rotate_weight(lin.weight.detach().numpy(), 64), QuantConfig.plain().deploy.weight)
    ref = (codes_x @ codes_w.astype(np.float64).T) * (np.float32(0.05) * sw.astype(np.float64)) + lin.bias.detach().double().numpy()
    # exact integer sums; the scales, the bias and torch's rotation of W round in float32: measured 4.0e-7
    assert np.abs(y.numpy() - ref).max() < 1e-4 * np.abs(ref).max()
    assert torch.equal(lin.weight, before) and q.weight is lin.weight  # frozen weights, bit-identical


def _trained(profile: str, **over):
    lm = tiny_random_llama()
    cfg = QuantConfig.plain(profile=profile, seq_len=64, calib_batches=2, train_steps=2, lr=0.05, rotate_block=64, **over)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    prepare(lm.model, cfg)
    calibrate(lm.model, [WINDOWS[:1], WINDOWS[1:2]], cfg)
    train_scales(lm.model, WINDOWS, cfg, progress=False)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every pre-trained weight frozen
    return lm, cfg, state_from_model(lm.model, cfg, lm.source)


def _matches_twin(lm, onnx_path) -> None:
    """ONNX Runtime's logits against the PyTorch twin's on 2 x 48 tokens: float32 reordering noise,
    and rounding-tie flips bounded by what quantization does (tests/bounds.py)."""
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        twin = lm.model(input_ids=ids).logits.numpy()
        ref = tiny_random_llama().model(input_ids=ids).logits.numpy()
    out = open_session(onnx_path).logits(ids.numpy())
    assert_matches_twin(out, twin, ref, reduction=lm.model.config.intermediate_size)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    lm, cfg, state = _trained(HOST_PROFILE)
    res = export_onnx(lm.model, tmp_path_factory.mktemp("rot") / "model.onnx", state=state, tokenizer=lm.tokenizer, graph="fused")
    return lm, state, res


def test_state_records_the_rotation_and_round_trips(fused, tmp_path):
    _, state, res = fused
    assert state.rotation == dict.fromkeys(ROTATED, 64)
    recipe = json.loads((res.onnx.parent / "recipe.json").read_text())
    assert recipe["version"] == 3 and recipe["deploy"]["rotation"] == dict.fromkeys(ROTATED, 64)
    assert ScaleState.load(res.onnx.parent).rotation == state.rotation
    with pytest.raises(StateError, match="rotation names"):
        ScaleState(state.profile, dict(state.scales), state.fingerprint, state.model_source, rotation={"nope": 64})
    with pytest.raises(StateError, match="power of two"):
        ScaleState(state.profile, dict(state.scales), state.fingerprint, state.model_source, rotation={ROTATED[0]: 48})


def test_apply_state_rebuilds_the_rotated_twin_and_refuses_a_mismatch(fused):
    lm, state, _ = fused
    fresh = apply_state(tiny_random_llama().model, state)
    ids = WINDOWS[:2]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, lm.model(input_ids=ids).logits)
    dropped = ScaleState(state.profile, dict(state.scales), state.fingerprint, state.model_source, method=state.method,
                         training=state.training, weights=state.weights)  # rotation lost
    with pytest.raises(StateError, match="rotat"):
        apply_state(tiny_random_llama().model, dropped)


def test_fused_graph_adds_three_nodes_a_rotated_input_and_matches_the_twin(fused, tmp_path):
    lm, state, res = fused
    model = onnx.load(str(res.onnx))
    plain_state = ScaleState(state.profile, dict(state.scales), state.fingerprint, state.model_source)
    plain = onnx.load(str(export_onnx(tiny_random_llama().model, tmp_path / "p" / "model.onnx", state=plain_state,
                                      tokenizer=lm.tokenizer, graph="fused").onnx))
    rot, ref = passes.op_counts(model), passes.op_counts(plain)
    # per block: one rotation of the attention norm's output (q, k, v share it), one of the MLP
    # norm's (gate, up), one of the down projection's input: 3 MatMuls and 6 Reshapes
    assert rot["MatMul"] - ref["MatMul"] == 6 and rot["Reshape"] - ref["Reshape"] == 12
    assert rot["QuantizeLinear"] == ref["QuantizeLinear"] == 14
    assert sum(1 for t in model.graph.initializer if t.name.startswith("hadamard_")) == 1  # one shared block
    _matches_twin(lm, res.onnx)


def test_traced_trt_graph_rotates_and_obeys_tensorrt_rules(tmp_path):
    lm, _, state = _trained("trt")
    res = export_onnx(lm.model, tmp_path / "model.onnx", state=state, tokenizer=lm.tokenizer, graph="traced")
    report = lint(res.onnx)
    assert report.passed, [str(v) for v in report.violations]
    _matches_twin(lm, res.onnx)


def test_a_version_2_folder_loads_unrotated(tmp_path):
    """Folders written before rotation existed (format version 2, no deploy.rotation) still load,
    as unrotated states that apply to a fresh model."""
    lm = tiny_random_llama()
    cfg = QuantConfig.plain(seq_len=64, calib_batches=1, train_steps=0)
    prepare(lm.model, cfg)
    calibrate(lm.model, [WINDOWS[:1]], cfg)
    state_from_model(lm.model, cfg, lm.source).save(tmp_path / "run")
    path = tmp_path / "run" / "recipe.json"
    recipe = json.loads(path.read_text())
    del recipe["deploy"]["rotation"], recipe["method"]["rotate_block"], recipe["files"], recipe["digest"]  # not in version 2
    path.write_text(json.dumps({**recipe, "version": 2}))
    old = ScaleState.load(tmp_path / "run")
    assert old.version == 2 and old.rotation == {}
    fresh = apply_state(tiny_random_llama().model, old)
    assert all(m.rotation == 1 for _, m in quant_linears(fresh))
