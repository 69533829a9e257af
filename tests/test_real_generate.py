"""Greedy generation of SmolLM2-135M-Instruct, static INT8 (cpu-avx2, MSE calibration), on ONNX
Runtime with the KV-cache graph, against the PyTorch fake-quant model: a few minutes in all.

The model folder is made once per machine by ../shared/assets/materialize_smollm2.py into
``$SASQ_SMOLLM2_DIR`` (default ``~/.cache/sasq-assets/smollm2-135m-instruct``), outside the repo.
"""

from pathlib import Path

import numpy as np
import pytest

from exporters import export_onnx
from runtime import open_session
from runtime.fusion import check_fusion
from runtime.generate import Sampling, generate
from sasq_edge.config import QuantConfig
from sasq_edge.evaluate import greedy_tokens
from sasq_edge.models import load_model
from sasq_edge.pipeline import run_sasq

pytestmark = pytest.mark.real_model

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
WIKITEXT = ASSETS / "wikitext2"
NEW_TOKENS = 32
PROMPT = "The capital of France is"
MORE_PROMPTS = ["Once upon a time, there was a", "The quick brown fox", "def fibonacci(n):"]



@pytest.fixture(scope="module")
def int8_model(smollm2_dir, tmp_path_factory):
    """MSE-calibrated on 2 validation windows, no training, exported with the KV cache."""
    lm = load_model(str(smollm2_dir))
    cfg = QuantConfig.plain(profile="cpu-avx2", seq_len=256, calibration="mse", calib_batches=2, train_steps=0)
    state = run_sasq(lm, cfg, WIKITEXT, progress=False).state
    res = export_onnx(lm.model, tmp_path_factory.mktemp("smollm2_kv") / "model.onnx", state=state, tokenizer=lm.tokenizer)
    return lm, state, res


def _agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def test_real_greedy_generation_against_torch(int8_model):
    """The full 30-layer static-INT8 model is numerically chaotic: ONNX Runtime's float kernels
    (RMSNorm's reduction, exp in softmax and SiLU, cos/sin) differ from torch's by an ulp here and
    there; an activation that lands on a rounding boundary (x/s = 52.500004 in torch, 52.5 in ORT,
    measured at layer 0's q/k/v input) takes another integer code, and the difference grows through
    30 layers until a near-tied top-2 flips. Measured agreement of the greedy tokens (common
    prefix, out of 32) on this machine: 5, 18, 32 and 28 for the four prompts below, so equality
    for 32 tokens is NOT asserted on the full model (docs/METHOD.md, Limits). What this test holds: the
    cached graph produces the same first token as PyTorch for every prompt, and along PyTorch's own
    trajectory most next-token choices agree (measured 0.72 and up per prompt)."""
    lm, _, res = int8_model
    sess = open_session(res.onnx)
    assert sess.profile == "cpu-avx2" and sess.cache is not None and len(sess.cache.past_names) == 2 * 30
    first, forced_agreement = [], []
    for prompt in (PROMPT, *MORE_PROMPTS):
        ids = lm.tokenizer(prompt)["input_ids"]
        onnx_tokens, _ = generate(sess, ids, Sampling(max_new_tokens=NEW_TOKENS))
        torch_tokens = greedy_tokens(lm.model, ids, NEW_TOKENS)
        # teacher-forced: ORT's next token after each prefix of PyTorch's generation, via the cache
        logits, past = sess.step(np.array([ids]), sess.cache.empty(1))
        forced = []
        for token in torch_tokens:
            forced.append(int(logits[0, -1].argmax()))
            logits, past = sess.step(np.array([[token]]), past)
        first.append(onnx_tokens[0] == torch_tokens[0])
        forced_agreement.append(float(np.mean(np.array(forced) == np.array(torch_tokens))))
        print(f"\n{prompt!r}: greedy prefix agreement {_agreement(onnx_tokens, torch_tokens)}/{NEW_TOKENS}, "
              f"teacher-forced agreement {forced_agreement[-1]:.2f}")
    assert all(first), first
    # a broken cache (positions, layout) gives agreement near 0; measured here 0.72 and up
    assert min(forced_agreement) >= 0.5 and np.mean(forced_agreement) >= 0.65, forced_agreement


def test_real_every_layer_fused(int8_model):
    _, state, res = int8_model
    report = check_fusion(res.onnx)
    print("\n" + report.summary())
    assert len(state.scales) == 30 * 7
    assert report.passed and not report.unfused
    assert len(report.fused) == len(report.kernels) == 210
    assert set(report.kernels) == set(state.scales)
