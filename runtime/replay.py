"""Exact integer replay of the quantized linear layers, in numpy.

A deployed quantized linear computes ``codes_x = clip(round_half_even(x / s), qmin, qmax)``, then
``y = (codes_x @ codes_W^T) * (s * s_W)``: integer products summed exactly (ONNX Runtime's
``MatMulIntegerToFloat`` accumulates in int32; float32 holds every sum below 2^24), one float32
multiply by the product of the scales. Given the float tensor the graph quantized (``x``, read
from ONNX Runtime) and what the scale state says (the activation scale ``s``, the profile's grid,
the INT8 weight codes and per-channel scales the PyTorch twin holds), the layer's output is
determined to the bit. ``replay_linear`` recomputes it and compares it with what ONNX Runtime
returned for the ``MatMul``: a correct export matches everywhere, except where ``x / s`` lies
within a few float32 ulps of a rounding tie (a kernel that computes ``x * (1 / s)`` may round
such a value the other way); rows (tokens) with such a value are counted and left out. A wrong
scale, zero point, weight row, axis or a float fallback mismatches in far more places.

Imports numpy only (and ``runtime.state`` for the weights digest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from runtime.graph import GraphIndex, attr, layer_of
from runtime.grids import IntGrid
from runtime.state import weights_digest

TIE_ULPS = 4  # a value of x / s this many float32 ulps from k + 0.5, or closer, is a rounding tie


@dataclass(frozen=True)
class TwinLinear:
    """What the PyTorch twin computes for one quantized linear: INT8 weight codes ``(N, K)``,
    per-output-channel scales ``(N,)``, the activation scale from the scale state, and the bias."""

    codes: np.ndarray
    weight_scale: np.ndarray
    act_scale: float
    bias: np.ndarray | None = None


def activation_codes(x: np.ndarray, scale: float, grid: IntGrid) -> np.ndarray:
    """``clip(round_half_even(x / s), qmin, qmax)`` in float32, as ``QuantizeLinear`` computes it
    (the zero point only shifts the stored integer)."""
    r = np.asarray(x, dtype=np.float32) / np.float32(scale)
    return np.clip(np.rint(r), grid.qmin, grid.qmax)


def near_ties(x: np.ndarray, scale: float, ulps: int = TIE_ULPS) -> np.ndarray:
    """Where ``x / s`` lies within ``ulps`` float32 ulps of a rounding tie ``k + 0.5``."""
    r = np.asarray(x, dtype=np.float32) / np.float32(scale)
    frac = np.abs(r - np.floor(r) - np.float32(0.5))
    return frac <= ulps * np.spacing(np.abs(r))


def replay_output(x: np.ndarray, twin: TwinLinear, grid: IntGrid) -> np.ndarray:
    """The layer's ``MatMul`` output ``(..., N)`` for input ``x`` ``(..., K)`` (bias not added:
    the graph adds it after the ``MatMul``)."""
    codes_x = activation_codes(x, twin.act_scale, grid).astype(np.float64)
    acc = codes_x @ twin.codes.astype(np.float64).T  # exact integers
    return acc.astype(np.float32) * (np.float32(twin.act_scale) * twin.weight_scale.astype(np.float32))


@dataclass
class LinearReplay:
    """The replay of one layer over the windows seen: ``elements`` outputs compared,
    ``mismatched`` that differ from ONNX Runtime's, ``tie_rows`` rows (tokens) whose input holds a
    rounding tie (their mismatches are explained), ``unexplained`` mismatches in the other rows."""

    layer: str
    quantized: bool = True  # an activation Q/DQ pair feeds the MatMul in the graph
    elements: int = 0
    rows: int = 0
    mismatched: int = 0
    tie_rows: int = 0
    unexplained: int = 0
    max_abs_diff: float = 0.0
    max_abs_output: float = 0.0
    graph_scale: float | None = None
    state_scale: float | None = None

    def update(self, x: np.ndarray, y_onnx: np.ndarray, twin: TwinLinear, grid: IntGrid, ulps: int = TIE_ULPS) -> None:
        y = replay_output(x, twin, grid)
        y_onnx = np.asarray(y_onnx, dtype=np.float32)
        if y.shape != y_onnx.shape:
            raise ValueError(f"{self.layer}: replayed output {y.shape} vs ONNX Runtime's {y_onnx.shape}")
        n = y.shape[-1]
        y, y_onnx = y.reshape(-1, n), y_onnx.reshape(-1, n)
        diff = y != y_onnx  # (rows, N)
        ties = near_ties(x, twin.act_scale, ulps).reshape(y.shape[0], -1).any(axis=1)  # (rows,)
        self.elements += diff.size
        self.rows += y.shape[0]
        self.mismatched += int(diff.sum())
        self.tie_rows += int(ties.sum())
        self.unexplained += int(diff[~ties].sum())
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(y.astype(np.float64) - y_onnx).max(initial=0.0)))
        self.max_abs_output = max(self.max_abs_output, float(np.abs(y_onnx).max(initial=0.0)))
        self.state_scale = twin.act_scale

    @property
    def passed(self) -> bool:
        return self.quantized and self.unexplained == 0

    @property
    def reason(self) -> str:
        if not self.quantized:
            return "no activation QuantizeLinear/DequantizeLinear feeds its MatMul (it reads a float tensor)"
        if self.unexplained:
            return (f"{self.unexplained} of {self.elements} outputs differ from the integer replay outside rounding ties "
                    f"(max |diff| {self.max_abs_diff:.3g}, outputs up to {self.max_abs_output:.3g})")
        return "exact" + (f" ({self.tie_rows} rows with a rounding tie)" if self.tie_rows else "")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["passed"] = self.passed
        return d


@dataclass
class ReplayReport:
    """Every quantized linear's replay, in graph order, and the first one that fails."""

    layers: list[LinearReplay] = field(default_factory=list)
    windows: int = 0
    tie_ulps: int = TIE_ULPS

    @property
    def failed(self) -> list[LinearReplay]:
        return [r for r in self.layers if not r.passed]

    @property
    def first_failure(self) -> str | None:
        bad = self.failed
        return bad[0].layer if bad else None

    @property
    def passed(self) -> bool:
        return bool(self.layers) and not self.failed

    def summary(self) -> str:
        exact = sum(r.passed for r in self.layers)
        ties = sum(r.tie_rows for r in self.layers)
        head = (f"integer replay {'PASSED' if self.passed else 'FAILED'}: {exact}/{len(self.layers)} quantized linears "
                f"match ONNX Runtime bit for bit over {self.windows} windows ({ties} rows with a rounding tie left out)")
        if not self.passed:
            first = self.failed[0]
            head += f"; first failure {first.layer}: {first.reason}"
        return head

    def to_dict(self) -> dict:
        return {"passed": self.passed, "windows": self.windows, "tie_ulps": self.tie_ulps,
                "layers_exact": sum(r.passed for r in self.layers), "layers": len(self.layers),
                "first_failure": self.first_failure,
                "unexplained": sum(r.unexplained for r in self.layers),
                "tie_rows": sum(r.tie_rows for r in self.layers),
                "per_layer": [r.to_dict() for r in self.layers]}


def graph_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Layer -> ``(codes (N, K) int8, scales (N,) float32)`` of every quantized weight stored in
    ``model`` (its ``DequantizeLinear`` axis says which axis holds the output channels)."""
    g = GraphIndex(model)
    out = {}
    for weight, dq in g.quantized_weights().items():
        codes = g.values(weight)
        scale = g.values(g.nodes[dq].input[1])
        if codes is None or scale is None or codes.ndim != 2:
            continue
        if attr(g.nodes[dq], "axis", 1) == 1:
            codes = codes.T  # stored (K, N), pre-transposed for the MatMul
        out[layer_of(weight)] = (np.ascontiguousarray(codes, dtype=np.int8), np.asarray(scale, dtype=np.float32).reshape(-1))
    return out


def graph_weights_digest(model: onnx.ModelProto) -> str:
    """``runtime.state.weights_digest`` of the INT8 weights the graph holds."""
    return weights_digest((name, codes, scale) for name, (codes, scale) in graph_weights(model).items())
