"""Integer grids and the weight encoding every deployed model uses, as plain data and numpy.

A grid is what a deploy profile promises the hardware: codes in ``[qmin, qmax]``, dequantized
as ``code * scale``, stored with a ``zero_point`` offset in an ``int8`` or ``uint8`` tensor.
``encode_weight`` is the one definition of a frozen INT8 weight: symmetric, per output channel,
round half to even (ONNX ``QuantizeLinear``), all in float32. The training side
(``sasq_edge.modules``) and the exporter both call it, so the codes a model trains against are
the codes the ONNX file holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntGrid:
    """A symmetric integer grid: values ``q`` in ``[qmin, qmax]``, dequantized as ``q * scale``.

    ``zero_point`` is the offset the deployed integer type stores (128 for uint8 that carries
    the int8 grid); it never changes the real values the grid represents.
    """

    qmin: int
    qmax: int
    zero_point: int = 0
    dtype: str = "int8"  # deployed integer type: "int8" or "uint8"

    def __post_init__(self) -> None:
        if not self.qmin < 0 < self.qmax:
            raise ValueError(f"grid [{self.qmin}, {self.qmax}] must contain 0 strictly inside")
        if self.dtype not in ("int8", "uint8"):
            raise ValueError(f"grid dtype {self.dtype!r} must be int8 or uint8")

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def stored_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` as stored, zero point included."""
        return self.qmin + self.zero_point, self.qmax + self.zero_point


# weight-only embedding rows: the full symmetric int8 grid (no kernel-side saturation concerns)
EMBEDDING_GRID = IntGrid(-127, 127, zero_point=0, dtype="int8")


def weight_scales(weight: np.ndarray, grid: IntGrid) -> np.ndarray:
    """Per-output-channel symmetric scales ``max|W[c, :]| / qmax`` of a ``(N, K)`` weight, float32.
    All-zero rows get scale 1, so that dequantization stays exact (0 * 1 = 0)."""
    amax = np.abs(np.asarray(weight, dtype=np.float32)).max(axis=1)  # (N,)
    return np.where(amax > 0, amax / np.float32(grid.qmax), np.float32(1.0)).astype(np.float32)


def encode_weight(weight: np.ndarray, grid: IntGrid, rotation: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scales)`` of a ``(N, K)`` weight: int8 codes ``clip(round(W / s), qmin, qmax)``
    with one float32 scale per output row (ties to even, as QuantizeLinear rounds). With
    ``rotation`` = b > 1 the weight whose input is rotated online in Hadamard blocks of b is encoded
    as ``W R`` (``runtime.rotation.rotate_weight``, in float64). The one place a weight becomes
    codes: training, the exporters and the validator all call it."""
    if rotation > 1:
        from runtime.rotation import rotate_weight

        weight = rotate_weight(weight, rotation)
    w = np.asarray(weight, dtype=np.float32)
    scale = weight_scales(w, grid)
    codes = np.clip(np.round(w / scale[:, None]), grid.qmin, grid.qmax).astype(np.int8)
    return codes, scale
