"""The SASQ run in one call: load training windows, prepare, calibrate, train, collect state."""

from __future__ import annotations

import os

import numpy as np
import torch

from sasq_edge.calibrate import calibrate
from sasq_edge.config import QuantConfig
from sasq_edge.data import check_context, load_text, make_windows, sample_windows, tokenize
from sasq_edge.models import LoadedModel
from sasq_edge.modules import prepare
from sasq_edge.state import ScaleState
from sasq_edge.train import TrainReport, train_scales


def training_windows(lm: LoadedModel, config: QuantConfig, data_dir: str | os.PathLike | None) -> np.ndarray:
    """Non-overlapping ``seq_len`` windows of the validation text (never the test split)."""
    check_context(config.seq_len, lm.max_positions)
    return make_windows(tokenize(load_text("validation", data_dir), lm.tokenizer), config.seq_len)


def run_sasq(
    lm: LoadedModel, config: QuantConfig, data_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> tuple[ScaleState, TrainReport]:
    """Prepare ``lm.model`` in place, initialise scales on ``config.calib_batches`` windows,
    train them for ``config.train_steps`` steps, and return the resulting state."""
    windows = training_windows(lm, config, data_dir)
    prepare(lm.model, config)
    calib = sample_windows(windows, config.calib_batches, config.seed)
    calibrate(lm.model, [torch.from_numpy(w)[None] for w in calib], config)
    report = train_scales(lm.model, torch.from_numpy(windows), config, progress=progress)
    training = {**report.summary(), "calib_windows": int(calib.shape[0]), "text": "wikitext2 validation"}
    return ScaleState.from_model(lm.model, config, lm.source, training), report
