"""A GGUF file converted tensor by tensor into a safetensors folder (sasq_edge.gguf) holds exactly
the model transformers builds from the file whole: every tensor bit for bit, and the same
tokenizer. On the real
SmolLM2-135M Q4_1 GGUF of ../shared/assets (Llama: its q/k rows are permuted back on the way)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sasq_edge.gguf import materialize, materialized
from sasq_edge.layerwise import Checkpoint
from sasq_edge.models import load_model
from sasq_edge.state import model_fingerprint

GGUF = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} not found (the offline assets)")]


def test_folder_holds_what_transformers_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("SASQ_GGUF_CACHE", str(tmp_path))
    lines = []
    folder = materialize(GGUF, progress=False, log=lines.append)
    assert folder == materialized(GGUF) and folder.parent == tmp_path and "converted" in lines[-1]
    assert materialize(GGUF, progress=False, log=lines.append) == folder and "reusing" in lines[-1]  # cached
    ref = load_model(str(GGUF))
    ckpt = Checkpoint(folder)
    state = ref.model.state_dict()
    assert set(ckpt.weight_map) == set(state) - {"lm_head.weight"}  # tied to the embedding
    for name in ckpt.weight_map:
        assert torch.equal(ckpt.get(name), state[name]), name
    whole = load_model(str(folder))
    # the config saved from the GGUF metadata fingerprints differently from transformers' parse of
    # the file (states trained through the folder record the folder as their model: sasq_edge.plan)
    assert model_fingerprint(whole.model) == model_fingerprint(load_model(str(folder)).model)
    assert whole.tokenizer("Hello, world")["input_ids"] == ref.tokenizer("Hello, world")["input_ids"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
