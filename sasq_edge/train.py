"""Scale training: gradient descent on the activation quantization scales alone, through fake
quantization with the straight-through estimator (SASQ section 3).

Two objectives: ``ce``, the next-token cross-entropy on the training text (the paper's), and
``kd``, knowledge distillation from the float model: the KL divergence of the quantized model's
next-token distribution from the float model's, position by position. The float model is the
same model with its quantizers switched off (the weights are shared and frozen), so the teacher
costs one forward pass without gradients and no memory for a second copy. Distillation asks the
quantized model to keep the float model's predictions, not to fit the training text, so what it
learns holds on text the scales never saw.

Data parallel (``sasq_edge.distributed``): under ``accelerate launch`` / ``torchrun`` each rank
trains on its own ``batch_size`` of the ``batch_size x world`` windows drawn each step (the same
draw on every rank, so one process with the whole global batch sees the same windows), and the
gradients are averaged over the ranks before the optimizer step. LSQ's gradient scale
``1 / sqrt(N Q_P)`` counts the elements of one rank's batch; the averaged step-size gradients are
divided by ``sqrt(world)`` so that it counts the global batch's, as one process would.

Activation checkpointing (``gradient_checkpointing=True``) keeps only each decoder block's input
during the forward pass and recomputes the block in the backward pass: the same numbers, with the
activations of one block in memory instead of all of them."""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from sasq_edge.config import QuantConfig
from sasq_edge.distributed import SINGLE, Group
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
    """Peak resident set size of this process image so far, in MiB: ``VmHWM`` of
    ``/proc/self/status`` (``ru_maxrss`` would carry the peak of a large parent that forked this
    process across exec); ``ru_maxrss`` where there is no ``/proc``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
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
                 on_step: StepCallback | None = None, group: Group = SINGLE,
                 gradient_checkpointing: bool = False) -> TrainReport:
    """Train the activation scales of a calibrated model for ``config.train_steps`` steps.

    ``windows``: ``(N, T)`` token ids from the training text (never the test split). Each step
    draws ``config.batch_size`` windows per rank of ``group`` with a generator seeded by
    ``config.seed`` (``train_loop``). ``on_step(step, model)`` runs after each optimizer step
    (1-based), e.g. to evaluate. ``gradient_checkpointing`` recomputes each decoder block in the
    backward pass instead of keeping its activations.
    """
    if any(m.act_quant.mode != "fake" for _, m in quant_linears(model)):
        raise ConfigError("quantizers are not in fake-quant mode: run calibrate() before train_scales()")
    params = freeze_all_but_scales(model)
    try:
        return train_loop(model, windows, config, [{"params": params, "lr": config.lr}], progress=progress,
                          on_step=on_step, desc="train scales", group=group, gradient_checkpointing=gradient_checkpointing)
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
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    with torch.no_grad(), quant_mode(model, "float"):
        teacher = model(input_ids=ids, use_cache=False).logits  # the float model: same weights, quantizers off
    return kd_loss(model(input_ids=ids, use_cache=False).logits, teacher)


def step_indices(gen: torch.Generator, windows: int, batch: int, group: Group = SINGLE) -> torch.Tensor:
    """The windows this rank trains on at one step: ``batch * world`` indices drawn uniformly
    (with replacement) by ``gen``, the same on every rank, of which rank ``r`` takes the ``r``-th
    run of ``batch``. One process with batch ``batch * world`` takes them all."""
    idx = torch.randint(0, windows, (batch * group.world,), generator=gen)
    return idx[group.rank_slice(batch)]


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing of every decoder block, through transformers' own mechanism
    (``activation_checkpointing_enable``, non-reentrant ``torch.utils.checkpoint``), switched off
    again on the way out. transformers checkpoints a block only while the block is in training
    mode, and scale training runs the model in eval mode (no dropout), so only the blocks' own
    ``training`` flag is set, never their children's: dropout stays off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support activation checkpointing: drop --gradient-checkpointing")
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no checkpointable decoder blocks: drop --gradient-checkpointing")
    model.activation_checkpointing_enable({"use_reentrant": False})
    flags = [b.training for b in blocks]
    try:
        for b in blocks:
            b.training = True  # the block's flag alone: its submodules (dropout) stay in eval mode
        yield
    finally:
        for b, flag in zip(blocks, flags, strict=True):
            b.training = flag
        model.activation_checkpointing_disable()


def _average_gradients(params: list[nn.Parameter], loss: torch.Tensor, lsq: set[int], group: Group) -> float:
    """Average the gradients of ``params`` and the loss over the ranks (one collective); divide
    the step-size gradients (``lsq``: ids of the ``log_scale`` parameters) by ``sqrt(world)``,
    so that LSQ's gradient scale counts the global batch. Returns the mean loss."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    mean_loss = loss.detach().float().reshape(1)
    group.mean_([*(p.grad for p in params), mean_loss])
    for p in params:
        if id(p) in lsq:
            p.grad.div_(math.sqrt(group.world))
    return float(mean_loss)


def train_loop(model: nn.Module, windows: torch.Tensor, config: QuantConfig, groups: list[dict], *, progress: bool = True,
               on_step: StepCallback | None = None, desc: str = "train", group: Group = SINGLE,
               gradient_checkpointing: bool = False) -> TrainReport:
    """Adam over the parameter ``groups`` for ``config.train_steps`` steps of next-token loss on
    ``windows`` (``config.batch_size`` windows a step on each rank of ``group``, drawn by
    ``step_indices`` with a generator seeded by ``config.seed``; ``config.lr_schedule`` scales
    every group's learning rate). With more than one rank the gradients are averaged before each
    step; the report's losses are the global batch's and its tokens the global count."""
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
    params = [p for g in opt.param_groups for p in g["params"]]
    lsq = {id(m.act_quant.log_scale) for _, m in quant_linears(model)}
    was_training = model.training
    model.eval()  # no dropout: the loss sees the deployed computation
    start = time.perf_counter()
    bar = tqdm(range(config.train_steps), desc=desc, unit="step", disable=not (progress and group.is_main))
    try:
        with checkpointed_blocks(model) if gradient_checkpointing else contextlib.nullcontext():
            for step in bar:
                for g, lr in zip(opt.param_groups, base, strict=True):
                    g["lr"] = lr * lr_factor(config.lr_schedule, step, config.train_steps)
                ids = windows[step_indices(gen, windows.shape[0], config.batch_size, group)].to(device)  # (B, T)
                loss = step_loss(model, ids, config.objective)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                mean_loss = _average_gradients(params, loss, lsq, group) if group.world > 1 else loss.item()
                opt.step()
                report.losses.append(mean_loss)
                report.steps += 1
                report.tokens += ids.numel() * group.world
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
