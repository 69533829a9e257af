"""Per-channel activation factors folded into the preceding operation (SmoothQuant-style).

For each group of linears that read one operation's output (``SmoothGroup`` in ``arch``), a
factor ``s_j`` per input channel divides the activation and multiplies the weights' input
column: ``(x / s) @ (W * s)^T == x @ W^T``. The division is folded into the preceding RMSNorm
weight or the preceding linear's output rows, so the float model computes the same function
and the deployed graph still has one static scale per activation tensor; only the channel
ranges the per-tensor grid must cover become even. ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``
(Xiao et al., SmoothQuant, ICML 2023, eq. 4).

Row scaling of a preceding linear (``v_proj``, ``up_proj``, or only the rows of a fused
projection that the group reads: Phi-3's value rows of ``qkv_proj``, up half of
``gate_up_proj``) leaves its own per-output-channel weight quantization unchanged, since each
row's scale absorbs the factor. A norm that multiplies by ``1 + w`` (Gemma; ``norm_offset`` in
the registry) absorbs ``1 / s`` as ``w <- (1 + w) / s - 1``.

The factors are returned to the caller (``run_sasq`` puts them in the ``ScaleState``); nothing is
stored on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from runtime.families import SmoothGroup, arch_spec
from runtime.layout import AttentionLayout
from sasq_edge.errors import ConfigError

_EPS = 1e-5


def smooth_groups(model: nn.Module, targets: Iterable[str] | None = None) -> dict[str, SmoothGroup]:
    """``{full name of the preceding op: group}`` for every block, in model order. With
    ``targets`` (leaf names), only groups whose linears are all quantization targets."""
    spec = arch_spec(model.config.model_type)
    if not spec.smooth:
        raise ConfigError(f"no smoothing groups are defined for {model.config.model_type!r}: drop smooth_alpha")
    leaves = set(targets) if targets is not None else None
    out = {}
    for i in range(len(model.get_submodule(spec.blocks))):
        for g in spec.smooth:
            if leaves is None or all(name.rsplit(".", 1)[-1] in leaves for name in g.linears):
                out[f"{spec.blocks}.{i}.{g.prev}"] = g
    return out


def _block(key: str, g: SmoothGroup) -> str:
    return key[: -len(g.prev) - 1]


def _rows(key: str, g: SmoothGroup, outputs: int, factors: int) -> slice:
    """The output rows of the preceding linear ``key`` that the group's linears read."""
    if g.rows == "tail" and factors <= outputs:
        return slice(outputs - factors, outputs)
    if g.rows == "all" and factors == outputs:
        return slice(None)
    raise ConfigError(f"{key} has {outputs} outputs, its smoothing factors {factors}: retrain the scales")


def _per_kv_channel(model: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """Max over the query heads that share each key/value head: ``(H*D,)`` -> ``(KV*D,)``."""
    lay = AttentionLayout.of(model.config)
    return v.view(lay.kv_heads, lay.group, lay.head_dim).amax(dim=1).reshape(-1)


def _kv_index(model: nn.Module, device: torch.device | None = None) -> torch.Tensor:
    """For each query-head channel ``(H*D,)``, the key/value channel it reads."""
    lay = AttentionLayout.of(model.config)
    idx = torch.arange(lay.kv_heads * lay.head_dim, device=device).view(lay.kv_heads, 1, lay.head_dim)
    return idx.expand(lay.kv_heads, lay.group, lay.head_dim).reshape(-1)


def group_input(key: str, g: SmoothGroup) -> str:
    """The full name of the group's first linear: its input is the group's input."""
    return f"{_block(key, g)}.{g.linears[0]}"


@contextlib.contextmanager
def recording_absmax(model: nn.Module, groups: dict[str, SmoothGroup]) -> Iterator[dict[str, torch.Tensor]]:
    """While inside, every forward pass adds to the per-input-channel ``max |x|`` of each group's
    input (the dict it yields, keyed like ``groups``); the hooks are removed on the way out."""
    stats: dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(_m, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            stats[key] = torch.maximum(stats[key], x) if key in stats else x
        return fn

    handles = []
    try:
        for key, g in groups.items():
            handles.append(model.get_submodule(group_input(key, g)).register_forward_pre_hook(hook(key)))
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def channel_absmax(model: nn.Module, batches: Iterable[torch.Tensor], groups: dict[str, SmoothGroup],
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` of each group's input over ``batches`` (float model)."""
    with recording_absmax(model, groups) as stats:
        device = next(model.parameters()).device
        for ids in tqdm(list(batches), desc="smooth stats", unit="batch", disable=not progress):
            model(input_ids=ids.to(device))
    missing = sorted(set(groups) - set(stats))
    if missing:
        raise ConfigError(f"{missing[0]} never ran during calibration: cannot compute its smoothing factors")
    return stats


@torch.no_grad()
def fold_factors(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Fold ``factors`` (keyed by preceding op) into the float weights, in place: the
    preceding op's output is divided by ``s``, the linears' input columns multiplied by it.

    Groups are folded in sorted key order, whatever order ``factors`` has: ``v_proj`` and
    ``up_proj`` are both a consumer of one group and the preceding op of another, and the order
    of their two roundings decides their last bits, so training and a state loaded from disk
    must fold alike."""
    groups = smooth_groups(model)
    offset = arch_spec(model.config.model_type).norm_offset
    for key, s in sorted(factors.items()):
        if key not in groups:
            raise ConfigError(f"smoothing factor for {key!r}, which is no smoothing point of this model: retrain the scales")
        g = groups[key]
        prev = model.get_submodule(key)
        s = s.to(device=prev.weight.device, dtype=torch.float32)
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ConfigError(f"smoothing factors of {key} must be positive and finite: retrain the scales")
        if isinstance(prev, nn.Linear):
            rows = _rows(key, g, prev.weight.shape[0], s.numel())
            prev.weight[rows].div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias[rows].div_(s.to(prev.bias.dtype))
        else:  # RMSNorm-like: output = normalized(x) * (offset + weight)
            if prev.weight.shape != s.shape:
                raise ConfigError(f"{key} has {prev.weight.numel()} channels, its smoothing factors {s.numel()}: retrain the scales")
            w = prev.weight  # offset 0 (x * w): w / s; offset 1 (Gemma's x * (1 + w)): (1 + w) / s - 1
            w.copy_((w + offset) / s.to(w.dtype) - offset)
        cols = s[_kv_index(model, s.device)] if g.heads else s
        for name in g.linears:
            lin = model.get_submodule(f"{_block(key, g)}.{name}")
            lin.weight.mul_(cols[None, :].to(lin.weight.dtype))


@torch.no_grad()
def smooth_model(model: nn.Module, batches: Iterable[torch.Tensor], alpha: float,
                 targets: Iterable[str] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Compute SmoothQuant factors with migration strength ``alpha`` from the float model's
    activations on ``batches``, fold them in, and return them (float32, on the CPU). Smoothing
    comes before ``prepare``: the factors change the float weights the INT8 weights come from."""
    from sasq_edge.modules import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ConfigError("smooth the float model before prepare(): this model is already prepared")
    groups = smooth_groups(model, targets)
    stats = channel_absmax(model, list(batches), groups, progress)
    factors = smoothquant_factors(model, groups, stats, alpha)
    fold_factors(model, factors)
    return factors


@torch.no_grad()
def smoothquant_factors(model: nn.Module, groups: dict[str, SmoothGroup], stats: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` for each group, from the channel maxima
    ``stats`` of its input and its linears' current weights."""
    factors = {}
    for key, g in groups.items():
        block = _block(key, g)
        w = torch.cat([model.get_submodule(f"{block}.{n}").weight.detach().float() for n in g.linears], dim=0)
        w_max = w.abs().amax(dim=0)  # (K,) per input channel
        a_max = stats[key]
        if g.heads:
            w_max, a_max = _per_kv_channel(model, w_max), _per_kv_channel(model, a_max)
        s = a_max.clamp_min(_EPS).pow(alpha) / w_max.clamp_min(_EPS).pow(1.0 - alpha)
        factors[key] = s.clamp_min(_EPS).cpu()
    return factors


def attach_learnable(model: nn.Module, factors: dict[str, torch.Tensor]) -> int:
    """Give every group of a prepared model smoothed by ``factors`` a learnable factor ``r``
    (log-stored, starting at 1) on top: each consumer divides its input by ``r`` and multiplies
    its weight columns by it before quantizing both (weights stay frozen; the INT8 weight is
    re-quantized each pass). ``fold_learnable`` moves ``r`` into the weights. Returns the number
    of factors."""
    from sasq_edge.modules import QuantLinear

    if not factors:
        raise ConfigError("learnable smoothing needs a smoothed model: set smooth_alpha")
    groups = smooth_groups(model)
    count = 0
    for key, s in factors.items():
        g = groups[key]
        device = model.get_submodule(group_input(key, g)).weight.device  # a block of a model read piece by piece
        param = nn.Parameter(torch.zeros_like(s, device=device))
        count += param.numel()
        for name in g.linears:
            lin = model.get_submodule(f"{_block(key, g)}.{name}")
            if not isinstance(lin, QuantLinear):
                raise ConfigError(f"{_block(key, g)}.{name} is not quantized: learnable smoothing needs every linear of the group")
            lin.log_smooth = param
            if g.heads:
                lin.smooth_index = _kv_index(model, device)
    return count


def _touched(model: nn.Module, keys: Iterable[str]) -> dict[str, nn.Parameter]:
    """Every parameter folding factors at ``keys`` changes: the preceding ops' weights (and a
    preceding linear's bias) and the consumers' weights, by name."""
    groups = smooth_groups(model)
    out = {}
    for key in keys:
        g = groups[key]
        prev = model.get_submodule(key)
        out[f"{key}.weight"] = prev.weight
        if isinstance(prev, nn.Linear) and prev.bias is not None:
            out[f"{key}.bias"] = prev.bias
        for name in g.linears:
            out[f"{_block(key, g)}.{name}.weight"] = model.get_submodule(f"{_block(key, g)}.{name}").weight
    return out


@torch.no_grad()
def snapshot(model: nn.Module, targets: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the float parameters smoothing will change (before it does), in their own
    dtype, so that ``fold_learnable`` can fold the final factors into them once."""
    keys = smooth_groups(model, targets)
    return {name: p.detach().cpu().clone() for name, p in _touched(model, keys).items()}


@torch.no_grad()
def snapshot_keys(model: nn.Module, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """``snapshot`` of the groups at ``keys`` only (one block's, in the block-wise pass)."""
    return {name: p.detach().cpu().clone() for name, p in _touched(model, keys).items()}


@torch.no_grad()
def fold_learnable(model: nn.Module, factors: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the learned factors into the weights and detach them. Returns the total factors
    (``factors`` times the learned ones), what the scale state stores.

    The float weights are first put back to ``originals`` (``snapshot`` before smoothing) and the
    total folded into them once, so the model ends bit for bit as ``apply_state`` rebuilds it from
    the state (folding SmoothQuant's factors and then the learned ones would round twice)."""
    from sasq_edge.modules import QuantLinear

    groups = smooth_groups(model)
    total = {k: v.detach().float().cpu().clone() for k, v in factors.items()}
    learned = {}
    for key in total:
        g = groups[key]
        first = model.get_submodule(f"{_block(key, g)}.{g.linears[0]}")
        if isinstance(first, QuantLinear) and first.log_smooth is not None:
            learned[key] = first.log_smooth.detach().exp().float().cpu()
    if not learned:
        return total
    params = _touched(model, total)
    missing = sorted(set(params) - set(originals))
    if missing:
        raise ConfigError(f"no original weights for {missing[0]}: take smooth.snapshot(model) before smoothing")
    for name, p in params.items():
        p.copy_(originals[name])
    for key, r in learned.items():
        total[key] = total[key] * r
    fold_factors(model, total)
    for key in total:
        g = groups[key]
        names = [*g.linears] + ([g.prev] if isinstance(model.get_submodule(key), QuantLinear) else [])
        for name in names:
            lin = model.get_submodule(f"{_block(key, g)}.{name}")
            lin.log_smooth, lin.smooth_index = None, None
            lin.refresh_weight()
    return total
