"""The options of the commands that calibrate and train (``sasq-train``, ``sasq-export``,
``sasq-baseline``), declared once, and the ``QuantConfig`` they make."""

from __future__ import annotations

import argparse
import sys

from runtime.errors import ConfigError
from runtime.profiles import AUTO, PROFILES, resolve_profile
from sasq_edge.cli.common import float_in, int_at_least
from sasq_edge.config import AUTO_ALPHA, CALIBRATIONS, LR_SCHEDULES, OBJECTIVES, TRUNCATIONS, QuantConfig


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = QuantConfig()
    p.add_argument("--profile", default=None,
                   help=f"deploy profile: {', '.join(PROFILES)}, or {AUTO} to pick from this CPU (default {d.profile})")
    p.add_argument("--calibration", default=d.calibration, help=f"scale initialiser: {', '.join(CALIBRATIONS)}")
    p.add_argument("--percentile", type=float_in(50, 100, low_open=True), default=d.percentile,
                   help="percentile for --calibration percentile")
    p.add_argument("--calib-batches", type=int_at_least(1), default=d.calib_batches, help="calibration windows (default %(default)s)")
    p.add_argument("--truncation", default=d.truncation, help=f"outlier truncation: {', '.join(TRUNCATIONS)}")
    p.add_argument("--train-steps", type=int_at_least(0), default=d.train_steps, help="scale-training steps, 0 = PTQ only")
    p.add_argument("--lr", type=float_in(0, low_open=True), default=d.lr, help="Adam learning rate on log-scales (default %(default)s)")
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size, help="windows per training step")
    p.add_argument("--seed", type=int_at_least(0), default=d.seed)
    p.add_argument("--int8-lm-head", action="store_true", help="quantize the output head too (INT8 weight, trained activation scale)")
    p.add_argument("--int8-embedding", action="store_true", help="store the embedding table as weight-only per-row INT8")
    p.add_argument("--smooth-alpha", default=None,
                   help="fold SmoothQuant per-channel factors with this strength (0..1) into the preceding RMSNorm / "
                        f"linear before quantizing; '{AUTO_ALPHA}' searches it on held-out validation windows (default: off)")
    p.add_argument("--smooth-learn", action="store_true", help="train the smoothing factors too (needs --smooth-alpha)")
    p.add_argument("--lr-schedule", default=d.lr_schedule, help=f"learning-rate schedule: {', '.join(LR_SCHEDULES)}")
    p.add_argument("--objective", default=d.objective,
                   help=f"training loss: {' or '.join(OBJECTIVES)}; ce = next-token cross-entropy on the text, kd = "
                        f"distillation, the KL from the float model's next-token distribution (default {d.objective})")
    p.add_argument("--device", default="cpu", help="torch device for calibration and training: cpu or cuda (default cpu)")


def profile(args: argparse.Namespace) -> str:
    """The profile asked for (``auto`` resolved and announced on stderr), or the default."""
    if args.profile is None:
        return QuantConfig().profile
    name, reason = resolve_profile(args.profile)
    if reason is not None:
        print(f"profile auto -> {name} ({reason})", file=sys.stderr, flush=True)
    return name


def smooth_alpha(value: str | None) -> float | str | None:
    if value is None or value == AUTO_ALPHA:
        return value
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--smooth-alpha {value!r} must be a number in [0, 1] or {AUTO_ALPHA}") from None


def config(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        profile=profile(args),
        calibration=args.calibration,
        percentile=args.percentile,
        calib_batches=args.calib_batches,
        truncation=args.truncation,
        train_steps=args.train_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        lm_head=args.int8_lm_head,
        embedding="int8" if args.int8_embedding else "float",
        smooth_alpha=smooth_alpha(args.smooth_alpha),
        smooth_learn=args.smooth_learn,
        lr_schedule=args.lr_schedule,
        objective=args.objective,
    )


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
