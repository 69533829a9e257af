"""ONNX-side perplexity over the same windows the torch side uses (docs/METHOD.md, the perplexity protocol)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from runtime.session import LMSession


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Next-token NLL of one window, in float64: logits ``(T, V)``, ids ``(T,)`` -> ``(T-1,)``."""
    lg = logits[:-1].astype(np.float64)  # (T-1, V)
    m = lg.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1))
    return lse - lg[np.arange(lg.shape[0]), ids[1:]]


@dataclass
class OnnxPpl:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    provider: str
    bos: bool = False  # every window starts with the tokenizer's BOS token (it is not predicted)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("ppl", "nll", "tokens", "windows", "seq_len", "provider", "bos")}


def iter_logits(sess: LMSession, windows: np.ndarray, desc: str = "onnx") -> Iterator[np.ndarray]:
    """Float32 logits ``(T, V)`` of each window, one run per window."""
    for row in tqdm(windows, desc=desc, unit="window"):
        yield sess.logits(row[None])[0]


def perplexity(sess: LMSession, windows: np.ndarray, desc: str = "onnx ppl", *, bos: bool = False) -> OnnxPpl:
    """PPL = exp(mean next-token NLL) over ``windows``; ``bos`` records that they start with BOS
    (``runtime.sources.WindowSet.bos``): each still predicts ``seq_len - 1`` tokens."""
    total, count = 0.0, 0
    for row, logits in zip(windows, iter_logits(sess, windows, desc), strict=True):
        nll = token_nll(logits, row)
        total += float(nll.sum())
        count += nll.shape[0]
    mean = total / count
    return OnnxPpl(math.exp(mean), mean, count, len(windows), windows.shape[1], sess.providers[0], bos)
