"""The ``--data`` grammar: one spec, a source or a weighted mix, parsed into ``Source`` parts
(nothing read; local paths must exist). Reading them is ``runtime.readers``; windows and mixes
``runtime.sources``.

A spec is one source or a weighted mix, ``[W*]SOURCE[,[W*]SOURCE...]``, each source one of:

- ``wikitext2``: the WikiText-2 protocol, the validation split for calibration and training, the
  raw test split for evaluation (``runtime.data.load_text``; ``--data-dir`` or the hub);
- ``hf:NAME:CONFIG:SPLIT[:COLUMN]``: a ``datasets`` id (or a local dataset folder), CONFIG may be
  empty (``hf:NAME::train``), SPLIT is required and may slice (``train[:2000]``);
- ``PATH[:COLUMN]``: a ``.txt`` file (any other suffix is read as text too), a ``.jsonl`` /
  ``.json`` / ``.parquet`` file, or a folder of ``.txt``/``.jsonl``/``.json``/``.parquet`` files;
- ``self:N[:temperature=T][:top_k=K][:seed=S]``: N sequences of ``seq_len`` tokens sampled from
  the float model (calibration only; the method side generates and caches them).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from runtime.data import SPLITS
from runtime.errors import DataError

DEFAULT_SPEC = "wikitext2"
# What sasq-export and sasq-train calibrate and train on when no --data is given: half WikiText-2
# validation, half text sampled from the float model itself (self:32, cached after the first run).
# Distillation on this mix measured best on the held-out text of domains none of it comes from
# (bench/results/quality_smollm2.md: code and docs), ahead of WikiText alone and sampled text alone.
DEFAULT_CALIBRATION_SPEC = "0.5*wikitext2,0.5*self:32"
CALIBRATION, EVALUATION = "calibration", "evaluation"


def default_spec_for(windows: int) -> str:
    """The default mix for a run that reads only ``windows`` windows of it (the block-wise pass read
    layer by layer): the same halves, with only as many sampled sequences as its half takes
    (sampling them is most of the data's cost)."""
    return f"0.5*wikitext2,0.5*self:{max(1, math.ceil(windows / 2))}"


TEXT_SUFFIXES, JSON_SUFFIXES, PARQUET_SUFFIXES = (".txt",), (".jsonl", ".json"), (".parquet",)
FOLDER_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
SELF_OPTIONS = ("temperature", "top_k", "seed")
SYNTAX = ("wikitext2, hf:NAME:CONFIG:SPLIT[:COLUMN], self:N, a .txt/.jsonl/.json/.parquet file or a folder of them "
          "(FILE:COLUMN for a column), or a mix such as 0.5*wikitext2,0.5*self:64")


@dataclass(frozen=True)
class Source:
    """One part of a spec. ``spec`` is its text as given (weight left out)."""

    kind: str  # "wikitext2" | "hf" | "file" | "self"
    spec: str
    weight: float = 1.0
    path: str | None = None  # file: the file or folder; hf: the dataset id or folder
    config: str | None = None  # hf
    split: str | None = None  # hf
    column: str | None = None  # file, hf
    count: int = 0  # self: sequences
    temperature: float = 1.0  # self
    top_k: int = 0  # self: 0 = the whole distribution
    seed: int = 0  # self


@dataclass(frozen=True)
class DataSpec:
    text: str
    sources: tuple[Source, ...]


def folder_files(folder: Path) -> list[Path]:
    """The files of a folder source: those with a suffix of ``FOLDER_SUFFIXES``, hidden ones left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))



def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside square brackets (a split such as ``train[:10%]``)."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth <= 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _weight(text: str, part: str) -> float:
    try:
        w = float(text)
    except ValueError:
        w = math.nan
    if not math.isfinite(w) or w <= 0:
        raise DataError(f"bad weight {text.strip()!r} in --data part {part!r}: a weight is a positive number, as in "
                        "0.5*wikitext2,0.5*self:64")
    return w


def _int_option(key: str, value: str, low: int, spec: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = low - 1
    if n < low:
        raise DataError(f"{spec}: {key}={value!r} must be an integer of at least {low}")
    return n


def _self_source(body: str, rest: str, weight: float) -> Source:
    fields = rest.split(":")
    count = _int_option("N", fields[0], 1, body) if fields[0] else 0
    if count < 1:
        raise DataError(f"{body}: self:N needs the number of sequences to sample, N >= 1, as in self:64")
    opts: dict = {}
    for item in fields[1:]:
        key, eq, value = item.partition("=")
        if not eq or key not in SELF_OPTIONS:
            raise DataError(f"{body}: unknown self option {item!r}: use {', '.join(k + '=' for k in SELF_OPTIONS)} "
                            "as in self:64:temperature=0.8:top_k=50:seed=1")
        if key == "temperature":
            try:
                t = float(value)
            except ValueError:
                t = math.nan
            if not math.isfinite(t) or t <= 0:
                raise DataError(f"{body}: temperature={value!r} must be a positive number, as in self:64:temperature=0.8")
            opts[key] = t
        else:
            opts[key] = _int_option(key, value, 0, body)
    return Source("self", body, weight, count=count, **opts)


def _hf_source(body: str, rest: str, weight: float) -> Source:
    fields = _split_top(rest, ":")
    if len(fields) < 3 or len(fields) > 4 or not fields[0] or not fields[2]:
        raise DataError(f"{body}: write a datasets source as hf:NAME:CONFIG:SPLIT[:COLUMN] (CONFIG may be empty: "
                        "hf:NAME::train): the split is required, so calibration never reads a split you did not choose")
    column = fields[3] if len(fields) == 4 and fields[3] else None
    return Source("hf", body, weight, path=fields[0], config=fields[1] or None, split=fields[2], column=column)


def _file_source(path: Path, column: str | None, body: str, weight: float) -> Source:
    if path.is_dir():
        if not folder_files(path):
            hint = " (a WikiText-2 folder is read with --data wikitext2 --data-dir FOLDER)" if (path / SPLITS["test"][0]).is_file() else ""
            raise DataError(f"{path} holds no {', '.join(FOLDER_SUFFIXES)} file: put the text files there, or name a file{hint}")
    elif column is not None and path.suffix.lower() not in JSON_SUFFIXES + PARQUET_SUFFIXES:
        raise DataError(f"{path} is read as plain text, which has no columns: drop ':{column}' (columns are for .jsonl, "
                        ".json and .parquet files)")
    return Source("file", body, weight, path=str(path), column=column)


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith((".", "~")) or Path(text).suffix.lower() in FOLDER_SUFFIXES


def _source(body: str, weight: float) -> Source:
    if body == "wikitext2":
        return Source("wikitext2", body, weight)
    path = Path(body).expanduser()
    if path.exists():
        return _file_source(path, None, body, weight)
    kind, sep, rest = body.partition(":")
    if sep and kind == "hf":
        return _hf_source(body, rest, weight)
    if sep and kind == "self":
        return _self_source(body, rest, weight)
    head, sep, column = body.rpartition(":")
    if sep and head and column and Path(head).expanduser().exists():
        return _file_source(Path(head).expanduser(), column, body, weight)
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_+-]*", kind):
        raise DataError(f"unknown data source kind {kind + ':'!r} in {body!r}: use {SYNTAX}")
    if _looks_like_path(body) or (sep and _looks_like_path(head)):
        missing = head if sep and _looks_like_path(head) else body
        raise DataError(f"--data: no such file or folder {missing!r}: check the path")
    raise DataError(f"unknown data source {body!r}: use {SYNTAX}")


def parse_data_spec(text: str) -> DataSpec:
    """Parse ``--data`` (syntax in the module docstring); local paths must exist. Nothing is read."""
    text = (text or "").strip()
    if not text:
        raise DataError(f"--data is empty: use {SYNTAX}")
    parts = [text] if Path(text).expanduser().exists() else _split_top(text, ",")
    sources = []
    for part in parts:
        part = part.strip()
        if not part:
            raise DataError(f"--data {text!r} has an empty part: separate sources with single commas")
        weight, body = 1.0, part
        if "*" in part and not Path(part).expanduser().exists():
            wtext, body = part.split("*", 1)
            weight, body = _weight(wtext, part), body.strip()
        sources.append(_source(body, weight))
    return DataSpec(text, tuple(sources))


