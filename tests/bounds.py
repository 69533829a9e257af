"""Tolerances derived from what is compared, for ONNX Runtime against the PyTorch fake-quant twin.

Two sources of disagreement, and nothing else, are legitimate:

- float32 accumulation order: the kernels sum each dot product in another order than PyTorch
  (differently on each CPU: AVX2, AVX512, VNNI, ARM NEON). Over a reduction of K terms the
  reordering error is at most about K * eps32 times the magnitude of the sums; we bound it by
  ``K * eps32 * max|logits|`` at every position.
- a rounding tie in a quantizer: a value within one float32 ulp of a code boundary lands on the
  other code when the value's own float error differs. One code in one place moves its position and
  the later ones of its sequence by less than quantization itself moves the model (every code
  everywhere; measured 0.36x of it at worst); we bound it by the twin's own distance from the float
  model.

A wrong scale, weight, zero point or graph wiring moves every position by at least the
quantization noise: both bounds catch it.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
FLIP_SHARE = 0.1  # positions whose top token a rounding-tie flip may change: a loose bound, not a measured one


def accumulation_bound(reference: np.ndarray, reduction: int) -> float:
    """The float32 reordering bound for logits ``reference`` computed through reductions of at most
    ``reduction`` terms."""
    return reduction * EPS32 * float(np.abs(reference).max())


def assert_matches_twin(out: np.ndarray, twin: np.ndarray, float_logits: np.ndarray, reduction: int) -> None:
    """``out`` (ONNX Runtime) against ``twin`` (PyTorch fake quant), ``(B, T, V)`` logits;
    ``float_logits``: the float model on the same ids; ``reduction``: the model's longest dot
    product (its intermediate size). Every position within float32 reordering noise, or, where a
    rounding tie flipped a code (that position and every later one of its sequence move), closer to
    the twin than quantization itself moves it and with the same top token at most positions."""
    rows = np.abs(out - twin).max(axis=-1)  # (B, T)
    noise = accumulation_bound(twin, reduction)
    if (rows <= noise).all():
        return
    quant = float(np.abs(twin - float_logits).max())  # what quantization itself does to the logits
    assert rows.max() < quant, (f"ONNX Runtime is {rows.max():.2e} from the twin at worst ({(rows > noise).sum()} of "
                                f"{rows.size} positions beyond float32 noise {noise:.2e}), as far as quantization moves it "
                                f"({quant:.2e}): a wrong scale, weight or graph, not a rounding tie")
    assert (out.argmax(-1) == twin.argmax(-1)).mean() >= 1 - FLIP_SHARE


def host_profile() -> str:
    """The CPU profile this machine's ONNX Runtime computes exactly (what ``--profile auto`` picks
    here): tests that compare integer results bit for bit export for it. ``cpu-vnni``'s 8-bit
    weights saturate AVX2's 16-bit pair sums on a CPU without VNNI (``runtime.profiles.inexact_here``)."""
    from runtime.errors import ConfigError
    from runtime.profiles import detect_profile

    try:
        return detect_profile()[0]
    except ConfigError:
        return "cpu-avx2"


HOST_PROFILE = host_profile()
