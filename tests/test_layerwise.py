"""Models bigger than memory, on the tiny model saved as a checkpoint folder: reading it
one decoder layer at a time exports bit-identical files to the whole-model path, layer-by-layer
calibration gives the whole-model scales, and the command line takes that path when asked."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from bounds import HOST_PROFILE, assert_matches_twin
from fingerprint import export_fingerprint

from exporters import export_onnx
from runtime import open_session
from sasq_edge.cli.export import main as export_main
from sasq_edge.config import QuantConfig
from sasq_edge.layerwise import Checkpoint, LayerwiseModel, calibrate_layerwise, should_go_layerwise
from sasq_edge.models import tiny_random_llama
from sasq_edge.modules import quant_linears
from sasq_edge.pipeline import quantize_ptq, run_sasq
from sasq_edge.state import apply_state

WINDOWS = np.random.default_rng(0).integers(0, 257, (8, 64))


def test_checkpoint_reads_one_tensor_at_a_time(folder):
    ckpt = Checkpoint(folder)
    w = ckpt.get("model.layers.1.mlp.down_proj.weight")
    assert w.shape == (64, 128) and torch.equal(w, tiny_random_llama().model.model.layers[1].mlp.down_proj.weight)
    assert "lm_head.weight" not in ckpt  # tied: read from the embedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checkpoint_reads_what_safetensors_reads(tmp_path, dtype):
    """Every tensor, read with plain file reads (no memory map), equals safetensors' own reading,
    bit for bit, in each float dtype checkpoints ship in; a truncated file is refused by name."""
    from safetensors.torch import load_file, save_file

    from sasq_edge.errors import ModelLoadError

    tensors = {k: v.to(dtype).clone() for k, v in tiny_random_llama().model.state_dict().items() if k != "lm_head.weight"}
    tensors["empty"] = torch.zeros(0, 4, dtype=dtype)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt, ref = Checkpoint(tmp_path), load_file(str(tmp_path / "model.safetensors"))
    for k, v in ref.items():
        got = ckpt.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got.view(torch.uint8) if got.numel() else got,
                                                                              v.view(torch.uint8) if v.numel() else v), k
    header = ckpt._header("model.safetensors")[0]
    last = max(ref, key=lambda k: header[k]["data_offsets"][1])
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 10])  # cut after the checkpoint was opened
    with pytest.raises(ModelLoadError, match="truncated"):
        ckpt.get(last)


@pytest.mark.parametrize("options", [{}, {"smooth_alpha": 0.5, "smooth_learn": True}, {"lm_head": True, "embedding": "int8"}],
                         ids=["plain", "smooth-learned", "int8-head-and-embedding"])
def test_layer_by_layer_export_is_bit_identical(folder, tmp_path, options):
    lm = tiny_random_llama()
    cfg = QuantConfig.plain(profile=HOST_PROFILE, seq_len=64, calib_batches=2, train_steps=2, lr=0.05, **options)
    state = run_sasq(lm, cfg, windows=WINDOWS, progress=False).state
    whole = export_onnx(lm.model, tmp_path / "whole" / "model.onnx", state=state, tokenizer=lm.tokenizer)
    source = LayerwiseModel(folder, smooth=state.smooth)
    parts = export_onnx(source, tmp_path / "parts" / "model.onnx", state=state, tokenizer=lm.tokenizer)
    assert export_fingerprint(onnx.load(str(whole.onnx))) == export_fingerprint(onnx.load(str(parts.onnx)))
    # at most the embedding, the final norm, the head and one decoder layer were ever filled
    assert source.peak_loaded <= 4 and not any(p.startswith("model.layers.") for p in source.loaded)


def test_layer_by_layer_export_refuses_other_weights(folder, tmp_path):
    lm = tiny_random_llama(seed=3)  # same architecture, other weights: the digest differs
    state = run_sasq(lm, QuantConfig.plain(profile=HOST_PROFILE, seq_len=64, calib_batches=2, train_steps=0), windows=WINDOWS,
                     progress=False).state
    from exporters import ExportError

    with pytest.raises(ExportError, match="weights digest"):
        export_onnx(LayerwiseModel(folder), tmp_path / "x" / "model.onnx", state=state)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_layer_by_layer_calibration_matches_the_whole_model(folder, tmp_path, alpha):
    cfg = QuantConfig.plain(profile=HOST_PROFILE, seq_len=64, calib_batches=2, train_steps=0, calibration="mse", smooth_alpha=alpha)
    calib = WINDOWS[:2]
    lm = tiny_random_llama()
    quantize_ptq(lm.model, cfg, calib)
    whole = {n: float(m.act_quant.scale) for n, m in quant_linears(lm.model)}
    source = LayerwiseModel(folder)
    state = calibrate_layerwise(source, cfg, calib, str(folder), progress=False)
    # measured 2.7e-7: the float32 rounding of layers that ran smoothed one pass earlier
    assert set(state.scales) == set(whole)
    assert max(abs(state.scales[n] / whole[n] - 1) for n in whole) < 1e-5
    assert state.training["peak_pieces_loaded"] <= 3  # embedding, final norm, one decoder layer
    res = export_onnx(LayerwiseModel(folder, smooth=state.smooth), tmp_path / "m" / "model.onnx", state=state)
    twin = apply_state(tiny_random_llama().model, state)
    ids = torch.randint(0, 257, (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = twin(input_ids=ids).logits.numpy()
        flt = tiny_random_llama().model(input_ids=ids).logits.numpy()
    out = open_session(res.onnx, ["cpu"], 1).logits(ids.numpy())
    assert_matches_twin(out, ref, flt, reduction=lm.model.config.intermediate_size)


def test_command_line_goes_layer_by_layer(folder, tmp_path, data_dir, capsys):
    out = tmp_path / "out" / "model.onnx"
    code = export_main([str(out), "--model", str(folder), "--layerwise", "--train-steps", "0", "--seq-len", "64",
                        "--calib-batches", "2", "--smooth-alpha", "0.5", "--profile", HOST_PROFILE, "--data-dir", str(data_dir),
                        "--json"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "one decoder layer at a time" in cap.err
    recipe = json.loads((out.parent / "recipe.json").read_text())
    assert recipe["training"]["layerwise"] is True and recipe["method"]["smooth_alpha"] == 0.5
    assert open_session(out).profile == HOST_PROFILE
    # end-to-end training needs the whole model: refused with the reason, nothing written
    code = export_main([str(tmp_path / "o2" / "model.onnx"), "--model", str(folder), "--layerwise", "--no-blockwise",
                        "--train-steps", "3", "--seq-len", "64", "--data-dir", str(data_dir)])
    assert code == 2 and "train block by block" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    # block by block (the default) it trains, and says that the end-to-end steps asked for are not run
    code = export_main([str(tmp_path / "o3" / "model.onnx"), "--model", str(folder), "--layerwise", "--train-steps", "3",
                        "--block-steps", "2", "--seq-len", "64", "--data-dir", str(data_dir), "--json"])
    err = capsys.readouterr().err
    assert code == 0 and "one layer read at a time" in err and "no end-to-end steps (they need the whole model; 3 asked)" in err
    recipe = json.loads((tmp_path / "o3" / "recipe.json").read_text())
    assert recipe["method"]["train_steps"] == 0 and recipe["training"]["blockwise"]["steps_per_block"] == 2


def test_layerwise_samples_text_from_the_float_model_where_it_fits(folder, tmp_path, data_dir, capsys, monkeypatch):
    """Layer by layer, the float model is loaded whole only to sample the mix's ``self`` text when
    its weights fit (the same cached windows a whole-model run samples); where they do not, the
    default mix falls back to WikiText-2 (and says so) and a spec with sampled text is refused
    before any work."""
    from runtime.sources import DEFAULT_CALIBRATION_SPEC, DEFAULT_SPEC
    from sasq_edge import memory
    from sasq_edge.errors import ConfigError
    from sasq_edge.layerwise import layerwise_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = export_main([str(tmp_path / "out" / "model.onnx"), "--model", str(folder), "--layerwise", "--train-steps", "0",
                        "--seq-len", "64", "--data", "0.5*wikitext2,0.5*self:4", "--data-dir", str(data_dir),
                        "--calib-batches", "4"])
    assert code == 0, capsys.readouterr().err
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert "self:4" in json.dumps(recipe["training"]["data"]) and recipe["training"]["layerwise"] is True
    assert len(list((tmp_path / "cache" / "sasq-edge" / "selfgen").glob("*.npy"))) == 1  # sampled once, cached like a whole-model run's
    # the default mix, block by block: only as many sampled sequences as the pass reads
    code = export_main([str(tmp_path / "o1" / "model.onnx"), "--model", str(folder), "--layerwise", "--seq-len", "64",
                        "--data-dir", str(data_dir), "--block-windows", "4", "--block-steps", "1"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "o1" / "recipe.json").read_text())["training"]["data"]
    assert "self:2" in json.dumps(data) and "wikitext2" in json.dumps(data), data

    assert layerwise_data(DEFAULT_CALIBRATION_SPEC) == DEFAULT_SPEC
    assert "does not fit in memory to sample text from" in capsys.readouterr().err
    assert layerwise_data("wikitext2") == "wikitext2" and layerwise_data(None) is None
    with pytest.raises(ConfigError, match="self: samples text from the whole float model"):
        layerwise_data("0.5*wikitext2,0.5*self:8")
    monkeypatch.setattr(memory, "host_available", lambda *a, **k: 1 << 16)  # 64 KiB free: the float model never fits
    code = export_main([str(tmp_path / "o2" / "model.onnx"), "--model", str(folder), "--layerwise", "--train-steps", "0",
                        "--seq-len", "64", "--data", "self:4", "--data-dir", str(data_dir), "--no-memory-check"])
    assert code == 2 and "self: samples text" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_large_models_sample_text_in_bf16_read_layer_by_layer(folder, tmp_path, data_dir, capsys, monkeypatch):
    """Above ``SAMPLER_BF16_ABOVE`` on a CPU with native bf16, the mix's sampled text comes from a
    bf16 copy of the model built one layer at a time: it follows the float model, its cache entry
    is its own, and the record says which model wrote the text. Without native bf16 the float32
    model samples, where it fits."""
    from sasq_edge import layerwise
    from sasq_edge.data import weights_sample_digest
    from sasq_edge.models import load_model

    sampler = layerwise.bf16_sampler(folder)
    flt = load_model(str(folder)).model
    assert {p.dtype for p in sampler.parameters()} == {torch.bfloat16}
    assert sampler.lm_head.weight is sampler.model.embed_tokens.weight  # tied: the table is held once
    ids = torch.from_numpy(WINDOWS[:2, :48])
    with torch.no_grad():
        a, b = sampler(input_ids=ids).logits.float(), flt(input_ids=ids).logits
    # bf16 keeps 8 significant bits: weights and activations round by 2^-9 relative, about 1 % of the largest logit
    # after two layers (measured 0.3 %); a broken sampler (a layer left on meta, an untied head) is O(1) off
    assert float((a - b).abs().max() / b.abs().max()) < 0.05
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9
    assert weights_sample_digest(sampler) != weights_sample_digest(flt)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(layerwise, "SAMPLER_BF16_ABOVE", 0)
    argv = ["--model", str(folder), "--layerwise", "--seq-len", "64", "--data", "0.5*wikitext2,0.5*self:4", "--data-dir",
            str(data_dir), "--block-windows", "4", "--block-steps", "1"]
    for native, out in ((True, "bf16"), (False, "f32")):
        monkeypatch.setattr(layerwise, "native_bf16", lambda native=native: native)
        code = export_main([str(tmp_path / out / "model.onnx"), *argv])
        err = capsys.readouterr().err
        assert code == 0, err
        assert ("sampling the mix's text from the model in bf16" in err) is native
        data = json.dumps(json.loads((tmp_path / out / "recipe.json").read_text())["training"]["data"])
        assert ("sampled from the float model in bfloat16" in data) is native, data


def test_layerwise_needs_a_local_safetensors_folder(tmp_path):
    from sasq_edge.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="local folder of safetensors"):
        should_go_layerwise("tiny-random-llama", True)
    assert should_go_layerwise("tiny-random-llama", False) is None
