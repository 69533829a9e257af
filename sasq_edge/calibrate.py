"""PTQ initialisation of the activation scales: observers fed by forward pre-hooks.

Each observer turns every calibration batch into one scale (absmax, percentile or MSE-optimal
clipping) and ``compute()`` returns their average, the initialisation SASQ describes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from runtime.grids import IntGrid
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.modules import QuantLinear, quant_linears, quant_mode, set_mode
from sasq_edge.quant_math import absmax_scale, mse_scale, percentile_scale


class ScaleObserver:
    """``update(x)`` once per batch, then ``compute()``: the mean of the per-batch scales."""

    def __init__(self, per_batch: Callable[[torch.Tensor], float]) -> None:
        self._per_batch = per_batch
        self._sum = 0.0
        self._count = 0
        self.absmax = 0.0  # largest magnitude seen, used to start the soft truncation

    def update(self, x: torch.Tensor) -> None:
        self._sum += self._per_batch(x)
        self._count += 1
        self.absmax = max(self.absmax, float(x.detach().abs().max()))

    def compute(self) -> float:
        if self._count == 0:
            raise ConfigError("observer saw no batch: the module never ran during calibration")
        return self._sum / self._count


def make_observer(config: QuantConfig, grid: IntGrid) -> ScaleObserver:
    if config.calibration == "absmax":
        return ScaleObserver(lambda x: absmax_scale(x, grid))
    if config.calibration == "percentile":
        return ScaleObserver(lambda x: percentile_scale(x, grid, config.percentile))
    return ScaleObserver(lambda x: mse_scale(x, grid))


@contextlib.contextmanager
def observing(layers: dict[str, QuantLinear], config: QuantConfig) -> Iterator[dict[str, ScaleObserver]]:
    """While inside, every forward of a layer of ``layers`` feeds its quantizer's input to the
    layer's observer (``config.calibration``; the dict it yields, keyed like ``layers``). The
    one calibration hook: the whole model, a block of the block-wise pass, a layer read from disk."""
    observers = {name: make_observer(config, m.act_quant.grid) for name, m in layers.items()}
    handles = []
    try:
        for name, m in layers.items():
            obs = observers[name]
            handles.append(m.register_forward_pre_hook(lambda m, args, obs=obs: obs.update(m.quantizer_input(args[0]))))
        yield observers
    finally:
        for h in handles:
            h.remove()


def set_observed(layers: dict[str, QuantLinear], observers: dict[str, ScaleObserver]) -> dict[str, float]:
    """Set each layer's activation scale (and soft-truncation range: the largest input seen) from
    its observer; returns name -> scale."""
    scales = {}
    for name, m in layers.items():
        obs = observers[name]
        scale = obs.compute()
        if not (math.isfinite(scale) and scale > 0):
            scale = 1.0 / m.act_quant.grid.qmax  # all-zero input: any positive scale is exact
        m.act_quant.set_scale(scale, obs.absmax if obs.absmax > 0 else 1.0)
        scales[name] = scale
    return scales


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], config: QuantConfig, progress: bool = True) -> dict[str, float]:
    """Set every activation scale of a prepared model from float activations on ``batches``
    (token id tensors ``(B, T)``), then switch the quantizers to fake quantization.

    Returns module name -> initial scale.
    """
    targets = dict(quant_linears(model))
    if not targets:
        raise ConfigError("model has no quantized layers: call prepare(model, config) first")
    device = next(model.parameters()).device
    with observing(targets, config) as observers, quant_mode(model, "float"):
        for ids in tqdm(list(batches), desc="calibrate", unit="batch", disable=not progress):
            model(input_ids=ids.to(device))
    scales = set_observed(targets, observers)
    set_mode(model, "fake")
    return scales
