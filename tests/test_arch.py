"""Every registry entry on a tiny model; fails when the registry and this list drift apart."""

import pytest
import torch

from sasq_edge.arch import ARCHITECTURES
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ModelLoadError
from sasq_edge.modules import prepare, quant_linears


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


TESTED = ["llama", "mistral", "qwen2"]


def test_registry_matches_tested_list():
    assert sorted(ARCHITECTURES) == sorted(TESTED)


@pytest.mark.parametrize("model_type", TESTED)
def test_prepare_each_architecture(model_type):
    model = _tiny(model_type).eval()
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        prepare(model, QuantConfig())
        assert len(list(quant_linears(model))) == 2 * len(ARCHITECTURES[model_type].targets)
        assert torch.equal(model(input_ids=ids).logits, ref)  # float mode is the float model


def test_unknown_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported"):
        prepare(model, QuantConfig())
