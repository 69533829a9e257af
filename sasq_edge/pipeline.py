"""The SASQ run in one call: load training windows, prepare, calibrate, train, collect state."""

from __future__ import annotations

import os

import numpy as np
import torch

from sasq_edge.baselines import quantize_ptq
from sasq_edge.config import QuantConfig
from sasq_edge.data import check_context, load_text, make_windows, sample_windows, tokenize
from sasq_edge.models import LoadedModel
from sasq_edge.smooth import attach_learnable, fold_learnable
from sasq_edge.state import ScaleState
from sasq_edge.train import StepCallback, TrainReport, train_scales


def training_windows(lm: LoadedModel, config: QuantConfig, data_dir: str | os.PathLike | None) -> np.ndarray:
    """Non-overlapping ``seq_len`` windows of the validation text (never the test split)."""
    check_context(config.seq_len, lm.max_positions)
    return make_windows(tokenize(load_text("validation", data_dir), lm.tokenizer), config.seq_len)


def run_sasq(
    lm: LoadedModel, config: QuantConfig, data_dir: str | os.PathLike | None = None, *, progress: bool = True,
    windows: np.ndarray | None = None, on_step: StepCallback | None = None,
) -> tuple[ScaleState, TrainReport]:
    """Smooth (if ``config.smooth_alpha``) and prepare ``lm.model`` in place, initialise scales
    on ``config.calib_batches`` windows, train them for ``config.train_steps`` steps, and return
    the resulting state. ``windows`` overrides the validation windows loaded from ``data_dir``."""
    if windows is None:
        windows = training_windows(lm, config, data_dir)
    calib = sample_windows(windows, config.calib_batches, config.seed)
    quantize_ptq(lm.model, config, calib)
    if config.smooth_learn:
        attach_learnable(lm.model)
    report = train_scales(lm.model, torch.from_numpy(windows), config, progress=progress, on_step=on_step)
    if config.smooth_learn:
        fold_learnable(lm.model)
    training = {**report.summary(), "calib_windows": int(calib.shape[0]), "text": "wikitext2 validation"}
    return ScaleState.from_model(lm.model, config, lm.source, training), report
