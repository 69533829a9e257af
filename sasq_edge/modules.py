"""Quantized modules and the module swap: ``prepare(model, config)``.

A ``QuantLinear`` *is* the original ``nn.Linear`` (it shares the same weight and bias
``Parameter`` objects, so the checkpoint's tensors are never copied or rewritten) plus a static
per-tensor activation quantizer with a learnable scale and a frozen per-output-channel INT8
weight. Its one job is the forward pass of calibration and training: float (calibration observes
float activations) or fake-quant (training, torch evaluation). Lowering to ONNX is the
exporter's (``exporters.lowering``), which reads only the float weights and the scale state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from exporters.lowering import rotate_blocks
from runtime.families import arch_spec
from runtime.grids import EMBEDDING_GRID, IntGrid, encode_weight
from runtime.rotation import block_for, hadamard
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.quant_math import grad_scale, lsq_grad_scale, round_ste, soft_truncate, weight_scales_per_channel

Mode = Literal["float", "fake"]
MODES = ("float", "fake")


def _encode(weight: torch.Tensor, grid: IntGrid, rotation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``runtime.grids.encode_weight`` on a torch weight (``runtime.rotation.rotate_weight`` first
    when ``rotation`` > 1): the codes the exporter writes, on the weight's device."""
    w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    codes, scale = encode_weight(w, grid, rotation)
    return torch.from_numpy(codes).to(weight.device), torch.from_numpy(scale).to(weight.device)


class ActQuantizer(nn.Module):
    """Static per-tensor activation quantizer with a learnable, positive scale.

    The scale is stored as ``log_scale`` so that gradient steps can never make it zero or
    negative. With ``truncation="tanh"`` the input first goes through ``a * tanh(x / a)`` with a
    learnable ``a`` (stored as ``log_trunc``).
    """

    def __init__(self, grid: IntGrid, truncation: str = "clip") -> None:
        super().__init__()
        self.grid = grid
        self.truncation = truncation
        self.mode: Mode = "float"
        self.log_scale = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.log_trunc = nn.Parameter(torch.zeros(()), requires_grad=False) if truncation == "tanh" else None

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @property
    def trunc(self) -> torch.Tensor | None:
        return None if self.log_trunc is None else self.log_trunc.exp()

    @torch.no_grad()
    def set_scale(self, scale: float, trunc: float | None = None) -> None:
        if not scale > 0:
            raise ConfigError(f"activation scale {scale} must be positive and finite")
        self.log_scale.fill_(torch.log(torch.tensor(scale, dtype=torch.float32)))
        if self.log_trunc is not None:
            if trunc is None or not trunc > 0:
                raise ConfigError(f"soft-truncation range {trunc} must be positive and finite")
            self.log_trunc.fill_(torch.log(torch.tensor(trunc, dtype=torch.float32)))

    def set_mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown quantizer mode {mode!r}: use {' or '.join(MODES)}")
        self.mode = mode

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in (self.log_scale, self.log_trunc) if p is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return x
        q, s = self.codes(x)
        return q * s

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fake-quant mode, split: the integer codes ``clamp(round(x / s))`` (as float, with the
        straight-through gradient) and the scale ``s`` (with LSQ's scaled gradient), so that
        ``codes * s`` is the fake-quantized input. Computed with the float operations the
        deployed ``QuantizeLinear`` uses (one division, round half to even)."""
        if self.log_trunc is not None:
            x = soft_truncate(x, self.log_trunc.exp())
        s = grad_scale(self.log_scale.exp(), lsq_grad_scale(x.numel(), self.grid))
        return torch.clamp(round_ste(x / s), self.grid.qmin, self.grid.qmax), s


class _CodesLinear(torch.autograd.Function):
    """``x @ codes^T`` for a frozen int8 ``codes`` ``(N, K)``, the codes cast to ``x``'s float
    dtype for the product in the forward and again in the backward pass: autograd keeps the int8
    tensor, not a float32 copy of every quantized weight (4 bytes a weight, more than the float
    weights themselves in bf16). The forward is ``F.linear(x, codes.float())``, bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)
        return F.linear(x, codes.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (codes,) = ctx.saved_tensors
        return grad @ codes.to(grad.dtype), None


class QuantLinear(nn.Linear):
    """``nn.Linear`` with a quantized input and a frozen per-output-channel INT8 weight.

    With ``rotation`` = b > 1 the quantized input is the block-Hadamard rotated ``R x`` and the
    INT8 weight encodes ``W R`` (``runtime.rotation``); the float mode still computes ``W x``."""

    def __init__(self, linear: nn.Linear, act_grid: IntGrid, weight_grid: IntGrid, truncation: str,
                 rotation: int = 1) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects: nothing is copied
        self.bias = linear.bias
        self.weight_grid = weight_grid
        self.act_quant = ActQuantizer(act_grid, truncation)
        # learnable per-input-channel smoothing (sasq_edge.smooth.attach_learnable): the input is
        # divided and the weight's columns multiplied by exp(log_smooth), expanded by smooth_index
        self.log_smooth: nn.Parameter | None = None
        self.smooth_index: torch.Tensor | None = None
        if rotation > 1 and self.in_features % rotation:
            raise ConfigError(f"{self.in_features} input channels do not split into Hadamard blocks of {rotation}")
        self.rotation = rotation
        self.register_buffer("hadamard", torch.from_numpy(hadamard(rotation)) if rotation > 1 else None)
        self.refresh_weight()

    @torch.no_grad()
    def refresh_weight(self) -> None:
        """(Re)compute the frozen INT8 weight from ``self.weight`` (after factors are folded or
        the weight trained): the codes the exporter writes for it."""
        codes, scale = _encode(self.weight, self.weight_grid, self.rotation)
        self.register_buffer("weight_int", codes)  # (N, K) int8
        self.register_buffer("weight_scale", scale)  # (N,) float32

    @property
    def mode(self) -> Mode:
        return self.act_quant.mode

    @property
    def weight_codes(self) -> torch.Tensor:
        """The integer codes as float32 (N, K): what the fake-quant product multiplies by."""
        return self.weight_int.to(torch.float32)

    @property
    def weight_dq(self) -> torch.Tensor:
        """The dequantized weight ``codes * scale`` (N, K) (of ``W R`` when the input is rotated)."""
        return self.weight_codes * self.weight_scale[:, None]

    def quantizer_input(self, x: torch.Tensor) -> torch.Tensor:
        """The float32 tensor the activation quantizer reads for the layer input ``x``: divided by
        the learnable smoothing factors when attached, then rotated when the layer rotates (soft
        truncation, when on, is the quantizer's own first step)."""
        x = x.float()
        if self.log_smooth is not None:
            x = x / self._smooth_factors()
        return x if self.hadamard is None else rotate_blocks(x, self.hadamard)

    def _smooth_factors(self) -> torch.Tensor:
        r = self.log_smooth.exp()
        return r if self.smooth_index is None else r[self.smooth_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant.mode == "float":
            return F.linear(x, self.weight, self.bias)
        # Integer codes times integer codes, then one multiplication by the product of the
        # scales: what ONNX Runtime's integer kernels (MatMulIntegerToFloat) compute. The float32
        # sums of integer products are exact while they stay below 2**24 (K * 128 * 64 for 7-bit
        # weights always does up to K = 2048), so the only float rounding is the final scaling,
        # as in the deployed kernel. Mathematically equal to ``F.linear(codes * s, weight_dq)``,
        # so LSQ/STE gradients are unchanged. The quantizer works in float32 whatever the
        # weights' dtype (bf16 weights pass bf16 activations): the output goes back to it.
        dtype = x.dtype
        weight = self.weight
        if self.log_smooth is not None:
            weight = weight.float() * self._smooth_factors()[None, :]
        q, s = self.act_quant.codes(self.quantizer_input(x))
        if self.log_smooth is not None or weight.requires_grad:
            # the weight moves (learned smoothing, or a weight-training reference): re-quantize it
            # every pass, straight through the rounding (differentiable, so in torch; the frozen codes
            # the deployed model holds are re-encoded by refresh_weight through encode_weight after
            # training)
            if self.hadamard is not None:
                weight = rotate_blocks(weight.float(), self.hadamard)
            g = self.weight_grid
            ws = weight_scales_per_channel(weight, g)
            wq = torch.clamp(round_ste(weight.float() / ws[:, None]), g.qmin, g.qmax)
            y = F.linear(q, wq) * (s * ws)
        else:
            y = _CodesLinear.apply(q, self.weight_int) * (s * self.weight_scale)
        y = y if self.bias is None else y + self.bias.float()
        return y.to(dtype)

    def extra_repr(self) -> str:
        rot = f", rotation={self.rotation}" if self.rotation > 1 else ""
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, act={self.act_quant.grid}{rot}"


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with a weight-only INT8 table: per-row symmetric codes and scales, the
    same codes the exporter's ``Int8Embedding`` gathers. The fake-quant forward computes the
    deployed float operation (``codes * scale`` of the looked-up rows)."""

    def __init__(self, emb: nn.Embedding, grid: IntGrid) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx, self.max_norm = emb.padding_idx, emb.max_norm
        self.norm_type, self.scale_grad_by_freq, self.sparse = emb.norm_type, emb.scale_grad_by_freq, emb.sparse
        self.weight = emb.weight  # the same Parameter (tied to lm_head in many models)
        self.grid = grid
        self.mode: Mode = "float"
        codes, scale = _encode(emb.weight, grid)
        self.register_buffer("weight_int", codes)
        self.register_buffer("weight_scale", scale)

    def set_mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown quantizer mode {mode!r}: use {' or '.join(MODES)}")
        self.mode = mode

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return F.embedding(ids, self.weight)
        flat = ids.reshape(-1)
        rows = torch.index_select(self.weight_int, 0, flat)
        scale = torch.index_select(self.weight_scale, 0, flat)
        out = rows.to(torch.float32) * scale[:, None]
        return out.reshape(*ids.shape, self.embedding_dim).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows {self.grid}"


def target_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """Fully qualified names of the ``nn.Linear`` modules ``config`` quantizes, in model order."""
    spec = arch_spec(model.config.model_type)
    leaves = set(config.targets if config.targets is not None else spec.targets)
    prefix = spec.blocks + "."
    names = [
        n for n, m in model.named_modules()
        if n.startswith(prefix) and n.rsplit(".", 1)[-1] in leaves and isinstance(m, nn.Linear)
    ]
    if config.lm_head:
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        if not isinstance(head, nn.Linear) or head_name is None:
            raise ConfigError(f"lm_head=True, but this {model.config.model_type} model has no nn.Linear output head: drop --int8-lm-head")
        names.append(head_name)
    found = {n.rsplit(".", 1)[-1] for n in names}
    missing = sorted(leaves - found)
    if missing:
        raise ConfigError(
            f"target module(s) {', '.join(missing)} not found in the decoder blocks of this "
            f"{model.config.model_type} model: valid leaf names are {', '.join(sorted(spec.targets))}"
        )
    return names


def rotation_blocks(model: nn.Module, config: QuantConfig) -> dict[str, int]:
    """Target linear -> Hadamard block of its input rotation, for the architecture's ``rotated``
    linears inside each decoder block when ``config.rotate_block`` > 0: the largest power of two up
    to it that divides the layer's input width (1, no rotation, where none does)."""
    if not config.rotate_block:
        return {}
    spec = arch_spec(model.config.model_type)
    prefix = spec.blocks + "."
    return {n: block_for(model.get_submodule(n).in_features, config.rotate_block) for n in target_names(model, config)
            if n.startswith(prefix) and n[len(prefix):].split(".", 1)[-1] in spec.rotated}


def prepare_block(model: nn.Module, piece: str, config: QuantConfig) -> dict[str, nn.Linear]:
    """Swap the target linears inside the decoder block ``piece`` (``model.layers.3``) for
    ``QuantLinear``, in place, as ``prepare`` does for the whole model (the block-wise pass and
    the layer-by-layer calibration prepare one block at a time). Returns name -> the original
    ``nn.Linear`` (it shares its weight with the ``QuantLinear``)."""
    deploy = config.deploy
    blocks = rotation_blocks(model, config)
    swapped = {}
    for name in target_names(model, config):
        if not name.startswith(piece + ".") or isinstance(model.get_submodule(name), QuantLinear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        for p in linear.parameters():
            p.requires_grad_(False)
        setattr(parent, leaf, QuantLinear(linear, deploy.act, deploy.weight, config.truncation, blocks.get(name, 1)))
        swapped[name] = linear
    return swapped


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Freeze every parameter and swap each target ``nn.Linear`` for a ``QuantLinear``, in place.

    Quantizers start in ``float`` mode with scale 1; ``calibrate`` initialises them.
    """
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ConfigError("model is already prepared: call prepare() once on a freshly loaded model")
    for p in model.parameters():
        p.requires_grad_(False)
    deploy = config.deploy
    blocks = rotation_blocks(model, config)
    for name in target_names(model, config):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, QuantLinear(getattr(parent, leaf), deploy.act, deploy.weight, config.truncation,
                                          blocks.get(name, 1)))
    if config.embedding == "int8":
        emb = model.get_input_embeddings()
        if type(emb) is not nn.Embedding:
            raise ConfigError(f"embedding='int8' needs a plain nn.Embedding, this model has {type(emb).__name__}: use embedding='float'")
        model.set_input_embeddings(QuantEmbedding(emb, EMBEDDING_GRID))
    return model


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            yield name, m


def _mode_holders(model: nn.Module) -> Iterator[tuple[str, ActQuantizer | QuantEmbedding]]:
    for name, m in model.named_modules():
        if isinstance(m, (ActQuantizer, QuantEmbedding)):
            yield name, m


def set_mode(model: nn.Module, mode: Mode) -> None:
    for _, m in _mode_holders(model):
        m.set_mode(mode)


@contextlib.contextmanager
def quant_mode(model: nn.Module, mode: Mode) -> Iterator[None]:
    """Temporarily switch every quantizer to ``mode``; the previous modes are always restored."""
    previous = {name: m.mode for name, m in _mode_holders(model)}
    try:
        set_mode(model, mode)
        yield
    finally:
        for name, m in _mode_holders(model):
            m.set_mode(previous[name])


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The only parameters SASQ trains: every activation quantizer's scale (and truncation),
    and the learnable smoothing factors when attached (shared by a group: listed once)."""
    params, seen = [], set()
    for _, m in quant_linears(model):
        for p in (*m.act_quant.trainable(), m.log_smooth):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
