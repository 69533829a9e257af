"""The options of the commands that calibrate and train (``sasq-train``, ``sasq-export``,
``sasq-baseline``), declared once, and the ``QuantConfig`` they make."""

from __future__ import annotations

import argparse
import sys

from runtime.errors import ConfigError
from runtime.profiles import AUTO, PROFILES, resolve_profile
from sasq_edge.cli.common import float_in, int_at_least
from sasq_edge.config import AUTO_ALPHA, CALIBRATIONS, LR_SCHEDULES, OBJECTIVES, RECIPES, TRUNCATIONS, QuantConfig


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every option of the method; each left unset takes the value of the ``--recipe`` preset."""
    d = QuantConfig.from_recipe("default")
    p.add_argument("--recipe", default="default", choices=list(RECIPES),
                   help="preset to start from (default: default, the recipe measured best within the CPU budget; fast: "
                        "fewer steps; best: the longest run measured); every option below overrides it")
    p.add_argument("--profile", default=None,
                   help=f"deploy profile: {', '.join(PROFILES)}, or {AUTO} to pick from this CPU (default {AUTO}; "
                        "TensorRT users pass trt; with --scales, the scales' own profile)")
    p.add_argument("--calibration", help=f"scale initialiser: {', '.join(CALIBRATIONS)} (default {d.calibration})")
    p.add_argument("--percentile", type=float_in(50, 100, low_open=True), help="percentile for --calibration percentile")
    p.add_argument("--calib-batches", type=int_at_least(1), help=f"calibration windows (default {d.calib_batches})")
    p.add_argument("--truncation", help=f"outlier truncation: {', '.join(TRUNCATIONS)} (default {d.truncation})")
    p.add_argument("--train-steps", type=int_at_least(0), help=f"scale-training steps, 0 = PTQ only (default {d.train_steps})")
    p.add_argument("--lr", type=float_in(0, low_open=True), help=f"Adam learning rate on log-scales (default {d.lr})")
    p.add_argument("--batch-size", type=int_at_least(1), help=f"windows per training step (default {d.batch_size})")
    p.add_argument("--seed", type=int_at_least(0))
    p.add_argument("--int8-lm-head", action="store_true", help="quantize the output head too (INT8 weight, trained activation scale)")
    p.add_argument("--int8-embedding", action="store_true", help="store the embedding table as weight-only per-row INT8")
    p.add_argument("--smooth-alpha",
                   help="fold SmoothQuant per-channel factors with this strength (0..1) into the preceding RMSNorm / "
                        f"linear before quantizing; '{AUTO_ALPHA}' searches it on held-out validation windows; 'off' "
                        f"(default {d.smooth_alpha})")
    p.add_argument("--smooth-learn", action=argparse.BooleanOptionalAction,
                   help=f"train the smoothing factors too (default {'on' if d.smooth_learn else 'off'})")
    p.add_argument("--lr-schedule", help=f"learning-rate schedule: {', '.join(LR_SCHEDULES)} (default {d.lr_schedule})")
    p.add_argument("--objective",
                   help=f"training loss: {' or '.join(OBJECTIVES)}; ce = next-token cross-entropy on the text, kd = "
                        f"distillation, the KL from the float model's next-token distribution (default {d.objective})")
    p.add_argument("--device", default="cpu", help="torch device for calibration and training: cpu or cuda (default cpu)")


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
           "seed": "seed", "smooth_learn": "smooth_learn", "lr_schedule": "lr_schedule", "objective": "objective"}


def config(args: argparse.Namespace) -> QuantConfig:
    """The ``--recipe`` preset with every option the user set on top."""
    over = {field: getattr(args, opt) for opt, field in _FIELDS.items() if getattr(args, opt) is not None}
    if args.smooth_alpha is not None:
        over["smooth_alpha"] = smooth_alpha(args.smooth_alpha)
        if over["smooth_alpha"] is None and "smooth_learn" not in over:
            over["smooth_learn"] = False  # --smooth-alpha off: nothing to learn on top
    if getattr(args, "seq_len", None) is not None:
        over["seq_len"] = args.seq_len
    return QuantConfig.from_recipe(args.recipe, profile=profile(args), lm_head=args.int8_lm_head,
                                   embedding="int8" if args.int8_embedding else "float", **over)


def device(args: argparse.Namespace):
    """``--device`` as a torch device that exists here (one-line error otherwise)."""
    import torch

    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device!r}: {e}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA GPU: use --device cpu")
    return dev


def run(lm, args: argparse.Namespace, cfg: QuantConfig):
    """``run_sasq`` on ``--device`` with ``--data`` (the model comes back to the CPU for export);
    says what text it read and the alpha ``--smooth-alpha auto`` picked."""
    from runtime.sources import record_summary
    from sasq_edge.pipeline import run_sasq

    lm.model.to(device(args))
    try:
        result = run_sasq(lm, cfg, args.data_dir, data=args.data)
    finally:
        lm.model.to("cpu")
    print(record_summary(result.state.training["data"]), file=sys.stderr, flush=True)
    if result.alpha_search is not None:
        alpha = result.state.method["smooth_alpha"]
        print(f"smooth alpha auto -> {alpha} (validation PPL {result.alpha_search[alpha]:.3f})", file=sys.stderr, flush=True)
    return result
