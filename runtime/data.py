"""WikiText-2 text and token windows (DESIGN.md, "Perplexity protocol").

Evaluation uses the raw test split only; calibration and scale training use the validation
split only. Text comes from ``datasets`` when no local folder is given, else from a folder
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


def tokenize(text: str, tokenizer) -> np.ndarray:
    """Token ids of the whole text, as the tokenizer encodes it by default, ``(N,)`` int64.
    ``tokenizer``: a transformers tokenizer or a ``tokenizers.Tokenizer`` (the device side)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        ids = tokenizer.encode(text).ids
    else:
        ids = tokenizer(text, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def make_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``(W, seq_len)``, tail dropped, the first ``max_windows`` kept."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} must be at least 2 to predict a token")
    n = tokens.shape[0] // seq_len
    if tokens.shape[0] == 0:
        raise DataError("the text gives no tokens: check the data file")
    if n == 0:
        raise DataError(f"the text has {tokens.shape[0]} tokens, fewer than seq_len={seq_len}: use a shorter --seq-len")
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"--max-windows {max_windows} must be at least 1")
        n = min(n, max_windows)
    return tokens[: n * seq_len].reshape(n, seq_len)


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
