"""``ScaleState``: the one thing that passes from training to export.

On disk, a run folder holds ``scales.safetensors`` (one float32 scalar per tensor, keyed
``<module>.act_scale`` and, with soft truncation, ``<module>.act_trunc``; with smoothing, one
float32 vector of per-channel factors per preceding op, keyed ``<op>.smooth``) and ``recipe.json``
(format version, config, deploy grids, model fingerprint and source). Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sasq_edge import __version__
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError, SasqError, StateError
from sasq_edge.io import atomic_path, atomic_write_text
from sasq_edge.modules import prepare, quant_linears, set_mode

FORMAT_VERSION = 1
SCALES_FILE = "scales.safetensors"
RECIPE_FILE = "recipe.json"
_SCALE, _TRUNC, _SMOOTH = ".act_scale", ".act_trunc", ".smooth"

# config keys that describe how a model was saved or loaded, not what it computes
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "architectures"}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's architecture config (volatile and private keys dropped)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_value(name: str, v: float) -> None:
    if not (math.isfinite(v) and v > 0):
        raise StateError(f"scale of {name} is {v}: scales must be positive and finite; retrain or recalibrate")


@dataclass
class ScaleState:
    config: QuantConfig
    scales: dict[str, float]
    fingerprint: str
    model_source: str
    truncation: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)  # preceding op -> per-channel factors
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.scales:
            raise StateError("scale state is empty: it holds no quantized module")
        for name, v in {**self.scales, **self.truncation}.items():
            _check_value(name, v)
        for name, t in self.smooth.items():
            if t.ndim != 1 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                raise StateError(f"smoothing factors of {name} must be a vector of positive finite values; retrain the scales")
        if bool(self.smooth) != (self.config.smooth_alpha is not None):
            raise StateError("the recipe's smooth_alpha and the stored smoothing factors disagree: retrain the scales")
        if self.config.truncation == "tanh" and set(self.truncation) != set(self.scales):
            raise StateError("soft-truncation state must hold one range per quantized module")

    # --- model <-> state ----------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, config: QuantConfig, model_source: str, training: dict | None = None) -> ScaleState:
        scales, trunc = {}, {}
        for name, m in quant_linears(model):
            scales[name] = float(m.act_quant.scale)
            if m.act_quant.trunc is not None:
                trunc[name] = float(m.act_quant.trunc)
        smooth = {k: v.detach().float().cpu().clone() for k, v in (getattr(model, "sasq_smooth", None) or {}).items()}
        return cls(config, scales, model_fingerprint(model), model_source, trunc, dict(training or {}), smooth)

    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` with this state's config (if not prepared yet) and load the scales;
        the quantizers end in fake-quant mode. Fails if the model is not the one trained on."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise StateError(
                f"scales were trained on a different model (fingerprint {self.fingerprint}, this model {fp}, "
                f"trained on {self.model_source!r}): train scales for this model with sasq-train"
            )
        if not any(True for _ in quant_linears(model)):
            if getattr(model, "sasq_smooth", None):
                raise StateError("model was smoothed but not prepared: apply the state to a freshly loaded model")
            if self.smooth:
                from sasq_edge.smooth import fold_factors

                try:
                    fold_factors(model, self.smooth)
                except ConfigError as e:
                    raise StateError(str(e)) from None
            prepare(model, self.config)
        else:
            have = getattr(model, "sasq_smooth", None) or {}
            if set(have) != set(self.smooth) or any(not torch.equal(have[k], self.smooth[k]) for k in have):
                raise StateError("the model was prepared with other smoothing factors than this state's: "
                                 "apply the state to a freshly loaded model")
        modules = dict(quant_linears(model))
        if set(modules) != set(self.scales):
            diff = sorted(set(modules) ^ set(self.scales))
            raise StateError(f"scale state and model disagree on quantized modules (e.g. {diff[0]}): retrain the scales")
        for name, m in modules.items():
            if m.act_quant.grid != self.config.deploy.act:
                raise StateError(f"{name} is prepared for another deploy grid than this state's profile "
                                 f"{self.config.profile!r}: apply the state to a freshly loaded model")
            m.act_quant.set_scale(self.scales[name], self.truncation.get(name))
        set_mode(model, "fake")
        return model

    def with_profile(self, profile: str) -> ScaleState:
        """The same scales encoded for ``profile``. Allowed when both profiles put activations and
        weights on the same real-valued grids (only the stored integer type differs, e.g. trt
        and cpu-vnni); a different grid would make the deployed model differ from the trained one."""
        if profile == self.config.profile:
            return self
        new = dataclasses.replace(self.config, profile=profile)
        old_d, new_d = self.config.deploy, new.deploy
        same = (old_d.act.qmin, old_d.act.qmax, old_d.weight.qmin, old_d.weight.qmax) == (
            new_d.act.qmin, new_d.act.qmax, new_d.weight.qmin, new_d.weight.qmax)
        if not same:
            raise StateError(
                f"scales were trained for profile {self.config.profile!r}, whose integer grids differ from {profile!r}'s "
                f"(weights [{old_d.weight.qmin}, {old_d.weight.qmax}] vs [{new_d.weight.qmin}, {new_d.weight.qmax}]): "
                f"retrain with sasq-train --profile {profile}"
            )
        return dataclasses.replace(self, config=new)

    # --- files --------------------------------------------------------------------------------

    def recipe(self) -> dict[str, Any]:
        deploy = self.config.deploy
        return {
            "format": "sasq-scale-state",
            "version": self.version,
            "sasq_version": __version__,
            "config": self.config.to_dict(),
            "deploy": {
                "profile": deploy.name,
                "act": dataclasses.asdict(deploy.act),
                "weight": dataclasses.asdict(deploy.weight),
            },
            "model": {"source": self.model_source, "fingerprint": self.fingerprint},
            "modules": sorted(self.scales),
            "smooth": sorted(self.smooth),
            "training": self.training,
        }

    def save(self, run_dir: str | os.PathLike) -> Path:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n + _SCALE: torch.tensor(v, dtype=torch.float32) for n, v in self.scales.items()}
        tensors.update({n + _TRUNC: torch.tensor(v, dtype=torch.float32) for n, v in self.truncation.items()})
        tensors.update({n + _SMOOTH: v.to(torch.float32).contiguous() for n, v in self.smooth.items()})
        with atomic_path(run_dir / SCALES_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "sasq-scale-state", "version": str(self.version)})
        atomic_write_text(run_dir / RECIPE_FILE, json.dumps(self.recipe(), indent=2) + "\n")
        return run_dir

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> ScaleState:
        run_dir = Path(run_dir)
        recipe_path, scales_path = run_dir / RECIPE_FILE, run_dir / SCALES_FILE
        for p in (recipe_path, scales_path):
            if not p.is_file():
                raise StateError(f"{p} not found: pass the folder written by sasq-train (it holds {RECIPE_FILE} and {SCALES_FILE})")
        try:
            recipe = json.loads(recipe_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StateError(f"{recipe_path} is not valid JSON ({e}): rewrite it with sasq-train") from None
        if not isinstance(recipe, dict) or recipe.get("format") != "sasq-scale-state":
            raise StateError(f"{recipe_path} is not a sasq scale recipe: pass the folder written by sasq-train")
        if recipe.get("version") != FORMAT_VERSION:
            raise StateError(
                f"{recipe_path} has format version {recipe.get('version')}, this sasq-edge {__version__} reads "
                f"version {FORMAT_VERSION}: retrain the scales with this version"
            )
        try:
            config = QuantConfig.from_dict(recipe["config"])
            fingerprint = recipe["model"]["fingerprint"]
            source = recipe["model"]["source"]
        except KeyError as e:
            raise StateError(f"{recipe_path} lacks the field {e}: rewrite it with sasq-train") from None
        except (ConfigError, TypeError) as e:
            raise StateError(f"{recipe_path}: {e}") from None
        try:
            tensors = load_file(str(scales_path))
        except (SafetensorError, OSError) as e:
            raise StateError(f"{scales_path} is not a readable safetensors file ({e}): rewrite it with sasq-train") from None
        scales = {k[: -len(_SCALE)]: float(v) for k, v in tensors.items() if k.endswith(_SCALE)}
        trunc = {k[: -len(_TRUNC)]: float(v) for k, v in tensors.items() if k.endswith(_TRUNC)}
        smooth = {k[: -len(_SMOOTH)]: v for k, v in tensors.items() if k.endswith(_SMOOTH)}
        if sorted(scales) != sorted(recipe.get("modules", [])) or sorted(smooth) != sorted(recipe.get("smooth", [])):
            raise StateError(f"{scales_path} and {recipe_path} list different modules: the folder is damaged, retrain")
        try:
            return cls(config, scales, fingerprint, source, trunc, recipe.get("training", {}), smooth)
        except SasqError as e:
            raise StateError(f"{scales_path}: {e}") from None
