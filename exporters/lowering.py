"""What a quantized layer lowers to, built from the model's frozen float weights and a ``ScaleState``.

``QDQLinear`` and ``Int8Embedding`` are trace-only modules: their forward emits
``torch.ops.quantized_decomposed`` quantize/dequantize ops with Python-float scales, which the
dynamo ONNX exporter turns into ``QuantizeLinear``/``DequantizeLinear`` with constant scales and
INT8 weight initializers. Each activation scale goes from the state
into the module exactly once; each weight's codes come from ``runtime.grids.encode_weight``, the
function the training side uses too. ``lowered(model, state)`` swaps them in for tracing and
always puts the caller's modules back, so export never changes the model it is given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the quantized_decomposed ops
import torch.nn.functional as F
from torch import nn

from runtime.errors import SasqError
from runtime.grids import EMBEDDING_GRID, IntGrid, encode_weight
from runtime.rotation import hadamard
from runtime.state import ScaleState, weights_digest

_TORCH_INT = {"int8": torch.int8, "uint8": torch.uint8}
_QD = torch.ops.quantized_decomposed


class ExportError(SasqError):
    """The model cannot be exported as asked."""


def check_weights(state: ScaleState, digest: str) -> None:
    """Refuse an export whose INT8 weights (``digest``) are not the ones ``state`` was trained with."""
    if state.weights is not None and digest != state.weights:
        raise ExportError("the model's weights do not give the INT8 weights the scales were trained with (weights digest "
                          f"{digest[:12]} vs {state.weights[:12]}): load the model the state names and apply the state "
                          "(sasq_edge.apply_state folds its smoothing factors), or retrain")


def rotate_blocks(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each ``b`` consecutive entries of the last axis times the Hadamard block ``h`` ``(b, b)``: the
    online input rotation in torch (the method's fake-quant layers and the traced graph both run
    this; ``runtime.rotation.rotate_input`` is the numpy form, ``exporters.fused`` writes the nodes)."""
    b = h.shape[0]
    return (t.reshape(*t.shape[:-1], t.shape[-1] // b, b) @ h.to(t.dtype)).reshape(t.shape)


def _weight_codes(weight: torch.Tensor, grid: IntGrid, rotation: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """INT8 codes and row scales of ``weight`` (of ``W R`` when the input is rotated in blocks of ``rotation``)."""
    w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    return encode_weight(w, grid, rotation)


def _dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """``DequantizeLinear(codes, scale, axis=0)``: per-row INT8 codes times their scale."""
    zeros = torch.zeros_like(scale, dtype=torch.int64)
    return _QD.dequantize_per_channel(codes, scale, zeros, 0, grid.qmin, grid.qmax, torch.int8)


class QDQLinear(nn.Module):
    """``y = DQ(Q(x)) @ DQ(W_int8)^T + b``: one constant per-tensor activation scale on the
    profile's activation grid (after ``Tanh(x / a) * a`` with soft truncation), per-output-channel
    INT8 weight codes on its weight grid. With ``rotation`` > 1, ``x`` is first rotated in
    Hadamard blocks (``Reshape``, a float ``MatMul`` by the constant block, ``Reshape``) and the
    codes are those of ``W R`` (``runtime.rotation``)."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, bias: torch.Tensor | None, act_scale: float,
                 trunc: float | None, act: IntGrid, weight: IntGrid, rotation: int = 1) -> None:
        super().__init__()
        self.register_buffer("hadamard", torch.from_numpy(hadamard(rotation)) if rotation > 1 else None)
        self.register_buffer("weight_int", torch.from_numpy(codes))  # (N, K) int8
        self.register_buffer("weight_scale", torch.from_numpy(scale))  # (N,) float32
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.act_scale, self.trunc = act_scale, trunc
        self.act, self.weight_grid = act, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard is not None:
            x = rotate_blocks(x, self.hadamard)
        if self.trunc is not None:
            x = torch.tanh(x / self.trunc) * self.trunc
        g = self.act
        dt = _TORCH_INT[g.dtype]
        lo, hi = g.stored_range
        q = _QD.quantize_per_tensor(x, self.act_scale, g.zero_point, lo, hi, dt)
        x = _QD.dequantize_per_tensor(q, self.act_scale, g.zero_point, lo, hi, dt)
        w = _dequantize_rows(self.weight_int, self.weight_scale, self.weight_grid)
        return F.linear(x, w, self.bias)


class Int8Embedding(nn.Module):
    """Weight-only per-row INT8 embedding: ``Gather`` on the INT8 table and on the row scales,
    then ``DequantizeLinear(axis=0)`` over the gathered rows, so the file stores one byte per
    entry and only looked-up rows are dequantized."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        codes, scale = _weight_codes(weight, EMBEDDING_GRID)
        self.register_buffer("weight_int", torch.from_numpy(codes))  # (V, D) int8
        self.register_buffer("weight_scale", torch.from_numpy(scale))  # (V,)
        self.dim, self.dtype = weight.shape[1], weight.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = torch.index_select(self.weight_int, 0, flat)
        scale = torch.index_select(self.weight_scale, 0, flat)
        out = _dequantize_rows(rows, scale, EMBEDDING_GRID)
        return out.reshape(*ids.shape, self.dim).to(self.dtype)


def _linear_like(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ExportError(f"the scale state quantizes {name!r}, which this model does not have: "
                          "export with the model the scales were trained on") from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ExportError(f"{name} is a {type(module).__name__} without a 2-D weight: only linear layers are quantized")
    return module


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    return old


@contextlib.contextmanager
def lowered(model: nn.Module, state: ScaleState) -> Iterator[str]:
    """Swap every layer ``state`` quantizes (and, with ``state.embedding == "int8"``, the input
    embedding) for its lowering module; yield the digest of the INT8 weights; restore the
    caller's modules on exit, whatever happens.

    The model must hold the float weights the scales were trained with (smoothing factors folded,
    as ``sasq_edge.apply_state`` leaves it); when the state records a weights digest, a model
    whose weights give other INT8 codes is refused.
    """
    deploy = state.deploy
    lowering: dict[str, nn.Module] = {}
    digest_items = []
    for name in sorted(state.scales):
        module = _linear_like(model, name)
        rotation = state.rotation.get(name, 1)
        codes, scale = _weight_codes(module.weight, deploy.weight, rotation)
        digest_items.append((name, codes, scale))
        lowering[name] = QDQLinear(codes, scale, getattr(module, "bias", None), state.scales[name],
                                   state.truncation.get(name), deploy.act, deploy.weight, rotation)
    digest = weights_digest(digest_items)
    check_weights(state, digest)
    emb = model.get_input_embeddings() if state.embedding == "int8" else None
    if emb is not None and not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise ExportError(f"an INT8 embedding needs an embedding table; this model has {type(emb).__name__}")
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name, new in lowering.items():
            swapped.append((name, _swap(model, name, new)))
        if emb is not None:
            model.set_input_embeddings(Int8Embedding(emb.weight))
        yield digest
    finally:
        if emb is not None:
            model.set_input_embeddings(emb)
        for name, old in reversed(swapped):
            _swap(model, name, old)
