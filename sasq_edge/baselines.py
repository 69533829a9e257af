"""The accuracy baselines SASQ is measured against, each a real implementation on the same
windows and the same calibration text (issue 4):

- ``fp32`` / ``fp16``: the float model (FP16 on a GPU, or a CPU with AVX512-FP16);
- ``naive``: static W8A8 with absmax per-tensor activation scales, no training;
- ``percentile`` / ``mse``: static PTQ with percentile or MSE-optimal clipping;
- ``smoothquant``: SmoothQuant's static per-tensor form, per-channel factors folded into the
  preceding RMSNorm / linear, migration strength alpha searched on validation windows;
- ``dynamic``: per-token absmax activation scales computed at run time (the accuracy
  reference static methods are measured against; nothing to export).

ONNX Runtime's own ``quantize_static`` lives in ``exporters.ort_static`` (it works on the
float ONNX export). SASQ itself is ``pipeline.run_sasq``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sasq_edge.calibrate import calibrate
from sasq_edge.config import QuantConfig, cpu_features
from sasq_edge.errors import ConfigError
from sasq_edge.evaluate import perplexity
from sasq_edge.modules import prepare
from sasq_edge.smooth import smooth_model

METHODS = ("fp32", "fp16", "naive", "percentile", "mse", "smoothquant", "dynamic")
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def _batches(windows: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(w))[None] for w in windows]


def quantize_ptq(model: nn.Module, config: QuantConfig, calib: np.ndarray) -> nn.Module:
    """Smooth (if ``config.smooth_alpha``), prepare and calibrate ``model`` in place: static PTQ."""
    batches = _batches(calib)
    if config.smooth_alpha is not None:
        smooth_model(model, batches, config.smooth_alpha, config.targets)
    prepare(model, config)
    calibrate(model, batches, config)
    return model


def search_smooth_alpha(model: nn.Module, config: QuantConfig, calib: np.ndarray, select: np.ndarray,
                        alphas: Sequence[float] = ALPHAS) -> tuple[float, dict[float, float]]:
    """SmoothQuant's alpha with the lowest perplexity of the static PTQ model on ``select``
    (validation windows, never test). ``model`` is left untouched (each try works on a copy)."""
    ppl = {}
    for a in alphas:
        trial = quantize_ptq(copy.deepcopy(model), dataclasses.replace(config, smooth_alpha=a, train_steps=0), calib)
        ppl[a] = perplexity(trial, select, desc=f"alpha {a}", progress=False).ppl
        del trial
    finite = {a: p for a, p in ppl.items() if math.isfinite(p)}
    if not finite:
        raise ConfigError("every smoothing strength gave a non-finite perplexity: check the model and the data")
    return min(finite, key=finite.get), ppl


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
    SmoothQuant's alpha when ``config.smooth_alpha`` is None.
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
    base = dataclasses.replace(config, train_steps=0, smooth_alpha=None)
    if method == "naive":
        cfg = dataclasses.replace(base, calibration="absmax")
    elif method in ("percentile", "mse"):
        cfg = dataclasses.replace(base, calibration=method)
    elif method == "dynamic":
        cfg = dataclasses.replace(base, activations="dynamic")
    else:  # smoothquant
        alpha = config.smooth_alpha
        if alpha is None:
            if select is None:
                raise ConfigError("smoothquant needs validation windows to search alpha, or a fixed smooth_alpha")
            alpha, tried = search_smooth_alpha(model, base, calib, select)
            info["alpha_search"] = {str(a): p for a, p in tried.items()}
        cfg = dataclasses.replace(base, smooth_alpha=alpha)
        info["alpha"] = alpha
    info["config"] = cfg.to_dict()
    return quantize_ptq(copy.deepcopy(model), cfg, calib), info
