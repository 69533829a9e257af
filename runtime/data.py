"""WikiText-2 text and token windows (docs/METHOD.md, the perplexity protocol), BOS-aware.

Evaluation uses the raw test split only; calibration and scale training use the validation
split only. Other text (a ``--data`` spec: files, hub datasets, mixes) is read by
``runtime.sources``, which cuts it into windows here. Text comes from ``datasets`` when no local folder is given, else from a folder
holding ``wiki.test.raw`` and ``wiki.valid.tokens`` (``--data-dir`` or ``SASQ_DATA_DIR``).
Returns numpy arrays and never imports torch, so the device commands can use it too; ``datasets``
is imported only for the hub path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.errors import DataError

DATA_DIR_ENV = "SASQ_DATA_DIR"
SPLITS = {"test": ("wiki.test.raw", "test"), "validation": ("wiki.valid.tokens", "validation")}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    d = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(d).expanduser() if d else None


def _rows_from_lines(lines: list[str]) -> list[str]:
    # the rows datasets' "wikitext-2-raw-v1" yields for the same file
    return [line + "\n" if line.strip() else "" for line in lines]


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, or a one-line error that says where it is not text."""
    try:
        data = path.read_bytes()
    except PermissionError:
        raise DataError(f"no permission to read {path}: check its permissions") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): convert it to UTF-8, "
                        "or pass a text file") from None
    if "\x00" in text:
        raise DataError(f"{path} holds NUL bytes: it is a binary file, not text") from None
    if not text.strip():
        raise DataError(f"{path} is empty: it holds no text to evaluate or calibrate on")
    return text


def load_text(split: str, data_dir: str | os.PathLike | None = None) -> str:
    """The evaluation (``test``) or training (``validation``) text, rows joined with ``"\\n\\n"``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use 'test' (evaluation) or 'validation' (calibration, training)")
    filename, hf_split = SPLITS[split]
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        path = folder / filename
        if not path.is_file():
            raise DataError(f"{path} not found: --data-dir / {DATA_DIR_ENV} must name a folder holding {filename}")
        rows = _rows_from_lines(read_text_file(path).splitlines())
    else:
        try:
            import datasets
        except ImportError:
            raise DataError(f"no local WikiText-2 folder given and the datasets package is not installed: pass --data-dir "
                            f"or set {DATA_DIR_ENV} to a folder holding wiki.test.raw and wiki.valid.tokens") from None
        try:
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"]
        except Exception as e:  # the hub is unreachable, or datasets failed: say how to go offline
            raise DataError(
                f"WikiText-2 could not be loaded from the hub ({type(e).__name__}): pass --data-dir or set "
                f"{DATA_DIR_ENV} to a folder holding wiki.test.raw and wiki.valid.tokens"
            ) from None
    return "\n\n".join(rows)


def tokenize(text: str, tokenizer, *, special_tokens: bool = True) -> np.ndarray:
    """Token ids of the whole text, ``(N,)`` int64: as the tokenizer encodes it by default, or
    without the special tokens its post-processor adds (``special_tokens=False``; a special token
    written in the text, such as a chat template's ``<|im_start|>``, still maps to its id).
    ``tokenizer``: a transformers tokenizer or a ``tokenizers.Tokenizer`` (the device side)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        ids = tokenizer.encode(text, add_special_tokens=special_tokens).ids
    else:
        ids = tokenizer(text, add_special_tokens=special_tokens, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def _token_id(tokenizer, token) -> int | None:
    """The id of a token given as tokenizer_config.json writes it (a string or ``{"content": ...}``)."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.token_to_id(token)
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) else None


def bos_id(tokenizer, tokenizer_config: dict | None = None) -> int | None:
    """The token every window starts with, or None (docs/METHOD.md, the perplexity protocol): the BOS
    token when the tokenizer prepends it by default (its post-processor: ``tokenizer("x")`` starts
    with one token more than the text's own, as Llama-2/3 and Gemma do), or when
    ``tokenizer_config`` (the ``tokenizer_config.json`` beside it) says ``add_bos_token: true``
    (llama.cpp reads that flag; transformers 5 ignores it when a ``tokenizer.json`` is present).
    The same rule on both sides, for a transformers tokenizer and a ``tokenizers.Tokenizer``."""
    with_special = tokenize("x", tokenizer).tolist()
    plain = tokenize("x", tokenizer, special_tokens=False).tolist()
    if len(with_special) == len(plain) + 1 and with_special[1:] == plain:
        return int(with_special[0])
    cfg = tokenizer_config or {}
    if cfg.get("add_bos_token") is True:
        tid = _token_id(tokenizer, cfg.get("bos_token"))
        if tid is None:
            tid = getattr(tokenizer, "bos_token_id", None)
        if tid is None:
            raise DataError("tokenizer_config.json says add_bos_token, but names no bos_token this tokenizer knows: "
                            "set bos_token there, or remove add_bos_token")
        return int(tid)
    return None


def make_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None, *, bos: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``(W, seq_len)``, tail dropped, the first ``max_windows`` kept.
    With ``bos``, each window is ``bos`` followed by the next ``seq_len - 1`` tokens (``tokens``
    then hold no BOS of their own), so every window still predicts ``seq_len - 1`` text tokens."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} must be at least 2 to predict a token")
    step = seq_len - 1 if bos is not None else seq_len
    n = tokens.shape[0] // step
    if tokens.shape[0] == 0:
        raise DataError("the text gives no tokens: check the data file")
    if n == 0:
        raise DataError(f"the text has {tokens.shape[0]} tokens, fewer than the {step} a window of seq_len={seq_len} "
                        "needs: use a shorter --seq-len or more text")
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"--max-windows {max_windows} must be at least 1")
        n = min(n, max_windows)
    body = tokens[: n * step].reshape(n, step)
    if bos is None:
        return body
    return np.concatenate([np.full((n, 1), bos, dtype=body.dtype), body], axis=1)


def text_windows(text: str, tokenizer, seq_len: int, max_windows: int | None = None, *, bos: int | None = None) -> np.ndarray:
    """``make_windows`` of the text tokenized without special tokens, BOS first where ``bos``
    (``bos_id``). For a tokenizer that adds nothing by default these are the windows of
    ``make_windows(tokenize(text, tokenizer), seq_len)``, unchanged."""
    return make_windows(tokenize(text, tokenizer, special_tokens=False), seq_len, max_windows, bos=bos)


def check_context(seq_len: int, max_positions: int | None) -> None:
    if max_positions is not None and seq_len > max_positions:
        raise DataError(
            f"seq_len={seq_len} exceeds the model's context of {max_positions} tokens: use --seq-len {max_positions} or less"
        )


def sample_windows(windows: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` distinct windows chosen with a seeded generator (all of them if fewer)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(windows.shape[0])[: min(count, windows.shape[0])]
    return windows[np.sort(idx)]
