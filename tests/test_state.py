import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.errors import StateError
from runtime.state import FORMAT_VERSION, RECIPE_FILE, SCALES_FILE, ScaleState
from sasq_edge.calibrate import calibrate
from sasq_edge.config import QuantConfig
from sasq_edge.models import tiny_random_llama
from sasq_edge.modules import prepare, quant_linears
from sasq_edge.state import apply_state, load_state, model_fingerprint, quant_config, state_from_model, weights_of

V1_STATE = Path(__file__).parent / "fixtures" / "export_fingerprint" / "trt" / "state"  # written by the version-1 format


@pytest.fixture
def state(tiny, config, windows) -> ScaleState:
    prepare(tiny.model, config)
    calibrate(tiny.model, [windows[:1]], config)
    return state_from_model(tiny.model, config, tiny.source, training={"steps": 0})


def test_round_trip(state, tmp_path):
    state.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECIPE_FILE, SCALES_FILE]
    back = ScaleState.load(tmp_path)
    assert back.scales == state.scales  # float32 values survive exactly
    assert quant_config(back) == quant_config(state) and back.fingerprint == state.fingerprint
    assert back.weights == state.weights and back.version == FORMAT_VERSION
    model = tiny_random_llama().model
    apply_state(model, back)
    got = {n: float(m.act_quant.scale) for n, m in quant_linears(model)}
    for n, v in state.scales.items():
        assert got[n] == pytest.approx(v, rel=1e-6)  # via a float32 log: log s ~ -5 rounds by 2^-22, ~3e-7 after exp
    assert weights_of(model) == state.weights


def test_version_1_folders_still_load():
    state = load_state(V1_STATE)
    assert state.version == 1 and state.weights is None and state.profile == "trt" and len(state.scales) == 14
    assert quant_config(state).train_steps == 3
    apply_state(tiny_random_llama().model, state)


def test_other_model_is_refused(state):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert model_fingerprint(other) != state.fingerprint
    with pytest.raises(StateError, match="different model"):
        apply_state(other, state)


def test_other_checkpoint_of_the_same_architecture_is_refused(state):
    other = tiny_random_llama(seed=1).model  # same config, other weights
    assert model_fingerprint(other) == state.fingerprint
    with pytest.raises(StateError, match="other INT8 weights"):
        apply_state(other, state)


def test_prepared_model_is_refused(state, tiny):
    with pytest.raises(StateError, match="freshly loaded model"):
        apply_state(tiny.model, state)  # the fixture prepared it


def test_other_version_is_refused(state, tmp_path):
    state.save(tmp_path)
    recipe = json.loads((tmp_path / RECIPE_FILE).read_text())
    recipe["version"] = 99
    (tmp_path / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(StateError, match="format version 99"):
        ScaleState.load(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf")])
def test_bad_scale_values_are_refused(state, tmp_path, bad):
    state.save(tmp_path)
    tensors = load_file(str(tmp_path / SCALES_FILE))
    key = sorted(tensors)[3]
    tensors[key] = torch.tensor(bad)
    save_file(tensors, str(tmp_path / SCALES_FILE))
    with pytest.raises(StateError, match="positive and finite"):
        ScaleState.load(tmp_path)


def test_damaged_files_are_refused(state, tmp_path):
    state.save(tmp_path)
    (tmp_path / SCALES_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(StateError, match="not a readable safetensors"):
        ScaleState.load(tmp_path)
    (tmp_path / RECIPE_FILE).write_text("{")
    with pytest.raises(StateError, match="not valid JSON"):
        ScaleState.load(tmp_path)
    with pytest.raises(StateError, match="not found"):
        ScaleState.load(tmp_path / "nowhere")


def test_misspelt_recipe_key_is_refused(state, tmp_path):
    state.save(tmp_path)
    recipe = json.loads((tmp_path / RECIPE_FILE).read_text())
    recipe["method"]["learning_rate"] = 0.1
    (tmp_path / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(StateError, match="changed after sasq-edge wrote it"):  # the recipe's own digest
        load_state(tmp_path)
    del recipe["digest"]  # a recipe written by hand, without one: the key itself is named
    (tmp_path / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(StateError, match="learning_rate"):
        load_state(tmp_path)
    recipe["method"].pop("learning_rate")
    recipe["scales"] = {}  # an unknown top-level key
    (tmp_path / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(StateError, match="unknown key.*scales"):
        ScaleState.load(tmp_path)


def test_state_refuses_bad_values_on_construction(state):
    with pytest.raises(StateError, match="positive and finite"):
        ScaleState(state.profile, {**state.scales, "x": math.nan}, state.fingerprint, state.model_source)
    with pytest.raises(StateError, match="unknown deploy profile"):
        ScaleState("avx512", dict(state.scales), state.fingerprint, state.model_source)
    with pytest.raises(StateError, match="smoothing factors of g"):
        ScaleState(state.profile, dict(state.scales), state.fingerprint, state.model_source, smooth={"g": np.zeros(3)})


def test_recipe_records_the_deploy_grid(state):
    r = state.recipe()
    assert r["deploy"] == {"profile": "trt", "embedding": "float",
                           "act": {"qmin": -128, "qmax": 127, "zero_point": 0, "dtype": "int8"},
                           "weight": {"qmin": -127, "qmax": 127, "zero_point": 0, "dtype": "int8"},
                           "rotation": {}}
    assert r["method"] == QuantConfig.plain(seq_len=64, calib_batches=2, train_steps=3, lr=0.05).to_dict()
