"""The one frozen configuration of a SASQ run: what is quantized, how scales start and train.

Deployment facts (profiles, integer grids, picking a profile from the CPU) belong to the runtime
(``runtime.profiles``); the config names a profile and reads its grids from there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from runtime.profiles import AUTO, DeployProfile, get_profile, resolve_profile
from runtime.state import EMBEDDINGS
from sasq_edge.errors import ConfigError

CALIBRATIONS = ("absmax", "percentile", "mse")
TRUNCATIONS = ("clip", "tanh")
LR_SCHEDULES = ("constant", "cosine")
OBJECTIVES = ("ce", "kd")  # next-token cross-entropy; distillation from the float model (sasq_edge.train)
AUTO_ALPHA = "auto"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # the frozen float weights' dtype while training (--dtype)


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what a SASQ run computes. Validated on construction.

    ``targets`` are leaf module names inside the decoder blocks (``q_proj``, ...); ``None`` means
    the architecture's default set from the registry in ``runtime.families``.
    """

    # the defaults are the ``default`` recipe, the command's: block-wise training of scales and learned
    # smoothing factors on rotated inputs, on the profile this CPU runs exactly (``QuantConfig.plain``:
    # the method without any of it)
    profile: str = AUTO
    targets: tuple[str, ...] | None = None
    calibration: str = "mse"
    percentile: float = 99.99
    calib_batches: int = 8
    truncation: str = "clip"
    train_steps: int = 0
    lr: float = 0.01
    batch_size: int = 1
    seq_len: int = 512
    seed: int = 0
    lm_head: bool = False  # quantize the output head like the decoder linears (trained activation scale)
    embedding: str = "float"  # "int8": weight-only per-row INT8 embedding table
    # per-input-channel factors folded SmoothQuant-style into the preceding RMSNorm / linear
    # (x / s, W * s) before quantization; None = off, "auto" = searched on held-out validation
    # windows (sasq_edge.pipeline). The deployed graph keeps per-tensor scales.
    smooth_alpha: float | str | None = AUTO_ALPHA
    # train the smoothing factors too (on top of SmoothQuant's), folded into the weights after training
    smooth_learn: bool = True
    lr_schedule: str = "cosine"
    objective: str = "kd"
    # online block-Hadamard rotation of the inputs of q/k/v, gate/up and the down projection
    # (runtime.rotation): the largest power of two up to this block size that divides the layer's
    # input width; 0 = off
    rotate_block: int = 64
    # block-wise training (sasq_edge.blockwise): each decoder block's scales train against the float
    # block's output on block_windows captured windows, block_steps steps each, one block in memory at
    # a time; train_steps then are the steps of an end-to-end pass after it (where the model fits)
    blockwise: bool = True
    block_steps: int = 20
    block_windows: int = 16

    def __post_init__(self) -> None:
        if self.profile == AUTO:  # the profile this machine's CPU runs exactly (runtime.profiles.detect_profile)
            object.__setattr__(self, "profile", resolve_profile(AUTO)[0])
        get_profile(self.profile)
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"unknown calibration {self.calibration!r}: choose one of {', '.join(CALIBRATIONS)}")
        if self.embedding not in EMBEDDINGS:
            raise ConfigError(f"unknown embedding {self.embedding!r}: choose one of {', '.join(EMBEDDINGS)}")
        if self.embedding == "int8" and self.profile == "trt":
            # its DequantizeLinear takes per-row scales gathered at run time; TensorRT wants constant scales
            raise ConfigError("an INT8 embedding is for the CPU profiles (TensorRT needs constant Q/DQ scales): "
                              "drop --int8-embedding, or pick --profile cpu-avx2, cpu-vnni or arm64")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"unknown truncation {self.truncation!r}: choose one of {', '.join(TRUNCATIONS)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.smooth_alpha is not None and self.smooth_alpha != AUTO_ALPHA:
            if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                    or not 0.0 <= self.smooth_alpha <= 1.0:
                raise ConfigError(f"smooth_alpha={self.smooth_alpha!r} must be a number in [0, 1] (SmoothQuant's "
                                  f"migration strength) or {AUTO_ALPHA!r}")
            object.__setattr__(self, "smooth_alpha", float(self.smooth_alpha))
        if self.smooth_learn and self.smooth_alpha is None:
            raise ConfigError("smooth_learn trains the smoothing factors SmoothQuant starts: set smooth_alpha too")
        if not (isinstance(self.percentile, (int, float)) and 50.0 < self.percentile <= 100.0):
            raise ConfigError(f"percentile={self.percentile} must lie in (50, 100]")
        if self.block_steps < 0:
            raise ConfigError(f"block_steps={self.block_steps} must be 0 (block-wise calibration only) or more")
        if self.block_steps and not self.blockwise:
            raise ConfigError("block_steps trains block by block: set blockwise=True too (--blockwise)")
        for name in ("calib_batches", "batch_size", "seq_len", "block_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        rb = self.rotate_block
        if isinstance(rb, bool) or not isinstance(rb, int) or rb < 0 or rb == 1 or rb & (rb - 1):
            raise ConfigError(f"rotate_block={rb!r} must be 0 (no rotation) or a power of two such as 64")
        if self.train_steps < 0:
            raise ConfigError(f"train_steps={self.train_steps} must be 0 (calibration only) or more")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr} must be positive and finite")
        if self.targets is not None:
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ConfigError("targets must be a non-empty list of module names such as 'q_proj'")
            object.__setattr__(self, "targets", tuple(self.targets))

    @classmethod
    def from_recipe(cls, name: str = "default", **overrides: Any) -> QuantConfig:
        """A preset of ``RECIPES`` (``fast``, ``default``, ``best``), with ``overrides`` on top."""
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
        return cls(**{**RECIPES[name], **overrides})

    @classmethod
    def plain(cls, **overrides: Any) -> QuantConfig:
        """The method alone, ``overrides`` on top: absmax initial scales, no smoothing and no
        rotation, end-to-end next-token training of the scales only, on TensorRT's profile (the
        same on every CPU). What the tests and the ablations start from."""
        return cls(**{**PLAIN, **overrides})

    @property
    def deploy(self) -> DeployProfile:
        return get_profile(self.profile)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Strict: an unknown key is an error, never silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"unknown config key(s) {', '.join(extra)}: valid keys are {', '.join(sorted(known))}")
        # a key a state file lacks was added to the method later, with the plain method's value
        d = {**PLAIN, **d}
        if d.get("targets") is not None:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


# The presets the command line starts from (``--recipe``; ``default`` when none is named).
# ``default`` (the dataclass's own defaults) is the recipe that measured best on held-out text
# within the CPU budget (bench/results/quality_smollm2.md and blockwise.md: quality against steps,
# sequence length, distillation against cross-entropy, block-wise against end to end, on
# WikiText-2 and three other domains); ``fast`` trades a little quality for a few minutes; ``best``
# is the longest run measured (a GPU's worth of steps), with end-to-end distillation steps after
# the block-wise pass where the whole model fits. The presets' text when a command gets no --data:
# runtime.sources.DEFAULT_CALIBRATION_SPEC.
RECIPES: dict[str, dict[str, Any]] = {
    "fast": {"block_steps": 10, "block_windows": 8},
    "default": {},
    "best": {"seq_len": 2048, "block_steps": 100, "block_windows": 32, "train_steps": 200},
}

# The method without the recipe's additions (``QuantConfig.plain``); also the value of a key that a
# state file written before the key existed lacks.
PLAIN: dict[str, Any] = dict(profile="trt", calibration="absmax", train_steps=100, lr=5e-3, smooth_alpha=None,
                             smooth_learn=False, lr_schedule="constant", objective="ce", rotate_block=0, blockwise=False,
                             block_steps=0, block_windows=16)
