"""Scale training: gradient descent on the activation quantization scales alone, through fake
quantization with the straight-through estimator, on the next-token loss (SASQ section 3)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.modules import quant_linears, scale_parameters


@dataclass
class TrainReport:
    steps: int
    tokens: int
    trainable_parameters: int
    wall_s: float
    peak_rss_mb: float
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        first = self.losses[0] if self.losses else None
        last = sum(self.losses[-10:]) / len(self.losses[-10:]) if self.losses else None
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "trainable_parameters": self.trainable_parameters,
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "loss_first": first,
            "loss_last10": last,
        }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def freeze_all_but_scales(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter, then enable exactly the activation-quantizer scales."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = scale_parameters(model)
    if not params:
        raise ConfigError("model has no activation quantizers to train: call prepare() and calibrate() first")
    for p in params:
        p.requires_grad_(True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}, "only activation scales may require grad"
    return params


def train_scales(model: nn.Module, windows: torch.Tensor, config: QuantConfig, *, progress: bool = True) -> TrainReport:
    """Train the activation scales of a calibrated model for ``config.train_steps`` steps.

    ``windows``: ``(N, T)`` token ids from the training text (never the test split). Each step
    draws ``config.batch_size`` windows with a generator seeded by ``config.seed``.
    """
    if any(m.act_quant.mode != "fake" for _, m in quant_linears(model)):
        raise ConfigError("quantizers are not in fake-quant mode: run calibrate() before train_scales()")
    params = freeze_all_but_scales(model)
    report = TrainReport(0, 0, sum(p.numel() for p in params), 0.0, 0.0)
    if config.train_steps == 0:
        for p in params:
            p.requires_grad_(False)
        return report
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(params, lr=config.lr)
    was_training = model.training
    model.eval()  # no dropout: the loss sees the deployed computation
    start = time.perf_counter()
    bar = tqdm(range(config.train_steps), desc="train scales", unit="step", disable=not progress)
    try:
        for _ in bar:
            idx = torch.randint(0, windows.shape[0], (config.batch_size,), generator=gen)
            ids = windows[idx]  # (B, T)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report.losses.append(loss.item())
            report.steps += 1
            report.tokens += ids.numel()
            bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
    finally:
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
    report.wall_s = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    return report
