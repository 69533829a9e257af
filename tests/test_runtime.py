import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtime import ParityAccumulator, RuntimeSetupError, open_session, token_nll
from runtime.parity import Thresholds
from runtime.session import resolve_providers


def test_token_nll_hand_computed():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]], dtype=np.float32))
    ids = np.array([0, 2, 1])
    nll = token_nll(logits, ids)  # predicts ids[1:] from positions 0..T-2
    np.testing.assert_allclose(nll, [-math.log(0.25), -math.log(0.2)], rtol=1e-6)  # float32 logits: 2^-24 (measured 1.5e-8)


def test_parity_accumulator():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 10)).astype(np.float32)
    ids = rng.integers(0, 10, 16)
    acc = ParityAccumulator()
    acc.update(ids, a, a + 1e-3)
    # a + 1e-3 rounds each logit in float32 by <= 1.2e-7 (|a| < 2.4): the ppl moves ~1e-8 (measured 7e-9)
    rep = acc.report(Thresholds(ppl_ratio=1e-5, min_top1_confident=1.0))
    assert rep.top1_agreement == 1.0 and rep.rel_diff < 1e-5  # a shift of every logit leaves the NLL unchanged
    assert rep.kl_max < 1e-12  # ... and the distribution: KL is quadratic in that rounding (measured 8e-16)
    assert rep.max_abs_logit_diff == pytest.approx(1e-3, rel=1e-3) and rep.passed  # that rounding: <= 1.2e-4 (measured 4.7e-5)
    b = a.copy()
    b[0] = -b[0]
    acc2 = ParityAccumulator()
    acc2.update(ids, a, b)
    rep2 = acc2.report(Thresholds(top1_margin=0.0, min_top1_confident=0.99))  # every position confident; 15/16 < 0.99
    assert rep2.top1_agreement == 15 / 16 and rep2.top1_confident == 15 / 16 and not rep2.passed
    # a negated row of standard-normal logits: KL of O(1) (measured 1.0); the 15 others are 0, so kl_mean is exactly
    # kl_max / 16 up to float64 summation rounding
    assert rep2.kl_max > 0.1 and rep2.kl_p99 > 0 and rep2.kl_mean == pytest.approx(rep2.kl_max / 16, rel=1e-9)


def test_unknown_and_missing_providers():
    with pytest.raises(RuntimeSetupError, match="unknown execution provider 'rocm'"):
        resolve_providers(["rocm"])
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeSetupError, match="not in this onnxruntime build"):
            resolve_providers(["cuda"])
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]


def test_bad_files(tmp_path):
    with pytest.raises(RuntimeSetupError, match="not found"):
        open_session(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(RuntimeSetupError, match="not a readable ONNX file|holds no ONNX graph"):
        open_session(junk)
    # a valid ONNX file that is not a causal LM
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(foreign))
    with pytest.raises(RuntimeSetupError, match="not a causal-LM graph"):
        open_session(foreign)


def test_runtime_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, runtime; assert 'torch' not in sys.modules, 'runtime imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
