"""The SASQ run in one call, ``run_sasq(lm, config)``: training windows, SmoothQuant factors
(searched when ``smooth_alpha="auto"``), prepare, calibrate, train, fold; the result holds the
``ScaleState`` and everything the run decided."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from runtime.data import check_context, sample_windows
from runtime.sources import CALIBRATION, DEFAULT_SPEC, DataSpec, WindowSet
from runtime.state import ScaleState
from sasq_edge.calibrate import calibrate
from sasq_edge.config import AUTO_ALPHA, QuantConfig
from sasq_edge.data import bos_of, load_windows
from sasq_edge.distributed import SINGLE, Group
from sasq_edge.errors import ConfigError, DataError
from sasq_edge.evaluate import perplexity
from sasq_edge.models import LoadedModel
from sasq_edge.modules import prepare, scale_parameters, set_mode
from sasq_edge.smooth import attach_learnable, fold_factors, fold_learnable, smooth_model, snapshot
from sasq_edge.state import state_from_model
from sasq_edge.train import StepCallback, TrainReport, train_scales

if TYPE_CHECKING:
    from sasq_edge.blockwise import BlockCallback

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)  # SmoothQuant strengths tried by "auto"
SELECT_WINDOWS = 4  # validation windows held out of training to pick alpha for "auto"


@dataclass
class SasqResult:
    state: ScaleState
    report: TrainReport
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)  # total factors folded into the model
    alpha_search: dict[float, float] | None = None  # alpha -> held-out validation PPL, for "auto"

    @property
    def config(self) -> QuantConfig:
        """The config that ran ("auto" resolved)."""
        return QuantConfig.from_dict(self.state.method)


def training_data(lm: LoadedModel, config: QuantConfig, data_dir: str | os.PathLike | None = None,
                  data: str | DataSpec | None = None, *, progress: bool = True) -> WindowSet:
    """The calibration and training windows of ``data`` (a ``--data`` spec; default ``wikitext2``,
    its validation split, never the test split), ``config.seq_len`` tokens each, BOS-aware; a
    mix's windows are drawn with ``config.seed``."""
    check_context(config.seq_len, lm.max_positions)
    got = load_windows(lm, data or DEFAULT_SPEC, config.seq_len, CALIBRATION, data_dir=data_dir, seed=config.seed,
                       progress=progress)
    n = got.windows.shape[0]
    for flag, asked in (("--calib-batches", config.calib_batches), ("--block-windows", config.block_windows if config.blockwise
                                                                    else 0)):
        if asked > n:  # the cap: never more windows than the text holds
            print(f"sasq: {flag} {asked}: the text holds {n} windows of {config.seq_len} tokens; using those {n}",
                  file=sys.stderr, flush=True)
    return got


def training_windows(lm: LoadedModel, config: QuantConfig, data_dir: str | os.PathLike | None,
                     data: str | DataSpec | None = None) -> np.ndarray:
    """``training_data(...).windows``: non-overlapping ``seq_len`` windows (default: the WikiText-2
    validation text)."""
    return training_data(lm, config, data_dir, data).windows


def hold_out(windows: np.ndarray, count: int = SELECT_WINDOWS) -> tuple[np.ndarray, np.ndarray]:
    """(training windows, the last ``count`` held out to choose settings on)."""
    if windows.shape[0] <= count:
        raise DataError(f"choosing smooth_alpha holds out {count} validation windows, the text has only "
                        f"{windows.shape[0]} of {windows.shape[1]} tokens: fix smooth_alpha (--smooth-alpha A) or use a "
                        "shorter seq_len")
    return windows[:-count], windows[-count:]


def _batches(windows: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(w))[None] for w in windows]


def quantize_ptq(model: nn.Module, config: QuantConfig, calib: np.ndarray, group: Group = SINGLE,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Smooth (if ``config.smooth_alpha``), prepare and calibrate ``model`` in place: static PTQ.
    Returns the smoothing factors folded into it (empty without smoothing). With several ranks in
    ``group``, rank 0 computes the factors and the scales and every rank gets them: the same
    bits everywhere."""
    if config.smooth_alpha == AUTO_ALPHA:
        raise ConfigError("smooth_alpha='auto' is chosen by run_sasq or search_smooth_alpha: pass a number here")
    batches = _batches(calib)
    factors = {}
    if config.smooth_alpha is not None:
        factors = group.from_main(lambda: smooth_model(model, batches, config.smooth_alpha, config.targets, progress))
        if not group.is_main:
            fold_factors(model, factors)  # rank 0 folded them while computing them
    prepare(model, config)
    if group.is_main:
        calibrate(model, batches, config, progress)
    else:
        set_mode(model, "fake")
    group.broadcast_(scale_parameters(model))
    return factors


SEARCH_CALIB_WINDOWS = 2  # calibration windows per tried alpha in run_sasq's search


def search_smooth_alpha(model: nn.Module, config: QuantConfig, calib: np.ndarray, select: np.ndarray,
                        alphas: Sequence[float] = ALPHAS, calibration: str | None = None) -> tuple[float, dict[float, float]]:
    """SmoothQuant's alpha with the lowest perplexity of the static PTQ model on ``select``
    (validation windows, never test). ``model`` is left untouched (each try works on a copy).
    ``calibration`` overrides the config's initialiser for the tries (absmax is what SmoothQuant
    calibrates with, and is far cheaper than MSE)."""
    ppl = {}
    for a in tqdm(alphas, desc="smoothing strength (held-out perplexity of each alpha)", unit="alpha", leave=False):
        cfg = dataclasses.replace(config, smooth_alpha=a, smooth_learn=False, train_steps=0,
                                  calibration=calibration or config.calibration)
        trial = copy.deepcopy(model)
        quantize_ptq(trial, cfg, calib, progress=False)
        ppl[a] = perplexity(trial, select, desc=f"alpha {a}", progress=False).ppl
        del trial
    finite = {a: p for a, p in ppl.items() if math.isfinite(p)}
    if not finite:
        raise ConfigError("every smoothing strength gave a non-finite perplexity: check the model and the data")
    return min(finite, key=finite.get), ppl


def _ppl(model: nn.Module, windows: np.ndarray) -> float:
    return perplexity(model, windows, desc="held-out", progress=False).ppl


def run_sasq(
    lm: LoadedModel, config: QuantConfig, data_dir: str | os.PathLike | None = None, *, data: str | DataSpec | None = None,
    progress: bool = True, windows: np.ndarray | None = None, on_step: StepCallback | None = None,
    group: Group = SINGLE, gradient_checkpointing: bool = False, on_block: BlockCallback | None = None,
) -> SasqResult:
    """Smooth (if ``config.smooth_alpha``; ``"auto"`` first picks alpha on the last
    ``SELECT_WINDOWS`` validation windows, held out of training) and prepare ``lm.model`` in
    place, initialise scales on ``config.calib_batches`` windows, train them for
    ``config.train_steps`` steps (with the smoothing factors when ``config.smooth_learn``), and
    return the state. With 8 windows or more (or ``"auto"``), the last ``SELECT_WINDOWS`` are
    held out of training, and the result's ``training["heldout"]`` says their perplexity under
    the float model, after PTQ, and after training. The windows come from ``data`` (a ``--data`` spec, default ``wikitext2``:
    its validation split, from ``data_dir`` or the hub); ``windows`` overrides them. What was read
    is recorded in the state's ``training["data"]``.

    With several ranks in ``group`` (``sasq_edge.distributed``), call it on every rank: rank 0
    reads the windows, searches alpha, computes the factors and scales and measures the held-out
    perplexities, and every rank gets its results; each rank then trains on its share of every
    step's windows, and all end with the same state. ``gradient_checkpointing`` recomputes the
    decoder blocks in the backward pass instead of keeping their activations.

    With ``config.blockwise`` the scales first train block by block (``sasq_edge.blockwise``:
    SmoothQuant strength searched per block, scales initialised and trained against each float
    block's output, on ``config.block_windows`` windows), then ``config.train_steps`` steps of the
    end-to-end objective train the activation scales of the whole model (no smoothing factors);
    ``on_block`` reports each block.

    The model ends as ``apply_state(fresh model, result.state)`` rebuilds it, bit for bit.
    """
    progress = progress and group.is_main
    if windows is None:
        def read() -> tuple[np.ndarray, str, dict]:
            got = training_data(lm, config, data_dir, data, progress=progress)
            return got.windows, got.text, got.record

        windows, text, record = group.from_main(read)
    else:
        bos = bos_of(lm.tokenizer)
        text = "windows given to run_sasq"
        record = {"spec": None, "role": CALIBRATION, "seq_len": int(windows.shape[1]), "windows": int(windows.shape[0]),
                  "bos": bool(bos is not None and (windows[:, 0] == bos).all())}
        windows = group.from_main(lambda: windows)  # rank 0's, should the callers' differ
    if config.blockwise:
        return _run_blockwise(lm, config, windows, text, record, progress=progress, group=group,
                              gradient_checkpointing=gradient_checkpointing, on_block=on_block)
    search, select, heldout = None, None, {}
    if config.smooth_alpha == AUTO_ALPHA or windows.shape[0] >= 2 * SELECT_WINDOWS:
        # the last windows never train: they pick alpha and measure what training did
        windows, select = hold_out(windows)
        heldout = {"windows": int(select.shape[0]), "seq_len": int(select.shape[1]),
                   "float_ppl": group.from_main(lambda: _ppl(lm.model, select))}
    if config.smooth_alpha == AUTO_ALPHA:
        # each try: SmoothQuant's absmax PTQ on a few windows, judged on the held-out ones (minutes, not the
        # training budget); the chosen alpha then gets the config's own initialiser and training
        tries = sample_windows(windows, min(config.calib_batches, SEARCH_CALIB_WINDOWS), config.seed)
        alpha, search = group.from_main(lambda: search_smooth_alpha(lm.model, config, tries, select, calibration="absmax"))
        config = dataclasses.replace(config, smooth_alpha=alpha)
    calib = sample_windows(windows, config.calib_batches, config.seed)
    originals = snapshot(lm.model, config.targets) if config.smooth_learn else {}
    factors = quantize_ptq(lm.model, config, calib, group)
    if heldout:
        heldout["ptq_ppl"] = group.from_main(lambda: _ppl(lm.model, select))
    if config.smooth_learn:
        attach_learnable(lm.model, factors)
    report = train_scales(lm.model, torch.from_numpy(windows), config, progress=progress, on_step=on_step, group=group,
                          gradient_checkpointing=gradient_checkpointing)
    parallel = {}
    if group.world > 1:
        # every rank took the same averaged steps from the same start: measured, then rank 0's kept
        trained = scale_parameters(lm.model)
        parallel = {"rank_max_diff": group.max_difference(trained)}
        group.broadcast_(trained)
    if config.smooth_learn:
        factors = fold_learnable(lm.model, factors, originals)
    if heldout:
        heldout["trained_ppl"] = group.from_main(lambda: _ppl(lm.model, select))
    training = {**report.summary(), "calib_windows": int(calib.shape[0]), "train_windows": int(windows.shape[0]),
                "text": text, "data": record, "objective": config.objective, "processes": group.world,
                "global_batch": config.batch_size * group.world, **parallel, "weights_dtype": weights_dtype(lm.model),
                "gradient_checkpointing": gradient_checkpointing}
    if heldout:
        training["heldout"] = heldout
    if search is not None:
        training["alpha_search"] = {str(a): p for a, p in search.items()}
    state = state_from_model(lm.model, config, lm.source, smooth=factors, training=training)
    return SasqResult(state, report, factors, search)


def _run_blockwise(lm: LoadedModel, config: QuantConfig, windows: np.ndarray, text: str, record: dict, *, progress: bool,
                   group: Group, gradient_checkpointing: bool, on_block: BlockCallback | None) -> SasqResult:
    """``run_sasq``'s block-wise path: the block-wise pass on the whole model in memory, then the
    end-to-end steps (``config.train_steps``) on the activation scales alone."""
    from sasq_edge.blockwise import WholeModel, train_blockwise

    if group.world > 1:
        raise ConfigError("block-wise training runs in one process: start it without accelerate launch / torchrun, or "
                          "train end to end (--no-blockwise)")
    heldout = {}
    if windows.shape[0] >= 2 * SELECT_WINDOWS:
        windows, select = hold_out(windows)
        heldout = {"windows": int(select.shape[0]), "seq_len": int(select.shape[1]), "float_ppl": _ppl(lm.model, select)}
    blocks = sample_windows(windows, config.block_windows, config.seed)
    result = train_blockwise(WholeModel(lm.model), dataclasses.replace(config, train_steps=0), blocks, lm.source,
                             progress=progress, on_block=on_block)
    config = dataclasses.replace(QuantConfig.from_dict(result.state.method), train_steps=config.train_steps)
    if heldout:
        heldout["blockwise_ppl"] = _ppl(lm.model, select)
        heldout["ptq_ppl"] = heldout["blockwise_ppl"]  # what the end-to-end steps start from
    report = train_scales(lm.model, torch.from_numpy(windows), config, progress=progress, group=group,
                          gradient_checkpointing=gradient_checkpointing) if config.train_steps else \
        TrainReport(0, 0, len(scale_parameters(lm.model)), 0.0, 0.0)
    if heldout:
        heldout["trained_ppl"] = _ppl(lm.model, select) if config.train_steps else heldout["blockwise_ppl"]
    training = {**report.summary(), **result.state.training, "calib_windows": int(min(config.calib_batches, blocks.shape[0])),
                "train_windows": int(windows.shape[0]), "text": text, "data": record, "objective": config.objective,
                "processes": 1, "global_batch": config.batch_size, "weights_dtype": weights_dtype(lm.model),
                "gradient_checkpointing": gradient_checkpointing}
    training["wall_s"] = round(result.wall_s + report.wall_s, 2)
    if heldout:
        training["heldout"] = heldout
    state = state_from_model(lm.model, config, lm.source, smooth=result.factors, training=training)
    return SasqResult(state, report, result.factors, None)


def weights_dtype(model: nn.Module) -> str:
    """The dtype of the model's float weights, as torch names it (``float32``, ``bfloat16``)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")
