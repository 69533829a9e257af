"""Torch-side perplexity: PPL = exp(mean next-token NLL) over non-overlapping windows."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PplResult:
    ppl: float
    nll: float  # mean token NLL (nats)
    tokens: int  # predicted tokens: windows * (seq_len - 1)
    windows: int
    seq_len: int
    bos: bool = False  # every window starts with the tokenizer's BOS token (it is not predicted)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows, "seq_len": self.seq_len,
                "bos": self.bos}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def iter_logits(model: nn.Module, windows: np.ndarray, desc: str = "torch") -> Iterator[np.ndarray]:
    """Float32 logits ``(T, V)`` of each window, one forward pass per window."""
    device = _device(model)
    for row in tqdm(windows, desc=desc, unit="window"):
        ids = torch.from_numpy(np.ascontiguousarray(row))[None].to(device)  # (1, T)
        yield model(input_ids=ids).logits[0].float().cpu().numpy()


@torch.no_grad()
def perplexity(model: nn.Module, windows: np.ndarray, desc: str = "torch ppl", *, progress: bool = True,
               bos: bool = False) -> PplResult:
    """PPL = exp(mean next-token NLL) over ``windows``; ``bos`` records that they start with BOS."""
    total, count = 0.0, 0
    device = _device(model)
    for row in tqdm(windows, desc=desc, unit="window", disable=not progress):
        ids = torch.from_numpy(np.ascontiguousarray(row))[None].to(device)  # (1, T)
        logits = model(input_ids=ids).logits[0, :-1].double()  # (T-1, V)
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    nll = total / count
    return PplResult(math.exp(nll), nll, count, len(windows), windows.shape[1], bos)


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``prompt_ids``, decoded with the model's own KV cache
    (the torch twin of ``runtime.generate`` with temperature 0; no stop ids)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    tokens: list[int] = []
    for _ in range(new_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
