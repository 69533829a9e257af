"""Token generation on ONNX Runtime: the prompt in chunks of at most ``PREFILL_CHUNK`` tokens
(each cached call appends its keys and values), then one cached call per new token.

Works on token ids only (the command line decodes text), so it needs no tokenizer and no torch.
Greedy when ``temperature == 0``; otherwise softmax sampling with optional top-k and top-p
(nucleus) filtering from a seeded numpy generator, so a seed gives the same tokens every run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import RuntimeSetupError
from runtime.session import LMSession

# Prompt tokens per prefill call. One call over a whole prompt holds logits for every position
# (2016 x 49152 float32 = 396 MB for SmolLM2 at 2048 tokens of context) and the activations of
# every token at once; chunks of 256 keep that to 50 MB at about the same time to first token
# (bench/results/memory_runtime.md).
PREFILL_CHUNK = 256


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RuntimeSetupError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RuntimeSetupError(f"temperature={self.temperature} must be 0 (greedy) or a finite positive number")
        if self.top_k < 0:
            raise RuntimeSetupError(f"top_k={self.top_k} must be 0 (off) or positive")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise RuntimeSetupError(f"top_p={self.top_p} must lie in (0, 1]")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # one entry per cached decode call
    stopped: str = ""  # "stop_id", "max_new_tokens" or "context"

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else float("nan")

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "prefill_ms": 1000 * self.prefill_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "stopped": self.stopped,
        }


def pick_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one row of logits ``(V,)``."""
    if sampling.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < z.shape[0]:
        kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < sampling.top_p  # the smallest head whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


def stream(
    sess: LMSession, prompt_ids: Sequence[int], sampling: Sampling, max_positions: int | None = None,
    stats: GenerationStats | None = None, prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield new token ids one at a time. With a KV-cache graph each new token costs one cached
    call (in place on the fused graph's shared buffer, ``LMSession.decoder``); a graph without a
    cache re-runs the whole sequence. Stops at a stop id, after
    ``max_new_tokens``, or at ``max_positions`` (the model's context)."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise RuntimeSetupError("the prompt is empty: give at least one token")
    if max_positions is not None and len(ids) >= max_positions:
        raise RuntimeSetupError(f"the prompt has {len(ids)} tokens, the model's context is {max_positions}: shorten the prompt")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    rng = np.random.default_rng(sampling.seed)
    cached = sess.cache is not None

    # room for the prompt and every new token: the fused graph then updates its cache in place
    capacity = len(ids) + sampling.max_new_tokens
    decoder = sess.decoder(1, capacity if max_positions is None else min(capacity, max_positions)) if cached else None
    t = time.perf_counter()
    if cached:
        for start in range(0, len(ids), prefill_chunk):  # only the last chunk's logits are read
            logits = decoder.step(np.array([ids[start:start + prefill_chunk]]))
    else:
        logits = sess.logits(np.array([ids]))
    stats.prefill_s = time.perf_counter() - t
    stats.stopped = "max_new_tokens"
    while True:
        token = pick_token(logits[0, -1], sampling, rng)
        ids.append(token)
        stats.new_tokens += 1
        yield token
        if token in sampling.stop_ids:
            stats.stopped = "stop_id"
            return
        if stats.new_tokens >= sampling.max_new_tokens:
            return
        if max_positions is not None and len(ids) >= max_positions:
            stats.stopped = "context"
            return
        t = time.perf_counter()
        if cached:
            logits = decoder.step(np.array([[token]]))
        else:
            logits = sess.logits(np.array([ids]))
        stats.decode_s.append(time.perf_counter() - t)


class TextStream:
    """Text of a token stream, piece by piece, in constant time per token.

    Decoding the whole list again for every new token costs O(n) per token (O(n^2) in all). This
    decodes only the tokens since a recent offset: ``push(token)`` decodes
    ``tokens[prefix:]`` and ``tokens[prefix:read]`` and returns what the new token added, holding
    text back while it ends in an incomplete UTF-8 character (U+FFFD); the offsets then move up,
    so each call decodes a handful of tokens. Byte-level BPE tokenizers decode a suffix of tokens
    to the suffix of the text, which is what makes this exact (tests/test_generate.py checks the
    pieces join to ``decode(all tokens)``). ``decode``: a ``tokens -> str`` function.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix = 0  # decode from here ...
        self.read = 0  # ... text up to here was already given out
        self.longest_decode = 0  # the most tokens one call decoded (constant, whatever the length)

    def _decode(self, tokens: list[int]) -> str:
        self.longest_decode = max(self.longest_decode, len(tokens))
        return self.decode(tokens)

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an incomplete character: wait for the next token
        self.prefix, self.read = self.read, len(self.tokens)
        return after[len(before):]

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character as U+FFFD)."""
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return after[len(before):]


def generate(
    sess: LMSession, prompt_ids: Sequence[int], sampling: Sampling, max_positions: int | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    tokens = list(stream(sess, prompt_ids, sampling, max_positions, stats, prefill_chunk))
    return tokens, stats
