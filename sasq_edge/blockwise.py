"""Block-wise scale training: SASQ one decoder block at a time, so that every model size gets
trained scales, not only the models whose float copy and activations fit in memory whole.

The calibration windows' hidden states are captured at the first block's input, then for each
block in turn (BRECQ, Li et al. 2021, and OmniQuant, Shao et al. 2024, reconstruct block by
block; AutoRound, Cheng et al. 2024, feeds each block the quantized model's own outputs):

1. the float block maps the float stream to the target ``y = block(x_fp)``;
2. SmoothQuant factors are computed from the channel maxima of the float block's inputs, with
   one strength for the model (``smooth_alpha="auto"``: ``search_alpha`` picks it first, in one
   sweep over the blocks, by the KL of the output distribution on one window);
3. the block's linears are swapped for ``QuantLinear`` (the rotation as everywhere) and their
   activation scales initialised (``config.calibration``) on the *quantized* stream ``x_q``;
4. the activation scales (and, with ``smooth_learn``, the smoothing factors on top) train by
   Adam through fake quantization for ``config.block_steps`` steps of ``config.batch_size``
   windows, on the relative squared error ``|block_q(x_q) - y|^2 / |y|^2``; every weight stays
   frozen;
5. where the trained block's error on the report windows ends above the calibrated one's, the
   calibrated start is kept; learned factors fold into the weights, and the streams move on: ``x_fp <- y``,
   ``x_q <- block_q(x_q)``, so later blocks learn to absorb the errors of earlier ones.

One block is in memory at a time when the blocks come from a ``LayerwiseModel`` (read from the
checkpoint and emptied again); a whole model in memory runs the same code and ends prepared, as
``apply_state`` rebuilds it from the returned state, bit for bit. What the streams hold is three
``(windows, T, hidden)`` float32 tensors.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from runtime.families import arch_spec
from runtime.state import ScaleState, weights_digest
from sasq_edge.calibrate import make_observer, observing, set_observed
from sasq_edge.config import AUTO_ALPHA, QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.modules import QuantEmbedding, QuantLinear, prepare_block, set_mode
from sasq_edge.smooth import (
    attach_learnable,
    fold_factors,
    fold_learnable,
    recording_absmax,
    smooth_groups,
    smoothquant_factors,
    snapshot_keys,
)
from sasq_edge.state import digest_entry
from sasq_edge.train import lr_factor, peak_rss_mb

# the strengths "auto" tries (each costs two forward passes of every block on the search window):
# SmolLM2-135M's held-out perplexity is best at 0.7 and worse by 3 % at 0.5 and 1.0 (the end-to-end
# search over 0.3..1.0, bench/results/blockwise.md)
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SEARCH_WINDOWS = 1  # windows the strength search runs on (absmax PTQ per strength, one sweep over the blocks)
REPORT_WINDOWS = 2  # windows the per-block reconstruction error before and after training is measured on


class BlockSource(Protocol):
    """Where the blocks come from: a whole model in memory (``WholeModel``) or one read from its
    checkpoint a piece at a time (``sasq_edge.layerwise.LayerwiseModel``)."""

    model: nn.Module
    blocks: str

    def load(self, piece: str) -> nn.Module: ...

    def release(self, piece: str) -> None: ...


class WholeModel:
    """A model already in memory, as a ``BlockSource``: loading and releasing do nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks = arch_spec(model.config.model_type).blocks

    def load(self, piece: str) -> nn.Module:
        return self.model.get_submodule(piece)

    def release(self, piece: str) -> None:
        pass


@dataclass
class BlockRecord:
    """What one block's pass measured: the relative reconstruction error (on ``REPORT_WINDOWS``
    windows of the quantized stream against the float target) after calibration and after
    training, the smoothing strength and the seconds it took."""

    index: int
    ptq_error: float
    trained_error: float
    alpha: float | None
    seconds: float
    losses: list[float] = field(default_factory=list)
    kept: bool = True  # the trained scales were kept (False: training ended worse, the calibrated ones stayed)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: target, calibrate, train, propagate

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.index, "ptq_error": self.ptq_error, "trained_error": self.trained_error, "alpha": self.alpha,
                "seconds": round(self.seconds, 2), "kept": self.kept,
                "phases": {k: round(v, 2) for k, v in self.phases.items()}, "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None}


@dataclass
class BlockwiseResult:
    """The state the pass wrote, the total smoothing factors folded (torch, for a whole model that
    trains on), and one record a block."""

    state: ScaleState
    factors: dict[str, torch.Tensor]
    blocks: list[BlockRecord]
    wall_s: float
    peak_rss_mb: float

    def summary(self) -> dict[str, Any]:
        ptq = [b.ptq_error for b in self.blocks]
        trained = [b.trained_error for b in self.blocks]
        return {"blocks": len(self.blocks), "wall_s": round(self.wall_s, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "block_error_ptq_mean": float(np.mean(ptq)), "block_error_trained_mean": float(np.mean(trained)),
                "per_block": [b.to_dict() for b in self.blocks]}


class _Catcher(nn.Module):
    """Stands in for a decoder block during the capture pass: records the arguments the model
    gives the block and hands the hidden states on unchanged."""

    def __init__(self, block: nn.Module, calls: list) -> None:
        super().__init__()
        self.calls = calls
        for attr in ("attention_type", "layer_idx", "is_sliding"):  # what a model's forward may read off its blocks
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


def _quiet(kwargs: dict) -> dict:
    """The block's keyword arguments for a forward pass without a KV cache."""
    out = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def capture(source: BlockSource, windows: np.ndarray, embedding: str = "float",
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[tuple[tuple, dict]]]:
    """Run the model's stem on ``windows`` ``(n, T)`` with every block replaced by a catcher:
    ``(x_fp, x_q, calls)``, the first block's input ``(n, T, hidden)`` with the float embedding
    and with the deployed one (the same tensor unless ``embedding == "int8"``), and each block's
    positional and keyword arguments (from the first window: every window has the same length
    and no padding, so they hold for all of them and broadcast over a batch)."""
    model = source.model
    if not isinstance(source, WholeModel):
        source.stem()  # type: ignore[attr-defined]  # embedding, rotary tables and final norm, read from the checkpoint
    blocks = model.get_submodule(source.blocks)
    originals = list(blocks)
    calls: list[list] = [[] for _ in originals]
    emb = model.get_input_embeddings()
    stems = [("float", emb)] + ([("int8", QuantEmbedding(emb, _embedding_grid()))] if embedding == "int8" else [])
    streams = []
    try:
        for i in range(len(blocks)):
            blocks[i] = _Catcher(originals[i], calls[i])
        for kind, stem in stems:
            if kind == "int8":
                stem.set_mode("fake")
            model.set_input_embeddings(stem)
            xs = []
            for j in tqdm(range(windows.shape[0]), desc=f"capture block inputs ({kind} embedding)", unit="window",
                          disable=not progress, leave=False):
                for c in calls:
                    c.clear()
                model.get_submodule(source.blocks.rpartition(".")[0])(
                    input_ids=torch.from_numpy(np.ascontiguousarray(windows[j:j + 1])), use_cache=False)
                xs.append(calls[0][0][0].float())
            streams.append(torch.cat(xs))
    finally:
        model.set_input_embeddings(emb)
        for i, block in enumerate(originals):
            blocks[i] = block
    per_block = [(args, _quiet(kwargs)) for (_h, args, kwargs) in (c[0] for c in calls)]
    return streams[0], streams[-1], per_block


def _embedding_grid():
    from runtime.grids import EMBEDDING_GRID

    return EMBEDDING_GRID


def _run(block: nn.Module, x: torch.Tensor, call: tuple[tuple, dict], *, chunk: int = 1) -> torch.Tensor:
    """The block on every window of ``x`` ``(n, T, H)``, ``chunk`` windows at a time."""
    return torch.cat([_forward(block, x[i:i + chunk], call) for i in range(0, x.shape[0], chunk)]) if x.shape[0] else x


def _forward(block: nn.Module, x: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = block(x, *args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


def relative_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|y - target|^2 / |target|^2``: the block's reconstruction loss and the number reported.
    Measured against the alternatives on SmolLM2 (bench/results/blockwise.md): each token's error
    after RMS normalisation, and the error of the block's increment ``y - x`` alone, both gave a
    higher perplexity."""
    return (y.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)


@torch.no_grad()
def _calibrate_block(model: nn.Module, block: nn.Module, names: list[str], config: QuantConfig, x: torch.Tensor,
                     call: tuple[tuple, dict], calibration: str | None = None) -> dict[str, float]:
    """Initialise the activation scales of the block's ``names`` (already ``QuantLinear``) from
    the float block's inputs on ``x``, one window at a time as ``calibrate`` does; the block ends
    in fake-quant mode."""
    cfg = config if calibration is None else dataclasses.replace(config, calibration=calibration)
    layers = {name: model.get_submodule(name) for name in names}
    set_mode(block, "float")
    with observing(layers, cfg) as observers:
        for j in range(x.shape[0]):
            _forward(block, x[j:j + 1], call)
    scales = set_observed(layers, observers)
    set_mode(block, "fake")
    return scales


@torch.no_grad()
def _float_pass(model: nn.Module, block: nn.Module, groups: dict, x: torch.Tensor,
                call: tuple[tuple, dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The float block on every window of ``x`` (the float stream): its output, the target, and
    the per-input-channel ``max |x|`` of each smoothing group's input (SmoothQuant's statistic,
    read off the float model's own activations on the way)."""
    with recording_absmax(model, groups) as stats:
        y = _run(block, x, call)
    return y, stats


def _unswap(model: nn.Module, swapped: dict[str, nn.Linear]) -> None:
    """Put the block's original ``nn.Linear`` modules back (they share the weights)."""
    for name, linear in swapped.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, linear)


@torch.no_grad()
def search_alpha(source: BlockSource, config: QuantConfig, x0: torch.Tensor, calls: list[tuple[tuple, dict]],
                 n_blocks: int, alphas: tuple[float, ...] = ALPHAS, progress: bool = True) -> tuple[float, dict[float, float]]:
    """SmoothQuant's strength for the whole model, found in one sweep over the blocks (each read
    once): the search window ``x0`` ``(1, T, H)`` goes through the float blocks and, for each
    strength, through its own copy of the model smoothed with it and calibrated with absmax (the
    factors from this window's float activations); at the end the final norm and the output head
    turn each stream into next-token distributions, and the strength whose distribution is
    closest to the float model's (mean KL over the window's tokens) wins. A block's own
    reconstruction error is no guide here: the residual stream it is measured on is dominated by a
    few massive channels (measured on SmolLM2: per-block choices gave 1.6 % worse WikiText-2
    perplexity than one strength for all, bench/results/blockwise.md)."""
    import torch.nn.functional as F

    model = source.model
    spec = arch_spec(model.config.model_type)
    streams = {a: x0.clone() for a in alphas}
    xf = x0.clone()
    for i in tqdm(range(n_blocks), desc="smoothing strength, block by block", unit="block", disable=not progress, leave=False):
        piece = f"{source.blocks}.{i}"
        block = source.load(piece)
        block.eval()
        call = calls[i]
        groups = {k: g for k, g in smooth_groups(model, config.targets).items() if k.startswith(piece + ".")} \
            if spec.smooth else {}
        y, stats = _float_pass(model, block, groups, xf, call)
        originals = snapshot_keys(model, groups)
        for a in alphas:
            fold_factors(model, smoothquant_factors(model, groups, stats, a))
            swapped = prepare_block(model, piece, config)
            try:
                _calibrate_block(model, block, list(swapped), config, streams[a], call, calibration="absmax")
                streams[a] = _run(block, streams[a], call)
            finally:
                _unswap(model, swapped)
                for name, value in originals.items():
                    model.get_parameter(name).copy_(value)
        xf = y
        source.release(piece)
    head_name = _head_name(source)
    _load_head(source)
    head = model.get_submodule(head_name)
    norm = model.get_submodule(source.blocks.rpartition(".")[0]).norm
    ref = F.log_softmax(head(norm(xf)).float(), dim=-1)  # (1, T, V)
    kl = {}
    for a, x in streams.items():
        logp = F.log_softmax(head(norm(x)).float(), dim=-1)
        kl[a] = float((ref.exp() * (ref - logp)).sum(-1).mean())
    if not isinstance(source, WholeModel):
        source.release(head_name)
    finite = {a: v for a, v in kl.items() if math.isfinite(v)}
    if not finite:
        raise ConfigError("every smoothing strength gave a non-finite output: check the model and the data")
    return min(finite, key=finite.get), kl


def _train_block(block: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                 call: tuple[tuple, dict], config: QuantConfig, seed: int) -> list[float]:
    """Adam on ``params`` for ``config.block_steps`` steps of ``config.batch_size`` windows drawn
    from ``x`` with a generator seeded by ``seed``: the relative error against ``y``."""
    if not config.block_steps or not params:
        return []
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for step in range(config.block_steps):
            opt.param_groups[0]["lr"] = config.lr * lr_factor(config.lr_schedule, step, config.block_steps)
            idx = torch.randint(0, x.shape[0], (config.batch_size,), generator=gen)
            loss = relative_error(_forward(block, x[idx], call), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return losses


@torch.no_grad()
def _head(model: nn.Module, config: QuantConfig, x: torch.Tensor, source: Any, head_name: str) -> QuantLinear:
    """Swap the output head for a ``QuantLinear`` calibrated on the final norm of ``x``."""
    head = model.get_submodule(head_name)
    q = QuantLinear(head, config.deploy.act, config.deploy.weight, config.truncation)
    parent, _, leaf = head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, q)
    obs = make_observer(config, config.deploy.act)
    norm = model.get_submodule(source.blocks.rpartition(".")[0]).norm
    for j in range(x.shape[0]):  # the observer fed directly: running the head itself would cost a vocabulary's matmul
        obs.update(norm(x[j:j + 1]).float())
    set_observed({head_name: q}, {head_name: obs})
    q.act_quant.set_mode("fake")
    return q


BlockCallback = Callable[[BlockRecord, int], None]


def train_blockwise(source: BlockSource, config: QuantConfig, windows: np.ndarray, model_source: str, *,
                    progress: bool = True, on_block: BlockCallback | None = None,
                    training: dict[str, Any] | None = None, max_blocks: int | None = None) -> BlockwiseResult:
    """The block-wise pass (module docstring) over the calibration ``windows`` ``(n, T)``; returns
    the state. With a ``WholeModel`` the model ends prepared, smoothed and calibrated, what
    ``apply_state`` makes of the state. ``on_block(record, total)`` runs after each block (the
    command line prints progress from it). ``training`` is merged into the state's record.
    ``max_blocks`` stops after that many blocks (time and memory measurements of big shapes: the
    state then covers those blocks only)."""
    from sasq_edge.state import model_fingerprint

    if config.train_steps and not isinstance(source, WholeModel):
        raise ConfigError("the end-to-end pass after the block-wise one needs the whole model in memory: train_steps=0 here")
    start = time.perf_counter()
    model = source.model
    spec = arch_spec(model.config.model_type)
    n_blocks = len(model.get_submodule(source.blocks))
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    x_fp, x_q, calls = capture(source, windows, config.embedding, progress=progress)
    _release_stem(source)
    search_kl = None
    if config.smooth_alpha == AUTO_ALPHA and spec.smooth:
        alpha, search_kl = search_alpha(source, config, x_q[:SEARCH_WINDOWS], calls, n_blocks, progress=progress)
        config = dataclasses.replace(config, smooth_alpha=alpha)
    report = slice(0, min(REPORT_WINDOWS, x_q.shape[0]))
    calib = _calib_index(x_q.shape[0], config)
    scales, trunc, factors, rotation, digest, records = {}, {}, {}, {}, [], []
    bar = tqdm(total=n_blocks, desc="train block by block", unit="block", disable=not progress)
    try:
        for i in range(n_blocks):
            t0 = time.perf_counter()
            piece = f"{source.blocks}.{i}"
            block = source.load(piece)
            block.eval()
            call = calls[i]
            groups = {k: g for k, g in smooth_groups(model, config.targets).items() if k.startswith(piece + ".")} \
                if config.smooth_alpha is not None and spec.smooth else {}
            clock = _Clock()
            y, stats = _float_pass(model, block, groups, x_fp, call)  # the float target, from the float stream
            clock("target")
            alpha = None
            block_factors: dict[str, torch.Tensor] = {}
            originals: dict[str, torch.Tensor] = {}
            if groups:
                alpha = config.smooth_alpha
                originals = snapshot_keys(model, groups) if config.smooth_learn else {}
                block_factors = smoothquant_factors(model, groups, stats, float(alpha))
                fold_factors(model, block_factors)
            swapped = prepare_block(model, piece, config)
            names = list(swapped)
            _calibrate_block(model, block, names, config, x_q[calib], call)
            with torch.no_grad():
                ptq_error = float(relative_error(_run(block, x_q[report], call), y[report]))
            clock("calibrate")
            if config.smooth_learn and block_factors:
                attach_learnable(model, block_factors)
            params = [p for n in names for p in _trainable(model.get_submodule(n))]
            params = list({id(p): p for p in params}.values())
            initial = [p.detach().clone() for p in params]
            losses = _train_block(block, params, x_q, y, call, config, config.seed + i)
            kept = True
            if losses:
                with torch.no_grad():
                    kept = float(relative_error(_run(block, x_q[report], call), y[report])) <= ptq_error
                    if not kept:  # training ended worse than it started on the report windows: keep the calibrated start
                        for p, v in zip(params, initial, strict=True):
                            p.copy_(v)
            if config.smooth_learn and block_factors:
                block_factors = fold_learnable(model, block_factors, originals)
            clock("train")
            with torch.no_grad():
                x_next = _run(block, x_q, call)  # the quantized stream moves on
                trained_error = float(relative_error(x_next[report], y[report]))
            clock("propagate")
            for name in names:
                q = model.get_submodule(name)
                scales[name] = float(q.act_quant.scale)
                if q.act_quant.trunc is not None:
                    trunc[name] = float(q.act_quant.trunc)
                if q.rotation > 1:
                    rotation[name] = q.rotation
                digest.append(digest_entry(name, q))
            factors.update({k: v.detach().float().cpu() for k, v in block_factors.items()})
            x_fp, x_q = y, x_next
            source.release(piece)
            rec = BlockRecord(i, ptq_error, trained_error, None if alpha is None else float(alpha), time.perf_counter() - t0,
                              losses, kept, clock.phases)
            records.append(rec)
            bar.update(1)
            bar.set_postfix(error=f"{trained_error:.2e}", ptq=f"{ptq_error:.2e}")
            if on_block is not None:
                on_block(rec, n_blocks)
        if config.lm_head and n_blocks == len(model.get_submodule(source.blocks)):
            name, head_x = _head_name(source), x_q
            _load_head(source)
            q = _head(model, config, head_x, source, name)
            scales[name] = float(q.act_quant.scale)
            if q.act_quant.trunc is not None:
                trunc[name] = float(q.act_quant.trunc)
            digest.append(digest_entry(name, q))
    finally:
        bar.close()
    wall = time.perf_counter() - start
    record = {**(training or {}), "blockwise": {
        "blocks": n_blocks, "steps_per_block": config.block_steps, "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]), "calib_windows": int(len(calib)), "batch_size": config.batch_size,
        "alpha_search": None if search_kl is None else {str(a): v for a, v in search_kl.items()},
        "wall_s": round(wall, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "error_ptq_mean": float(np.mean([b.ptq_error for b in records])) if records else None,
        "error_trained_mean": float(np.mean([b.trained_error for b in records])) if records else None,
        "per_block": [b.to_dict() for b in records]}}
    state = ScaleState(config.profile, scales, model_fingerprint(model), model_source, trunc,
                       {k: v.numpy() for k, v in factors.items()}, config.embedding, config.to_dict(), record,
                       weights_digest(digest), rotation=rotation)
    return BlockwiseResult(state, factors, records, wall, peak_rss_mb())


class _Clock:
    """Seconds since the last call, by phase name."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now


def _trainable(q: QuantLinear) -> list[nn.Parameter]:
    return [p for p in (*q.act_quant.trainable(), q.log_smooth) if p is not None]


def _calib_index(n: int, config: QuantConfig) -> np.ndarray:
    """The windows the scales are initialised on: ``config.calib_batches`` of the ``n``, drawn
    with ``config.seed`` (all of them when there are fewer)."""
    if n <= config.calib_batches:
        return np.arange(n)
    return np.sort(np.random.default_rng(config.seed).choice(n, config.calib_batches, replace=False))


def _release_stem(source: BlockSource) -> None:
    """Empty the embedding of a model read piece by piece once the block inputs are captured
    (an untied head is read again when it is quantized)."""
    if isinstance(source, WholeModel):
        return
    emb = source.model.get_input_embeddings()
    name = next(n for n, m in source.model.named_modules() if m is emb)
    source.release(name)


def _head_name(source: BlockSource) -> str:
    head = source.model.get_output_embeddings()
    return next(n for n, m in source.model.named_modules() if m is head)


def _load_head(source: BlockSource) -> None:
    if not isinstance(source, WholeModel):
        source.head()  # type: ignore[attr-defined]
