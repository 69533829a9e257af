"""The accuracy baselines SASQ is measured against, each a real implementation on the same
windows and the same calibration text. They use the method; the method never imports
them (tests/test_layers.py checks it).

- ``fp32`` / ``fp16``: the float model (FP16 on a GPU, or a CPU with AVX512-FP16);
- ``naive``: static W8A8 with absmax per-tensor activation scales, no training;
- ``percentile`` / ``mse``: static PTQ with percentile or MSE-optimal clipping;
- ``smoothquant``: SmoothQuant's static per-tensor form, per-channel factors folded into the
  preceding RMSNorm / linear, migration strength alpha searched on validation windows;
- ``dynamic``: per-token absmax activation scales computed at run time (the accuracy
  reference static methods are measured against; nothing to export);
- ``train_qat``: full-weight QAT, the training-cost reference.

ONNX Runtime's own ``quantize_static`` lives in ``exporters.ort_static`` (it works on the float
ONNX export). SASQ itself is ``sasq_edge.pipeline.run_sasq``.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from runtime.profiles import cpu_features
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.modules import ActQuantizer, prepare, quant_linears, scale_parameters, set_mode
from sasq_edge.pipeline import quantize_ptq, search_smooth_alpha
from sasq_edge.quant_math import round_ste
from sasq_edge.train import TrainReport, train_loop

METHODS = ("fp32", "fp16", "naive", "percentile", "mse", "smoothquant", "dynamic")


class DynamicActQuantizer(ActQuantizer):
    """Per-token absmax activation scales computed at run time (an accuracy reference only: a
    static graph cannot hold them, so it is never exported or trained)."""

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / self.grid.qmax  # (..., 1)
        return torch.clamp(round_ste(x / s), self.grid.qmin, self.grid.qmax), s

    def trainable(self) -> list[nn.Parameter]:
        return []


def quantize_dynamic(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Prepare ``model`` in place with per-token dynamic activation quantizers, in fake-quant mode."""
    prepare(model, config)
    for _, m in quant_linears(model):
        m.act_quant = DynamicActQuantizer(m.act_quant.grid, m.act_quant.truncation)
    set_mode(model, "fake")
    return model


def fp16_supported(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        return True, "GPU"
    _, flags = cpu_features()
    if "avx512_fp16" in flags or "amx_fp16" in flags:
        return True, "CPU with AVX512-FP16"
    return False, "this CPU has no native FP16 arithmetic (no avx512_fp16/amx_fp16): FP16 runs on a GPU"


def build_method(model: nn.Module, method: str, config: QuantConfig, calib: np.ndarray,
                 select: np.ndarray | None = None) -> tuple[nn.Module, dict]:
    """A copy of the float ``model`` quantized (or cast) as ``method`` says, and what was chosen
    (``fp32`` returns ``model`` itself; ``model`` is never changed).

    ``calib``: calibration windows (validation text); ``select``: validation windows that pick
    SmoothQuant's alpha when ``config.smooth_alpha`` is None or "auto".
    """
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r}: choose one of {', '.join(METHODS)}")
    info: dict = {"method": method}
    if method == "fp32":
        return model, info
    if method == "fp16":
        device = next(model.parameters()).device
        ok, why = fp16_supported(device)
        if not ok:
            raise ConfigError(why)
        info["fp16_on"] = why
        return copy.deepcopy(model).half(), info
    # the published methods as published: no smoothing unless the method is SmoothQuant, no rotation
    base = dataclasses.replace(config, train_steps=0, smooth_alpha=None, smooth_learn=False, rotate_block=0)
    if method == "dynamic":
        info["config"] = base.to_dict()
        return quantize_dynamic(copy.deepcopy(model), base), info
    if method == "naive":
        cfg = dataclasses.replace(base, calibration="absmax")
    elif method in ("percentile", "mse"):
        cfg = dataclasses.replace(base, calibration=method)
    else:  # smoothquant
        alpha = config.smooth_alpha
        if alpha is None or alpha == "auto":
            if select is None:
                raise ConfigError("smoothquant needs validation windows to search alpha, or a fixed smooth_alpha")
            alpha, tried = search_smooth_alpha(model, base, calib, select)
            info["alpha_search"] = {str(a): p for a, p in tried.items()}
        cfg = dataclasses.replace(base, smooth_alpha=alpha)
        info["alpha"] = alpha
    info["config"] = cfg.to_dict()
    trial = copy.deepcopy(model)
    quantize_ptq(trial, cfg, calib)
    return trial, info


def train_qat(model: nn.Module, windows: torch.Tensor, config: QuantConfig, *, weight_lr: float = 1e-5,
              progress: bool = True) -> TrainReport:
    """Full-weight QAT for the same steps, as the cost reference SASQ is measured against:
    every parameter trains (a ``QuantLinear`` whose weight requires grad re-quantizes it each
    pass, straight through the rounding; activation scales train as in ``train_scales``).
    Changes the model's weights; the frozen INT8 weights are recomputed from them at the end,
    so evaluating the model afterwards measures the trained weights."""
    if any(m.act_quant.mode != "fake" for _, m in quant_linears(model)):
        raise ConfigError("quantizers are not in fake-quant mode: run calibrate() before train_qat()")
    scales = scale_parameters(model)
    ids = {id(p) for p in scales}
    weights = [p for p in model.parameters() if id(p) not in ids]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        groups = [{"params": scales, "lr": config.lr}, {"params": weights, "lr": weight_lr}]
        return train_loop(model, windows, config, groups, progress=progress, desc="full QAT")
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, m in quant_linears(model):
            m.refresh_weight()
