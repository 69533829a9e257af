"""Refusing an architecture the registry lacks: at ``prepare`` for a model built in code, and at
``load_model`` from the config alone, before any weight is read. The registry entries themselves
are tested family by family in tests/test_families.py."""

from __future__ import annotations

import re

import numpy as np
import pytest

from runtime.families import ARCHITECTURES
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ModelLoadError
from sasq_edge.models import load_model
from sasq_edge.modules import prepare


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))


def _refusal(arch: str) -> str:
    return (f"architecture '{arch}' is not supported yet: supported are {', '.join(sorted(ARCHITECTURES))}; "
            "to add one, add an ArchSpec to runtime/families.py and a tiny seeded test to tests/test_families.py")


def test_prepare_refuses_an_unknown_architecture():
    with pytest.raises(ModelLoadError, match=re.escape(_refusal("gpt2"))):
        prepare(_tiny_gpt2(), QuantConfig.plain())


def _garbage_weights(folder) -> None:
    """Overwrite the saved weights: reading them now fails (see the control below)."""
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)


def test_load_refuses_an_unsupported_folder_before_reading_weights(tmp_path):
    _tiny_gpt2().save_pretrained(tmp_path)
    _garbage_weights(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"'{tmp_path}': ") and _refusal("gpt2") in message
    assert "docs/ARCHITECTURE.md" in message


def test_garbage_weights_fail_once_read(tmp_path):
    """The control: a supported architecture with the same garbage weights gets to reading them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    _garbage_weights(tmp_path)
    with pytest.raises(ModelLoadError, match="could not load model .*deserializing header"):
        load_model(str(tmp_path))


def test_load_refuses_an_unsupported_gguf_from_its_metadata(tmp_path, monkeypatch):
    import gguf
    import transformers

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert _refusal("gpt2") in str(err.value)
