"""Block-wise scale training on the tiny model: training lowers every block's reconstruction error,
the pass gives the same state whether the blocks come from a whole model or are read one layer at
a time, the whole model ends as ``apply_state`` rebuilds it, the export of its state passes
``sasq-validate``, and the plan picks the path from the memory free."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from bounds import HOST_PROFILE

from exporters import export_onnx
from sasq_edge.blockwise import ALPHAS, WholeModel, capture, relative_error, train_blockwise
from sasq_edge.cli.validate import main as validate_main
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.layerwise import LayerwiseModel
from sasq_edge.models import tiny_random_llama
from sasq_edge.plan import blockwise_plan
from sasq_edge.state import apply_state

WINDOWS = np.random.default_rng(0).integers(0, 257, (6, 64))
# the default recipe's method (MSE start, SmoothQuant searched per block, learned factors, cosine,
# rotation), on the tiny model's 64-token windows
CFG = QuantConfig.from_recipe("default", profile=HOST_PROFILE, seq_len=64, blockwise=True, block_steps=30,
                              block_windows=6, calib_batches=4, train_steps=0)


@pytest.fixture(scope="module")
def whole():
    lm = tiny_random_llama()
    return lm, train_blockwise(WholeModel(lm.model), CFG, WINDOWS, lm.source, progress=False)


def test_capture_gives_each_block_its_input():
    """The stem's capture: the first block's input is the embedding output, and each block's
    recorded arguments reproduce the model's own forward, block after block."""
    lm = tiny_random_llama()
    x_fp, x_q, calls = capture(WholeModel(lm.model), WINDOWS[:2], progress=False)
    assert torch.equal(x_fp, x_q) and x_fp.shape == (2, 64, 64)
    ids = torch.from_numpy(WINDOWS[:2])
    with torch.no_grad():
        ref = lm.model.model(input_ids=ids, output_hidden_states=True).hidden_states
        assert torch.equal(x_fp, ref[0])
        h = x_fp
        for i, block in enumerate(lm.model.model.layers):
            args, kwargs = calls[i]
            h = block(h, *args, **kwargs)
        # the last hidden state of transformers has the final norm applied: compare before it
        assert torch.allclose(lm.model.model.norm(h), ref[-1], atol=1e-6, rtol=0)  # float32 rounding of one RMSNorm


def test_training_lowers_every_blocks_error(whole):
    _, res = whole
    assert len(res.blocks) == 2
    for b in res.blocks:
        assert b.trained_error < b.ptq_error, b.to_dict()
        assert len(b.losses) == CFG.block_steps
    rec = res.state.training["blockwise"]
    assert rec["steps_per_block"] == CFG.block_steps and rec["blocks"] == 2
    # "auto" searched one strength for the model: the chosen one has the lowest KL of the tried ones
    kl = {float(a): v for a, v in rec["alpha_search"].items()}
    assert set(kl) == set(ALPHAS) and res.state.method["smooth_alpha"] == min(kl, key=kl.get)


def test_whole_model_ends_as_apply_state_rebuilds_it(whole):
    """Bit for bit: the factors fold in the same order, the INT8 codes and scales are the state's."""
    lm, res = whole
    fresh = tiny_random_llama()
    apply_state(fresh.model, res.state)
    ids = torch.from_numpy(WINDOWS[:2])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)
    frozen = tiny_random_llama().model.state_dict()
    # only the smoothing points' weights moved (by the stored factors); the embedding did not
    assert torch.equal(fresh.model.model.embed_tokens.weight, frozen["model.embed_tokens.weight"])


def test_same_state_from_a_whole_model_or_layer_by_layer(folder, whole):
    _, ref = whole
    lw = LayerwiseModel(folder)
    res = train_blockwise(lw, CFG, WINDOWS, ref.state.model_source, progress=False)
    assert lw.peak_loaded <= 3  # a block, plus the embedding and the final norm while capturing
    assert res.state.weights == ref.state.weights
    assert res.state.scales == ref.state.scales
    assert res.state.smooth.keys() == ref.state.smooth.keys()
    for k, v in ref.state.smooth.items():
        assert np.array_equal(res.state.smooth[k], v), k


def test_same_state_with_int8_head_and_embedding_read_layer_by_layer(folder):
    """An INT8 head (its scale calibrated on the final norm of the quantized stream) and an INT8
    embedding (the first block sees its dequantized rows) train the same, bit for bit, from a
    model read one layer at a time: the plan need not load the whole model for them."""
    import dataclasses

    cfg = dataclasses.replace(CFG, lm_head=True, embedding="int8", block_steps=3)
    ref = train_blockwise(WholeModel(tiny_random_llama().model), cfg, WINDOWS, "tiny", progress=False).state
    res = train_blockwise(LayerwiseModel(folder), cfg, WINDOWS, "tiny", progress=False).state
    assert "lm_head" in ref.scales and ref.embedding == "int8"
    assert res.weights == ref.weights and res.scales == ref.scales


def test_reconstruction_error_is_relative():
    y = torch.randn(2, 8, 4, dtype=torch.float64).float()
    assert float(relative_error(y, y)) == 0.0
    assert float(relative_error(2 * y, y)) == pytest.approx(1.0, rel=1e-6)  # |y|^2 / |y|^2, float32 sums


def test_export_of_blockwise_state_passes_validate(whole, data_dir, tmp_path, capsys):
    lm, res = whole
    fresh = tiny_random_llama()
    apply_state(fresh.model, res.state)
    path = export_onnx(fresh.model, tmp_path / "model.onnx", state=res.state, tokenizer=fresh.tokenizer, graph="fused").onnx
    code = validate_main([str(path), "--data-dir", str(data_dir), "--seq-len", "64", "--max-windows", "2", "--threads", "1",
                          "--json"])
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and rep["passed"] is True
    assert rep["replay"]["layers_exact"] == rep["replay"]["layers"] == 14


GIB = 2**30


def test_plan_follows_the_memory_free(folder):
    from sasq_edge import memory
    from sasq_edge.models import tiny_config
    from sasq_edge.plan import FIT_FRACTION

    cfg = dataclasses.replace(CFG, train_steps=5)
    whole_peak = memory.estimate_blockwise(tiny_config(), cfg, whole=True).peak
    one_peak = memory.estimate_blockwise(tiny_config(), cfg, whole=False).peak
    assert one_peak < whole_peak
    big = blockwise_plan(str(folder), cfg, free=64 * GIB)
    assert big.layerwise is None and big.config.train_steps == 5 and "then 5 end-to-end steps" in big.line
    # too little for the whole model, enough for one block of it: layer by layer, no end-to-end steps
    between = int((one_peak + whole_peak) / 2 / FIT_FRACTION)
    lw = blockwise_plan(str(folder), cfg, free=between)
    assert lw.layerwise == folder and lw.config.train_steps == 0 and "one layer read at a time" in lw.line
    too_little = int(one_peak / FIT_FRACTION) - 1
    with pytest.raises(ConfigError, match="even one decoder block does not fit"):
        blockwise_plan(str(folder), cfg, free=too_little)
    assert blockwise_plan(str(folder), cfg, free=too_little, check=False).layerwise == folder
    # a model that is no local safetensors folder cannot be read layer by layer: refused with the number
    with pytest.raises(ConfigError, match="in memory needs about"):
        blockwise_plan("tiny-random-llama", cfg, free=between)
