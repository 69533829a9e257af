"""The method's side of the data (docs/DATA.md): what needs a transformers tokenizer or the
torch model. Chat rows are rendered with the tokenizer's chat template; ``self:N`` samples text
from the float model itself (data-free calibration, LLM-QAT: Liu et al. 2023, "LLM-QAT: Data-Free
Quantization Aware Training for Large Language Models", section 2.1), cached on disk so it is
generated once; ``load_windows(lm, spec, ...)`` reads any ``--data`` spec (``runtime.sources``)
with both, BOS-aware (``runtime.data.bos_id``)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from runtime.data import bos_id
from runtime.io import atomic_path, atomic_write_text
from runtime.sources import DataSpec, Render, Source, WindowSet
from runtime.sources import load_windows as _load_windows
from sasq_edge.errors import DataError

SELFGEN_VERSION = 1  # bump when the sampling procedure changes: old cache entries are then not reused
SELFGEN_BATCH = 8  # sequences sampled together


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- the tokenizer --------------------------------------------------------------------------------


def tokenizer_config_of(tokenizer) -> dict:
    """``tokenizer_config.json`` of the folder or hub id a transformers tokenizer was loaded from
    (the hub's only from the local cache), or ``{}``: transformers 5 drops its ``add_bos_token``
    when a ``tokenizer.json`` is present, so ``bos_of`` reads the file itself."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name:
        return {}
    folder = Path(name).expanduser()
    path = folder / "tokenizer_config.json" if folder.is_dir() else None
    if path is None and not name.startswith((".", "/", "~")) and name.count("/") <= 1:
        from huggingface_hub import try_to_load_from_cache

        try:
            hit = try_to_load_from_cache(name, "tokenizer_config.json")
        except ValueError:  # not a valid repo id
            hit = None
        path = Path(hit) if isinstance(hit, str) else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def bos_of(tokenizer) -> int | None:
    """The BOS id windows start with for this transformers tokenizer (``runtime.data.bos_id``)."""
    return bos_id(tokenizer, tokenizer_config_of(tokenizer))


def honour_add_bos(tokenizer) -> None:
    """Make a tokenizer whose ``tokenizer_config.json`` says ``add_bos_token: true`` add it, where
    transformers ignored the flag (it does when a ``tokenizer.json`` is present): windows,
    prompts and the tokenizer an export writes then all start with BOS, as the config says."""
    if tokenizer_config_of(tokenizer).get("add_bos_token") is not True or getattr(tokenizer, "bos_token", None) is None:
        return
    if bos_id(tokenizer) is None and hasattr(type(tokenizer), "add_bos_token"):
        tokenizer.add_bos_token = True  # transformers' own switch: rebuilds the post-processor


def chat_renderer(tokenizer, model_name: str) -> Render:
    """``render(messages) -> text`` with the tokenizer's chat template; refuses in one line when
    there is none (called only when the data holds chat rows)."""

    def render(chat: list) -> str:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"the data holds chat rows (messages), but the tokenizer of {model_name} has no chat template: "
                            "use an instruct model, whose tokenizer has one, or give plain text (a 'text' column, .txt files)")
        try:
            return tokenizer.apply_chat_template(chat, tokenize=False)
        except Exception as e:  # jinja2's TemplateError (roles that must alternate, ...), raised by the template
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(f"the chat template of {model_name} refused a chat row ({first}); first message: "
                            f"{json.dumps(chat[0])[:120]}") from None

    return render


# --- text sampled from the float model --------------------------------------------------------------


def selfgen_dir() -> Path:
    """Where sampled text is cached: ``$XDG_CACHE_HOME/sasq-edge/selfgen`` (``~/.cache/...``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sasq-edge" / "selfgen"


def weights_sample_digest(model: nn.Module) -> str:
    """A cheap digest of the weights (every tensor's name, shape and up to 4096 strided values):
    two checkpoints of one architecture (one ``model_fingerprint``), or the float32 and the bf16
    sampler of one checkpoint (the dtype is hashed), get different cache entries."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def selfgen_settings(source: Source, seq_len: int, bos: int | None) -> dict:
    return {"version": SELFGEN_VERSION, "count": source.count, "seq_len": seq_len, "bos": bos,
            "temperature": source.temperature, "top_k": source.top_k, "seed": source.seed}


def selfgen_path(model: nn.Module, settings: dict) -> Path:
    """The cache file of these settings for this model: ``<model_fingerprint>-<digest>.npy``, the
    digest over the settings and ``weights_sample_digest``."""
    from sasq_edge.state import model_fingerprint

    key = json.dumps({**settings, "weights": weights_sample_digest(model)}, sort_keys=True)
    return selfgen_dir() / f"{model_fingerprint(model)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


def first_tokens(tokenizer, vocab_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` first tokens drawn uniformly from the vocabulary, special tokens left out, ``(count,)``."""
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(len(tokenizer), vocab_size)) if i not in special], dtype=torch.long)
    return pool[torch.randint(0, pool.numel(), (count,), generator=generator)]


@torch.no_grad()
def sample_sequences(model: nn.Module, prefix: torch.Tensor, length: int, *, temperature: float = 1.0, top_k: int = 0,
                     vocab: int | None = None, generator: torch.Generator, batch_size: int = SELFGEN_BATCH,
                     progress: bool = True) -> np.ndarray:
    """Continue each row of ``prefix`` ``(N, p)`` to ``length`` tokens by sampling from the model's
    next-token distribution (``temperature``; ``top_k`` > 0 keeps the k likeliest; ids from
    ``vocab`` on are never drawn), with its KV cache; EOS does not stop a row. ``(N, length)`` int64."""
    device = next(model.parameters()).device
    rows = []
    for start in tqdm(range(0, prefix.shape[0], batch_size), desc="self-generate", unit="batch", disable=not progress):
        ids = prefix[start:start + batch_size]  # (B, p)
        out = model(input_ids=ids.to(device), use_cache=True)
        while ids.shape[1] < length:
            logits = out.logits[:, -1].float().cpu() / temperature  # (B, V)
            if vocab is not None and vocab < logits.shape[-1]:
                logits[:, vocab:] = -torch.inf
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -torch.inf)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
            ids = torch.cat([ids, nxt], dim=1)
            if ids.shape[1] < length:
                out = model(input_ids=nxt.to(device), past_key_values=out.past_key_values, use_cache=True)
        rows.append(ids)
    return torch.cat(rows).numpy().astype(np.int64)


def _read_cache(path: Path, settings: dict) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # a damaged entry is sampled again
    if tokens.shape != (settings["count"], settings["seq_len"]) or tokens.dtype != np.int64:
        return None
    return tokens


def self_windows(lm, source: Source, seq_len: int, bos: int | None, *, progress: bool = True,
                 log: Callable[[str], None] = _stderr) -> tuple[np.ndarray, dict]:
    """``source.count`` windows of ``seq_len`` tokens sampled from the float model ``lm.model``:
    BOS (when windows start with it), a first token drawn uniformly from the vocabulary, then
    sampling; seeded by ``source.seed``. Cached under ``selfgen_dir()``: a later call with the same
    model and settings reads the cache and says so."""
    settings = selfgen_settings(source, seq_len, bos)
    path = selfgen_path(lm.model, settings)
    dtype = next(lm.model.parameters()).dtype
    sampler = "the float model" if dtype == torch.float32 else f"the float model in {str(dtype).removeprefix('torch.')}"
    what = (f"{source.count} sequences sampled from {sampler} (temperature {source.temperature:g}"
            + (f", top_k {source.top_k}" if source.top_k else "") + f", seed {source.seed})")
    tokens = _read_cache(path, settings)
    if tokens is not None:
        log(f"{source.spec}: reused {source.count} sampled sequences of {seq_len} tokens from the cache {path}")
        return tokens, {"read": what, "cache": str(path), "reused": True}
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(source.seed)
    vocab = min(len(lm.tokenizer), lm.model.config.vocab_size)
    first = first_tokens(lm.tokenizer, vocab, source.count, gen)[:, None]  # (N, 1)
    prefix = torch.cat([torch.full_like(first, bos), first], dim=1) if bos is not None else first
    if prefix.shape[1] > seq_len:
        raise DataError(f"{source.spec}: seq_len={seq_len} leaves no room for sampled tokens: use a longer --seq-len")
    training = lm.model.training
    lm.model.eval()
    try:
        tokens = sample_sequences(lm.model, prefix, seq_len, temperature=source.temperature, top_k=source.top_k,
                                  vocab=vocab, generator=gen, progress=progress)
    finally:
        lm.model.train(training)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [lm.tokenizer.decode(row) for row in tokens]
    atomic_write_text(path.with_suffix(".json"), json.dumps({**settings, "model": lm.source, "texts": texts}, indent=1))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
    log(f"{source.spec}: sampled {source.count} sequences of {seq_len} tokens from {sampler} in "
        f"{time.perf_counter() - t0:.1f} s; cached in {path} (later runs reuse it)")
    return tokens, {"read": what, "cache": str(path), "reused": False}


# --- any spec -------------------------------------------------------------------------------------


def load_windows(lm, spec: str | DataSpec, seq_len: int, role: str, *, data_dir: str | os.PathLike | None = None,
                 max_windows: int | None = None, seed: int = 0, progress: bool = True,
                 log: Callable[[str], None] = _stderr) -> WindowSet:
    """The windows of a ``--data`` spec for ``lm`` (``runtime.sources.load_windows``), with chat
    rows rendered by its chat template and ``self`` sources sampled from ``lm.model`` (which must
    still be the float model)."""

    def generate(source: Source, length: int, bos: int | None):
        return self_windows(lm, source, length, bos, progress=progress, log=log)

    return _load_windows(spec, lm.tokenizer, seq_len, role, bos=bos_of(lm.tokenizer), data_dir=data_dir,
                         max_windows=max_windows, seed=seed, render=chat_renderer(lm.tokenizer, lm.source), generate=generate)
