"""Block-Hadamard rotation of a linear layer's input, as plain numpy: the one definition both the
training side and the exporter use.

A linear layer ``y = W x`` computes the same function as ``y = (W R)(R x)`` for any orthogonal,
symmetric ``R`` (``R R = I``). With ``R`` block-diagonal, each block the normalized Sylvester
Hadamard matrix ``H_b`` (entries ``±1/sqrt(b)``), ``R x`` mixes every ``b`` consecutive input
channels: a channel with a large outlier is spread over ``b`` channels at ``1/sqrt(b)`` of its
size, so one static per-tensor scale fits the rotated input far better (QuaRot, SpinQuant). The
rotated weight ``W R`` is computed once (float64, stored as float32) and quantized per output
channel as usual; the input rotation runs online in the deployed graph: ``Reshape`` to
``(..., K / b, b)``, a float ``MatMul`` by the constant ``H_b`` (``b`` multiply-adds an element:
``b / N`` of the layer's own work), ``Reshape`` back, then ``QuantizeLinear``.

Which linears rotate is registry data (``runtime.families.ArchSpec.rotated``); what it measured is in
bench/results/rotation_smollm2.md.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BLOCK = 64


def hadamard(block: int) -> np.ndarray:
    """The normalized Sylvester Hadamard matrix ``(block, block)``, float32: symmetric, orthogonal.
    ``block`` must be a power of two (at least 2)."""
    if block < 2 or block & (block - 1):
        raise ValueError(f"Hadamard block {block} must be a power of two, at least 2")
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(block)).astype(np.float32)


def block_for(features: int, max_block: int) -> int:
    """The largest power of two that divides ``features`` and is at most ``max_block``; 1 (no
    rotation) when ``features`` is odd or ``max_block`` below 2."""
    b = 1
    while b * 2 <= max_block and features % (b * 2) == 0:
        b *= 2
    return b


def rotate_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """``W R`` for a ``(N, K)`` weight: each row's consecutive ``block`` columns times ``H_block``,
    in float64, returned as float32."""
    w = np.asarray(weight, dtype=np.float64)
    n, k = w.shape
    if k % block:
        raise ValueError(f"{k} input channels do not split into Hadamard blocks of {block}")
    h = hadamard(block).astype(np.float64)
    return (w.reshape(n, k // block, block) @ h).reshape(n, k).astype(np.float32)


def rotate_input(x: np.ndarray, block: int) -> np.ndarray:
    """``R x`` over the last axis of ``x``, in float32 (what the deployed graph's MatMul computes,
    up to its summation order)."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    return (x.reshape(*x.shape[:-1], k // block, block) @ hadamard(block)).reshape(x.shape)
