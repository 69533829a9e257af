"""Shared fixtures: tiny seeded models and a small WikiText-shaped data folder, all offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sasq_edge.config import QuantConfig
from sasq_edge.models import LoadedModel, tiny_random_llama

SHARED_WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "wikitext2"


@pytest.fixture
def tiny() -> LoadedModel:
    """A fresh seeded 2-layer Llama with a byte tokenizer (the tiny-random-llama preset)."""
    return tiny_random_llama()


@pytest.fixture
def config() -> QuantConfig:
    return QuantConfig(seq_len=64, calib_batches=2, train_steps=3, lr=0.05)


@pytest.fixture
def windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 257, (6, 64), generator=g)  # (N, T) byte-token windows


def _lines(name: str, count: int) -> list[str]:
    src = SHARED_WIKITEXT / name
    if src.is_file():
        return src.read_text(encoding="utf-8").splitlines()[:count]
    words = "the of and in to a was is for on as by with that at from his an were are which".split()
    g = torch.Generator().manual_seed(hash(name) % 1000)
    return [" " + " ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=g)) for _ in range(count)]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small folder with wiki.test.raw and wiki.valid.tokens (the first lines of the real ones)."""
    d = tmp_path_factory.mktemp("wikitext2")
    (d / "wiki.test.raw").write_text("\n".join(_lines("wiki.test.raw", 120)) + "\n", encoding="utf-8")
    (d / "wiki.valid.tokens").write_text("\n".join(_lines("wiki.valid.tokens", 120)) + "\n", encoding="utf-8")
    return d


@pytest.fixture
def no_data_env(monkeypatch):
    monkeypatch.delenv("SASQ_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return os.environ
