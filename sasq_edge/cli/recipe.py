"""The options of the commands that calibrate and train (``sasq-train``, ``sasq-export``,
``sasq-baseline``), declared once, and the ``QuantConfig`` they make."""

from __future__ import annotations

import argparse
import sys

from runtime.errors import ConfigError
from runtime.profiles import AUTO, PROFILES, resolve_profile
from sasq_edge.cli.common import float_in, int_at_least
from sasq_edge.config import AUTO_ALPHA, CALIBRATIONS, DTYPES, LR_SCHEDULES, OBJECTIVES, RECIPES, TRUNCATIONS, QuantConfig


def add_train_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    """Every option of the method; each left unset takes the value of the ``--recipe`` preset.
    ``train=False`` (``sasq-baseline``): only the calibration options, none it would ignore."""
    d = QuantConfig.from_recipe("default")
    p.add_argument("--recipe", default="default", choices=list(RECIPES),
                   help="preset to start from (default: default, the recipe measured best within the CPU budget; fast: "
                        "fewer steps; best: the longest run measured); every option below overrides it")
    p.add_argument("--profile", default=None,
                   help=f"deploy profile: {', '.join(PROFILES)}, or {AUTO} to pick from this CPU (default {AUTO}; "
                        "TensorRT users pass trt; with --scales, the scales' own profile)")
    p.add_argument("--calibration", help=f"scale initialiser: {', '.join(CALIBRATIONS)} (default {d.calibration})")
    p.add_argument("--percentile", type=float_in(50, 100, low_open=True), help="percentile for --calibration percentile")
    p.add_argument("--calib-batches", type=int_at_least(1),
                   help=f"calibration windows (default {d.calib_batches}; capped at what the text holds, said)")
    p.add_argument("--seed", type=int_at_least(0))
    p.add_argument("--smooth-alpha",
                   help="fold SmoothQuant per-channel factors with this strength (0..1) into the preceding RMSNorm / "
                        f"linear before quantizing; '{AUTO_ALPHA}' searches it on held-out validation windows; 'off' "
                        f"(default {d.smooth_alpha})")
    p.add_argument("--device", default="cpu", help="torch device for calibration and training: cpu or cuda (default cpu)")
    if not train:
        return
    p.add_argument("--truncation", help=f"outlier truncation: {', '.join(TRUNCATIONS)} (default {d.truncation})")
    p.add_argument("--train-steps", type=int_at_least(0), help=f"scale-training steps, 0 = PTQ only (default {d.train_steps})")
    p.add_argument("--lr", type=float_in(0, low_open=True), help=f"Adam learning rate on log-scales (default {d.lr})")
    p.add_argument("--batch-size", type=int_at_least(1),
                   help="windows per training step and process: the global batch is this times the processes accelerate "
                        f"launch starts (default {d.batch_size})")
    p.add_argument("--int8-lm-head", action="store_true", help="quantize the output head too (INT8 weight, trained activation scale)")
    p.add_argument("--int8-embedding", action="store_true", help="store the embedding table as weight-only per-row INT8")
    p.add_argument("--smooth-learn", action=argparse.BooleanOptionalAction,
                   help=f"train the smoothing factors too (default {'on' if d.smooth_learn else 'off'})")
    p.add_argument("--lr-schedule", help=f"learning-rate schedule: {', '.join(LR_SCHEDULES)} (default {d.lr_schedule})")
    p.add_argument("--objective",
                   help=f"training loss: {' or '.join(OBJECTIVES)}; ce = next-token cross-entropy on the text, kd = "
                        f"distillation, the KL from the float model's next-token distribution (default {d.objective})")
    p.add_argument("--rotate-block", type=int_at_least(0),
                   help="rotate the inputs of q/k/v, gate/up and the down projection online in Hadamard blocks of this "
                        "size (a power of two; the largest that divides the layer's width is used) so one static scale "
                        f"fits their outliers; 0 = off (default {d.rotate_block})")
    p.add_argument("--blockwise", action=argparse.BooleanOptionalAction,
                   help="train the scales block by block against each float decoder block's output, one block in memory "
                        "at a time (every model size), then --train-steps end-to-end steps where the whole model fits; "
                        f"--no-blockwise trains end to end only (default {'on' if d.blockwise else 'off'})")
    p.add_argument("--block-steps", type=int_at_least(0), help=f"training steps per block (default {d.block_steps})")
    p.add_argument("--block-windows", type=int_at_least(1),
                   help=f"windows the block-wise pass captures and trains on (default {d.block_windows})")




def add_scaleout_args(p: argparse.ArgumentParser) -> None:
    """Options for models that do not fit in float32 on one device: weight dtype, activation
    checkpointing, the memory check (``sasq_edge.memory``)."""
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="dtype of the frozen float weights during calibration and training (default fp32); bf16 halves "
                        "their memory; quantizer arithmetic and the trained scales stay float32, the INT8 weights are "
                        "encoded from the float32 value of each bf16 weight")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder block in the backward pass instead of keeping its activations (same "
                        "scales, less memory, about a third more time)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="train even where the estimated peak memory exceeds the memory free (docs/SCALING.md)")


def profile(args: argparse.Namespace) -> str:
    """The profile asked for, ``auto`` resolved and announced on stderr."""
    name, reason = resolve_profile(args.profile or AUTO)
    if reason is not None:
        print(f"profile auto -> {name} ({reason})", file=sys.stderr, flush=True)
    return name


def smooth_alpha(value: str | None) -> float | str | None:
    if value is None or value == AUTO_ALPHA:
        return value
    if value == "off":
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--smooth-alpha {value!r} must be a number in [0, 1], {AUTO_ALPHA} or off") from None


# option -> QuantConfig field, for the options a preset can set
_FIELDS = {"calibration": "calibration", "percentile": "percentile", "calib_batches": "calib_batches",
           "truncation": "truncation", "train_steps": "train_steps", "lr": "lr", "batch_size": "batch_size",
           "seed": "seed", "smooth_learn": "smooth_learn", "lr_schedule": "lr_schedule", "objective": "objective",
           "rotate_block": "rotate_block", "blockwise": "blockwise", "block_steps": "block_steps",
           "block_windows": "block_windows"}


def config(args: argparse.Namespace) -> QuantConfig:
    """The ``--recipe`` preset with every option the user set on top."""
    over = {field: getattr(args, opt) for opt, field in _FIELDS.items() if getattr(args, opt, None) is not None}
    if over.get("blockwise") is False:
        over.setdefault("block_steps", 0)
    if args.smooth_alpha is not None:
        over["smooth_alpha"] = smooth_alpha(args.smooth_alpha)
        if over["smooth_alpha"] is None and "smooth_learn" not in over:
            over["smooth_learn"] = False  # --smooth-alpha off: nothing to learn on top
    if getattr(args, "seq_len", None) is not None:
        over["seq_len"] = args.seq_len
    return QuantConfig.from_recipe(args.recipe, profile=profile(args), lm_head=getattr(args, "int8_lm_head", False),
                                   embedding="int8" if getattr(args, "int8_embedding", False) else "float", **over)


def device(args: argparse.Namespace):
    """``--device`` as a torch device that exists here (one-line error otherwise); ``cuda`` is
    this process's GPU (``cuda:LOCAL_RANK``) under ``accelerate launch`` / ``torchrun``."""
    import torch

    from sasq_edge.distributed import process_device

    try:
        dev = process_device(args.device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device!r}: {e}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA GPU: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{dev} asked for, torch sees {torch.cuda.device_count()} GPU(s): launch at most that many "
                          "processes per machine")
    return dev
