"""Scale training: gradient descent on the activation quantization scales alone, through fake
quantization with the straight-through estimator (SASQ section 3).

Two objectives: ``ce``, the next-token cross-entropy on the training text (the paper's), and
``kd``, knowledge distillation from the float model: the KL divergence of the quantized model's
next-token distribution from the float model's, position by position. The float model is the
same model with its quantizers switched off (the weights are shared and frozen), so the teacher
costs one forward pass without gradients and no memory for a second copy. Distillation asks the
quantized model to keep the float model's predictions, not to fit the training text, so what it
learns holds on text the scales never saw."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.modules import quant_linears, quant_mode, scale_parameters


@dataclass
class TrainReport:
    steps: int
    tokens: int
    trainable_parameters: int
    wall_s: float
    peak_rss_mb: float
    losses: list[float] = field(default_factory=list)
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated, when training ran on a GPU

    def summary(self) -> dict:
        first = self.losses[0] if self.losses else None
        last = sum(self.losses[-10:]) / len(self.losses[-10:]) if self.losses else None
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "trainable_parameters": self.trainable_parameters,
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            **({"peak_gpu_mb": round(self.peak_gpu_mb, 1)} if self.peak_gpu_mb is not None else {}),
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


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    return 1.0


StepCallback = Callable[[int, nn.Module], None]


def train_scales(model: nn.Module, windows: torch.Tensor, config: QuantConfig, *, progress: bool = True,
                 on_step: StepCallback | None = None) -> TrainReport:
    """Train the activation scales of a calibrated model for ``config.train_steps`` steps.

    ``windows``: ``(N, T)`` token ids from the training text (never the test split). Each step
    draws ``config.batch_size`` windows with a generator seeded by ``config.seed``.
    ``on_step(step, model)`` runs after each optimizer step (1-based), e.g. to evaluate.
    """
    if any(m.act_quant.mode != "fake" for _, m in quant_linears(model)):
        raise ConfigError("quantizers are not in fake-quant mode: run calibrate() before train_scales()")
    params = freeze_all_but_scales(model)
    try:
        return train_loop(model, windows, config, [{"params": params, "lr": config.lr}], progress=progress,
                          on_step=on_step, desc="train scales")
    finally:
        for p in params:
            p.requires_grad_(False)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student) for logits ``(..., V)``, in float32.

    Positions are taken ``chunk`` at a time, each under activation checkpointing, so the float32
    log-softmax intermediates of a large vocabulary stay bounded by one chunk (``chunk x V``)
    whatever the sequence length."""
    s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]).detach()
    total = student.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        total = total + checkpoint(_kl_sum, s[i:i + chunk], t[i:i + chunk], use_reentrant=False)
    return total / s.shape[0]


def _kl_sum(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    log_t = F.log_softmax(t.float(), dim=-1)
    return (log_t.exp() * (log_t - F.log_softmax(s.float(), dim=-1))).sum()


def step_loss(model: nn.Module, ids: torch.Tensor, objective: str) -> torch.Tensor:
    """The training loss of one batch ``(B, T)`` under ``objective`` (``ce`` or ``kd``)."""
    if objective == "ce":
        return model(input_ids=ids, labels=ids).loss
    with torch.no_grad(), quant_mode(model, "float"):
        teacher = model(input_ids=ids).logits  # the float model: same weights, quantizers off
    return kd_loss(model(input_ids=ids).logits, teacher)


def train_loop(model: nn.Module, windows: torch.Tensor, config: QuantConfig, groups: list[dict], *, progress: bool = True,
               on_step: StepCallback | None = None, desc: str = "train") -> TrainReport:
    """Adam over the parameter ``groups`` for ``config.train_steps`` steps of next-token loss on
    ``windows`` (``config.batch_size`` windows a step, drawn with a generator seeded by
    ``config.seed``; ``config.lr_schedule`` scales every group's learning rate)."""
    trainable = sum(p.numel() for g in groups for p in g["params"])
    report = TrainReport(0, 0, trainable, 0.0, 0.0)
    if config.train_steps == 0:
        return report
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    was_training = model.training
    model.eval()  # no dropout: the loss sees the deployed computation
    start = time.perf_counter()
    bar = tqdm(range(config.train_steps), desc=desc, unit="step", disable=not progress)
    try:
        for step in bar:
            for g, lr in zip(opt.param_groups, base, strict=True):
                g["lr"] = lr * lr_factor(config.lr_schedule, step, config.train_steps)
            idx = torch.randint(0, windows.shape[0], (config.batch_size,), generator=gen)
            ids = windows[idx].to(device)  # (B, T)
            loss = step_loss(model, ids, config.objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report.losses.append(loss.item())
            report.steps += 1
            report.tokens += ids.numel()
            bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
            if on_step is not None:
                on_step(report.steps, model)
    finally:
        model.train(was_training)
    report.wall_s = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    if cuda:
        report.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return report
