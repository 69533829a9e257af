"""Parity between the PyTorch fake-quant model and its ONNX export, window by window."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from runtime.perplexity import token_nll


@dataclass
class ParityReport:
    ppl_torch: float
    ppl_onnx: float
    rel_diff: float  # |ppl_onnx - ppl_torch| / ppl_torch
    top1_agreement: float  # fraction of positions whose argmax token agrees
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    windows: int
    tokens: int
    rel_tol: float
    min_top1: float

    @property
    def passed(self) -> bool:
        return self.rel_diff <= self.rel_tol and self.top1_agreement >= self.min_top1

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["passed"] = self.passed
        return d


class ParityAccumulator:
    """``update(ids, logits_torch, logits_onnx)`` per window, then ``report()``."""

    def __init__(self) -> None:
        self.nll_torch = 0.0
        self.nll_onnx = 0.0
        self.tokens = 0
        self.positions = 0
        self.agree = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.values = 0
        self.windows = 0

    def update(self, ids: np.ndarray, logits_torch: np.ndarray, logits_onnx: np.ndarray) -> None:
        if logits_torch.shape != logits_onnx.shape:
            raise ValueError(f"logit shapes differ: torch {logits_torch.shape}, onnx {logits_onnx.shape}")
        self.nll_torch += float(token_nll(logits_torch, ids).sum())
        nll = token_nll(logits_onnx, ids)
        self.nll_onnx += float(nll.sum())
        self.tokens += nll.shape[0]
        self.agree += int((logits_torch.argmax(-1) == logits_onnx.argmax(-1)).sum())
        self.positions += logits_torch.shape[0]
        diff = np.abs(logits_torch.astype(np.float64) - logits_onnx)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.values += diff.size
        self.windows += 1

    def report(self, rel_tol: float = 0.005, min_top1: float = 0.99) -> ParityReport:
        if self.windows == 0:
            raise ValueError("no window was compared")
        pt = math.exp(self.nll_torch / self.tokens)
        po = math.exp(self.nll_onnx / self.tokens)
        return ParityReport(
            ppl_torch=pt,
            ppl_onnx=po,
            rel_diff=abs(po - pt) / pt,
            top1_agreement=self.agree / self.positions,
            max_abs_logit_diff=self.max_abs,
            mean_abs_logit_diff=self.sum_abs / self.values,
            windows=self.windows,
            tokens=self.tokens,
            rel_tol=rel_tol,
            min_top1=min_top1,
        )


def compare(windows: np.ndarray, logits_a: Iterable[np.ndarray], logits_b: Iterable[np.ndarray]) -> ParityAccumulator:
    """Feed two per-window logit streams (e.g. PyTorch and ONNX Runtime) over the same windows."""
    acc = ParityAccumulator()
    for ids, a, b in zip(windows, logits_a, logits_b, strict=True):
        acc.update(ids, a, b)
    return acc
