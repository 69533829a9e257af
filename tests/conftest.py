"""Shared fixtures: tiny seeded models and a small WikiText-shaped data folder, all offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

if "PYTEST_XDIST_WORKER" in os.environ:  # one worker per core: each computes on one thread (spinning threads of
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two workers on the same cores slow both many times over)

import pytest  # noqa: E402
import torch  # noqa: E402

from sasq_edge.config import QuantConfig
from sasq_edge.models import LoadedModel, tiny_random_llama


@pytest.fixture(scope="session", autouse=True)
def _session_cache_home(tmp_path_factory):
    """``$XDG_CACHE_HOME`` in a session folder: text the commands' default data samples from a
    model (``self:32``) and their error logs never land in the user's ``~/.cache``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
SHARED_WIKITEXT = SHARED_ASSETS / "wikitext2"
SMOLLM2_DIR = Path(os.environ.get("SASQ_SMOLLM2_DIR", Path.home() / ".cache" / "sasq-assets" / "smollm2-135m-instruct"))


@pytest.fixture
def tiny() -> LoadedModel:
    """A fresh seeded 2-layer Llama with a byte tokenizer (the tiny-random-llama preset)."""
    return tiny_random_llama()


@pytest.fixture
def config() -> QuantConfig:
    return QuantConfig.plain(seq_len=64, calib_batches=2, train_steps=3, lr=0.05)


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
def folder(tmp_path_factory) -> Path:
    """The tiny preset saved as a Hugging Face folder (model.safetensors, config, tokenizer): a
    checkpoint read from disk, whole or one layer at a time. Read-only: copy it to break it."""
    d = tmp_path_factory.mktemp("tiny_ckpt")
    lm = tiny_random_llama()
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder, made once per machine from the shared
    assets by their materialize script into ``$SASQ_SMOLLM2_DIR`` (outside the repo)."""
    if not (SHARED_WIKITEXT / "wiki.valid.tokens").is_file():  # the real-model tests calibrate and evaluate on it
        pytest.skip(f"WikiText-2 assets not found at {SHARED_WIKITEXT}")
    if not (SMOLLM2_DIR / "model.safetensors").is_file():
        script = SHARED_ASSETS / "materialize_smollm2.py"
        if not script.is_file():
            pytest.skip(f"SmolLM2 assets not found at {SHARED_ASSETS}; set SASQ_SMOLLM2_DIR to a materialized folder")
        subprocess.run([sys.executable, str(script), str(SMOLLM2_DIR)], check=True)
    return SMOLLM2_DIR
