"""Refusing an architecture the registry lacks at ``prepare``. The registry entries themselves are
tested family by family in tests/test_families.py."""

from __future__ import annotations

import re

import pytest

from sasq_edge.arch import ARCHITECTURES
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ModelLoadError
from sasq_edge.modules import prepare


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))


def _refusal(arch: str) -> str:
    return (f"architecture '{arch}' is not supported yet: supported are {', '.join(sorted(ARCHITECTURES))}; "
            "to add one, add an ArchSpec to sasq_edge/arch.py and a tiny seeded test to tests/test_families.py")


def test_prepare_refuses_an_unknown_architecture():
    with pytest.raises(ModelLoadError, match=re.escape(_refusal("gpt2"))):
        prepare(_tiny_gpt2(), QuantConfig())
