"""The exported model does not move when the code around it changes: for three committed
scale states, applying the state to the tiny model and exporting it gives initializers bit-identical
to the committed fingerprint, and the same ONNX Runtime perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from fingerprint import export_fingerprint, onnx_ppl

from exporters import export_onnx
from runtime.profiles import cpu_features, inexact_here
from runtime.state import ScaleState
from sasq_edge.models import tiny_random_llama
from sasq_edge.state import apply_state

FIXTURES = Path(__file__).parent / "fixtures" / "export_fingerprint"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.json").is_file())
# the perplexities were recorded on an AVX-512 machine; ONNX Runtime's float kernels differ by ISA
RECORDED_ON_AVX512 = "avx512f" in cpu_features()[1]


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cases_exist():
    assert CASES == ["avx2_smooth_learn", "trt", "vnni_tanh_head_emb"]


@pytest.mark.parametrize("case", CASES)
def test_export_matches_fingerprint(case, tmp_path):
    expected = json.loads((FIXTURES / case / "expected.json").read_text())
    state = ScaleState.load(FIXTURES / case / "state")
    lm = tiny_random_llama()
    apply_state(lm.model, state)
    before = _state_dict(lm.model)
    # the committed fingerprints are of the traced graph (the fused CPU graph: tests/test_fused.py)
    res = export_onnx(lm.model, tmp_path / "model.onnx", state=state, tokenizer=lm.tokenizer, graph="traced")
    after = _state_dict(lm.model)
    # export is a lowering step: the caller's model is bit-identical afterwards
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    got = export_fingerprint(onnx.load(str(res.onnx)))
    assert got["counts"] == expected["counts"]
    assert got["quant_initializers"] == expected["quant_initializers"]
    assert got["float_initializers"] == expected["float_initializers"]
    if inexact_here(state.profile):  # this CPU's integer kernel saturates the profile's products: other numbers
        return
    ppl = onnx_ppl(res.onnx)
    if RECORDED_ON_AVX512:
        assert repr(ppl) == expected["onnx_ppl"]  # to the last digit
    else:
        # other ISAs reorder float32 sums only (integer kernels are exact): <= K * 2^-24 = 7.6e-6 relative, K = 128
        assert ppl == pytest.approx(float(expected["onnx_ppl"]), rel=1e-5)
