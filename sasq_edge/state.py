"""The method's side of the ``ScaleState`` (whose format lives in ``runtime.state``): reading the
state off a trained model, and applying a state to a freshly loaded one."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.state import ScaleState, weights_digest
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError, SasqError, StateError
from sasq_edge.modules import QuantLinear, prepare, quant_linears, set_mode

# config keys that describe how a model was saved or loaded, not what it computes
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "architectures"}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's architecture config (volatile and private keys dropped)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def quant_config(state: ScaleState) -> QuantConfig:
    """The method's config the state was trained with (its ``method`` recipe)."""
    try:
        return QuantConfig.from_dict({**state.method, "profile": state.profile})
    except (SasqError, TypeError) as e:
        raise StateError(f"the scale state's method recipe is not valid here ({e}): retrain the scales") from None


def digest_entry(name: str, layer: nn.Module) -> tuple[str, np.ndarray, np.ndarray]:
    """A prepared layer's entry of ``runtime.state.weights_digest``: its name, frozen INT8 codes and
    row scales (made by ``runtime.grids.encode_weight``), copied to the CPU."""
    return name, layer.weight_int.detach().cpu().numpy().copy(), layer.weight_scale.detach().cpu().numpy().copy()


def weights_of(model: nn.Module) -> str:
    """``runtime.state.weights_digest`` of a prepared model's frozen INT8 weights."""
    return weights_digest(digest_entry(name, m) for name, m in quant_linears(model))


def state_from_model(model: nn.Module, config: QuantConfig, model_source: str, *,
                     smooth: dict[str, torch.Tensor] | None = None, training: dict[str, Any] | None = None) -> ScaleState:
    """The scales of a calibrated (and trained) model as a ``ScaleState``. ``smooth``: the total
    smoothing factors folded into its weights (``run_sasq`` returns them)."""
    if config.smooth_alpha == "auto":
        raise ConfigError("smooth_alpha='auto' must be resolved before the state is written: run_sasq does it")
    scales, trunc = {}, {}
    for name, m in quant_linears(model):
        scales[name] = float(m.act_quant.scale)
        if m.act_quant.trunc is not None:
            trunc[name] = float(m.act_quant.trunc)
    factors = {k: v.detach().float().cpu().numpy() for k, v in (smooth or {}).items()}
    if bool(factors) != (config.smooth_alpha is not None):
        raise ConfigError("smooth_alpha is set but no smoothing factors were given (or the other way round)")
    return ScaleState(config.profile, scales, model_fingerprint(model), model_source, trunc, factors, config.embedding,
                      config.to_dict(), dict(training or {}), weights_of(model), rotation=rotation_of(model))


def rotation_of(model: nn.Module) -> dict[str, int]:
    """Module -> Hadamard block of every quantized linear of a prepared model whose input is rotated."""
    return {name: m.rotation for name, m in quant_linears(model) if m.rotation > 1}


def apply_state(model: nn.Module, state: ScaleState) -> nn.Module:
    """Fold the state's smoothing factors into a freshly loaded ``model``, prepare it with the
    state's config and load the scales; the quantizers end in fake-quant mode. Fails if the
    model is not the one trained on."""
    from sasq_edge.smooth import fold_factors

    fp = model_fingerprint(model)
    if fp != state.fingerprint:
        raise StateError(
            f"scales were trained on a different model (fingerprint {state.fingerprint}, this model {fp}, "
            f"trained on {state.model_source!r}): train scales for this model with sasq-train"
        )
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise StateError("the model is already prepared: apply the state to a freshly loaded model")
    config = quant_config(state)
    if bool(state.smooth) != (config.smooth_alpha is not None):
        raise StateError("the recipe's smooth_alpha and the stored smoothing factors disagree: retrain the scales")
    # scales trained on bf16 weights (sasq-train --dtype bf16): fold and encode in bf16 as training
    # did, so the INT8 codes are the trained ones; a float32 model returns to float32 after (exact)
    dtype = next(model.parameters()).dtype
    trained_in = getattr(torch, str(state.training.get("weights_dtype", "float32")), dtype)
    model.to(trained_in)
    if state.smooth:
        try:
            fold_factors(model, {k: torch.from_numpy(v) for k, v in state.smooth.items()})
        except ConfigError as e:
            raise StateError(str(e)) from None
    prepare(model, config)
    if dtype == torch.float32:  # back to float32 (exact); never a narrower dtype over the float32 quantizers
        model.to(dtype)
    modules = dict(quant_linears(model))
    if set(modules) != set(state.scales):
        diff = sorted(set(modules) ^ set(state.scales))
        raise StateError(f"scale state and model disagree on quantized modules (e.g. {diff[0]}): retrain the scales")
    if rotation_of(model) != state.rotation:
        raise StateError("the recipe's rotate_block and the stored rotations disagree: the folder is damaged, retrain the scales")
    for name, m in modules.items():
        m.act_quant.set_scale(state.scales[name], state.truncation.get(name))
    set_mode(model, "fake")
    if state.weights is not None and weights_of(model) != state.weights:
        raise StateError("this model's weights give other INT8 weights than the ones the scales were trained with "
                         f"(same architecture, other checkpoint than {state.model_source!r}?): retrain the scales")
    return model


def load_state(run_dir) -> ScaleState:
    """``ScaleState.load`` plus the method's check of its recipe: a misspelt or invalid key in the
    recipe fails here, before any model is loaded."""
    state = ScaleState.load(run_dir)
    quant_config(state)
    return state
