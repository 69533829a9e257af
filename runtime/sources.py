"""Where calibration and evaluation text comes from: one ``--data`` spec, parsed, read and cut
into windows here (docs/DATA.md). The device side: the standard library and numpy;
``datasets`` only lazily, for hub ids and ``.parquet`` files. What needs the torch model (text
sampled from it, ``self:N``) or a transformers tokenizer (chat templates) is passed in by the
method (``sasq_edge.data``) as two callables, so the device commands read ``.txt`` and
``.jsonl`` without either.

A spec is one source or a weighted mix, ``[W*]SOURCE[,[W*]SOURCE...]``, each source one of:

- ``wikitext2``: the WikiText-2 protocol, the validation split for calibration and training, the
  raw test split for evaluation (``runtime.data.load_text``; ``--data-dir`` or the hub);
- ``hf:NAME:CONFIG:SPLIT[:COLUMN]``: a ``datasets`` id (or a local dataset folder), CONFIG may be
  empty (``hf:NAME::train``), SPLIT is required and may slice (``train[:2000]``);
- ``PATH[:COLUMN]``: a ``.txt`` file (any other suffix is read as text too), a ``.jsonl`` /
  ``.json`` / ``.parquet`` file, or a folder of ``.txt``/``.jsonl``/``.json``/``.parquet`` files;
- ``self:N[:temperature=T][:top_k=K][:seed=S]``: N sequences of ``seq_len`` tokens sampled from
  the float model (calibration only; the method side generates and caches them).

A COLUMN names a text column, a column of chat ``messages`` (lists of ``{role, content}``), or
``PROMPT+RESPONSE`` columns made into a user/assistant chat; without one, ``text`` is used, else
``messages``, else the first of the prompt/response pairs in ``CHAT_PAIRS`` the rows have.
Documents (a text file, a row, a rendered chat) are joined with ``"\\n\\n"``, tokenized once per
source and cut into non-overlapping windows (``runtime.data.make_windows``, BOS-aware).

Mixes: each source is cut into its own windows; with the weights normalised to sum 1, source i
gives ``n_i = floor(w_i * T)`` windows, where ``T = min_j(available_j / w_j)`` is the largest total
the sources fill in that proportion (the scarcest source gives all its windows). A source with more
windows than that gives a seeded sample of them, kept in text order. The mix interleaves the
sources by weighted round robin, so every prefix of it (``--max-windows``) holds each source's
share to within one window (calibration samples its windows from the mix, and training draws
batches uniformly from it: there the shares hold in expectation).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.data import DATA_DIR_ENV, SPLITS, load_text, make_windows, read_text_file, resolve_data_dir, tokenize
from runtime.errors import DataError
from runtime.io import parse_json

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
CHAT_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "output"), ("question", "answer"))
DOC_SEP = "\n\n"  # between documents, as between WikiText-2's rows
SELF_OPTIONS = ("temperature", "top_k", "seed")
SYNTAX = ("wikitext2, hf:NAME:CONFIG:SPLIT[:COLUMN], self:N, a .txt/.jsonl/.json/.parquet file or a folder of them "
          "(FILE:COLUMN for a column), or a mix such as 0.5*wikitext2,0.5*self:64")

Chat = list  # [{"role": ..., "content": ...}, ...]
Render = Callable[[Chat], str]


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


@dataclass
class Documents:
    """What one source gave: texts and chats, in order, and one line saying what was read."""

    items: list = field(default_factory=list)  # str | Chat
    read: str = ""
    origin: str | None = None  # where it came from, when ``read`` does not say

    @property
    def chats(self) -> int:
        return sum(not isinstance(d, str) for d in self.items)

    def text(self, render: Render | None, where: str) -> str:
        if self.chats and render is None:
            raise DataError(f"{where} holds chat rows, which are rendered with the model's chat template: the device side "
                            "has none; evaluate them with sasq-validate (the transformers tokenizer), or give plain text")
        return DOC_SEP.join(d if isinstance(d, str) else render(d) for d in self.items)


@dataclass
class WindowSet:
    """The windows of a spec, ``(W, seq_len)`` int64, the BOS id they start with (or None), and
    the record of what was read (for results and recipe.json's ``training``)."""

    windows: np.ndarray
    bos: int | None
    record: dict

    @property
    def text(self) -> str:
        return record_text(self.record)

    def summary(self) -> str:
        return record_summary(self.record)


def record_text(record: dict) -> str:
    """One line: what a ``WindowSet.record`` read, e.g. ``wikitext2 validation``."""
    parts = record["sources"]
    if len(parts) == 1:
        return parts[0]["read"]
    return " + ".join(f"{p['weight']:.3g}*{p['read']} [{p['windows']} windows]" for p in parts)


def record_summary(record: dict) -> str:
    bos = ", BOS first" if record.get("bos") else ""
    return f"data: {record_text(record)}: {record['windows']} windows of {record['seq_len']} tokens{bos}"


# --- parsing --------------------------------------------------------------------------------------


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
        if not _folder_files(path):
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


# --- reading --------------------------------------------------------------------------------------


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class _Table:
    """Rows with named columns: ``columns`` (in first-seen order) and ``column(name)`` (a list)."""

    def __init__(self, columns: Sequence[str], get: Callable[[str], list]):
        self.columns, self._get = list(columns), get

    def column(self, name: str) -> list:
        return self._get(name)


def _rows_table(rows: list[dict]) -> _Table:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return _Table(columns, lambda name: [r.get(name) for r in rows])


def _dataset_table(ds) -> _Table:
    return _Table(ds.column_names, lambda name: list(ds[name]))


def _json_table(path: Path) -> _Table:
    text = read_text_file(path)
    if path.suffix.lower() == ".json":
        try:
            data = parse_json(text)
        except json.JSONDecodeError:
            data = None  # not one JSON value: read it as JSON lines
        if isinstance(data, dict):
            raise DataError(f"{path} holds one JSON object: a .json file must hold a list of rows (objects) or JSON lines")
        if isinstance(data, list):
            bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DataError(f"row {bad} of {path} is a JSON {type(data[bad]).__name__}, not an object with columns")
            return _rows_table(data)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {i} of {path} is not valid JSON ({e.msg}): a .jsonl file holds one JSON object a line") from None
        if not isinstance(row, dict):
            raise DataError(f"line {i} of {path} is a JSON {type(row).__name__}, not an object with columns")
        rows.append(row)
    return _rows_table(rows)


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} is read with the datasets package, which this install lacks: pip install datasets "
                        "(or 'sasq-edge[train]'), or give the text as .txt or .jsonl files") from None
    return datasets


def _parquet_table(path: Path) -> _Table:
    datasets = _datasets(f"{path} (.parquet)")
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # pyarrow raises its own errors on a damaged file
        raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}: {_first_line(e)})") from None
    return _dataset_table(ds)


def _hf_table(source: Source) -> _Table:
    datasets = _datasets(source.spec)
    try:
        ds = datasets.load_dataset(source.path, source.config, split=source.split)
    except Exception as e:  # datasets raises many kinds: a missing id, config or split, no network
        raise DataError(f"{source.spec}: datasets could not load {source.path!r} (config {source.config!r}, split "
                        f"{source.split!r}): {type(e).__name__}: {_first_line(e)}; check the id, config and split, or, "
                        "offline, save the rows as a local .jsonl or .parquet file and pass its path") from None
    return _dataset_table(ds)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _chat(value, where: str, row: int) -> Chat:
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"row {row} of {where} holds a list that is not chat messages: each message must be "
                        '{"role": ..., "content": "text"}')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _pair_chats(table: _Table, user: str, assistant: str) -> list:
    extra = table.column("input") if user == "instruction" and "input" in table.columns else None
    out = []
    for i, (u, a) in enumerate(zip(table.column(user), table.column(assistant), strict=True)):
        if u is None and a is None:
            continue
        if extra is not None and isinstance(extra[i], str) and extra[i].strip():
            u = f"{u}{DOC_SEP}{extra[i]}"
        out.append([{"role": "user", "content": str(u or "")}, {"role": "assistant", "content": str(a or "")}])
    return out


def _column_items(table: _Table, column: str | None, where: str) -> tuple[list, str]:
    """The documents of one table and the column(s) they came from."""
    cols = table.columns
    listed = ", ".join(cols) if cols else "none (no rows)"
    if column is None:
        pair = next((p for p in CHAT_PAIRS if p[0] in cols and p[1] in cols), None)
        if "text" in cols:
            column = "text"
        elif "messages" in cols:
            column = "messages"
        elif pair is not None:
            column = "+".join(pair)
        else:
            raise DataError(f"{where} has no 'text' column: its columns are {listed}; name the text (or chat "
                            "'messages') column as FILE:COLUMN, or PROMPT+RESPONSE columns as FILE:PROMPT+RESPONSE")
    if "+" in column:
        user, _, assistant = column.partition("+")
        for c in (user, assistant):
            if c not in cols:
                raise DataError(f"{where} has no column {c!r}: its columns are {listed}")
        return _pair_chats(table, user, assistant), column
    if column not in cols:
        raise DataError(f"{where} has no column {column!r}: its columns are {listed}")
    items = []
    for i, v in enumerate(table.column(column)):
        if v is None:
            continue
        if isinstance(v, str):
            items.append(v)
        elif isinstance(v, list):
            if v:
                items.append(_chat(v, where, i))
        else:
            raise DataError(f"column {column!r} of {where} holds {type(v).__name__} values (row {i}), not text or chat "
                            f"messages: name a text column, its columns are {listed}")
    return items, column


def _has_text(items: list) -> bool:
    return any(d.strip() if isinstance(d, str) else True for d in items)


def _describe(what: str, column: str | None, items: list) -> str:
    chats = sum(not isinstance(d, str) for d in items)
    kind = f"{chats} chats" if chats == len(items) else f"{len(items)} rows" + (f", {chats} chats" if chats else "")
    return f"{what} ({kind}, column {column!r})" if column else what


def read_source(source: Source, role: str, data_dir: str | os.PathLike | None = None) -> Documents:
    """The documents of one source (not ``self``). ``role``: ``calibration`` or ``evaluation``
    (``wikitext2`` reads its validation or its test split)."""
    if source.kind == "wikitext2":
        split = "validation" if role == CALIBRATION else "test"
        folder = resolve_data_dir(data_dir)
        origin = str(folder / SPLITS[split][0]) if folder is not None else "the hub (datasets)"
        return Documents([load_text(split, data_dir)], f"wikitext2 {split}", origin)
    if source.kind == "hf":
        items, column = _column_items(_hf_table(source), source.column, source.spec)
        what = f"hf {source.path}" + (f" {source.config}" if source.config else "") + f" {source.split}"
        docs = Documents(items, _describe(what, column, items))
    elif source.kind == "file":
        path = Path(source.path)
        files = _folder_files(path) if path.is_dir() else [path]
        items, columns = [], []
        for f in files:
            suffix = f.suffix.lower()
            if suffix in JSON_SUFFIXES + PARQUET_SUFFIXES:
                table = _json_table(f) if suffix in JSON_SUFFIXES else _parquet_table(f)
                got, col = _column_items(table, source.column, str(f))
                items += got
                columns.append(col)
            else:
                items.append(read_text_file(f))
        what = f"{len(files)} files in {path}" if path.is_dir() else str(path)
        column = ",".join(dict.fromkeys(columns)) or None
        docs = Documents(items, _describe(what, column, items) if column else what)
    else:
        raise DataError(f"{source.spec}: a {source.kind} source is not read from files")
    if not _has_text(docs.items):
        raise DataError(f"{source.spec} gives no text ({docs.read}): every row is empty; check the file or the column")
    return docs


# --- windows and mixes ----------------------------------------------------------------------------


def mix_counts(weights: Sequence[float], available: Sequence[int], names: Sequence[str]) -> list[int]:
    """Windows each source gives to a mix (module docstring): ``n_i = floor(w_i * T)`` with the
    weights normalised and ``T = min_j(available_j / w_j)``."""
    total = sum(weights)
    w = [x / total for x in weights]
    t = min(a / x for a, x in zip(available, w, strict=True))
    counts = [min(a, int(math.floor(x * t + 1e-9))) for a, x in zip(available, w, strict=True)]
    scarce = min(range(len(w)), key=lambda j: available[j] / w[j])
    for i, c in enumerate(counts):
        if c == 0:
            raise DataError(f"the mix gives {names[i]} no window at weight {w[i]:.3g}: {names[scarce]} has only "
                            f"{available[scarce]} windows, too few to fill the mix in this proportion; give it more text, "
                            "or change the weights")
    return counts


def interleave(counts: Sequence[int]) -> list[int]:
    """The source of each position of a mix (weighted round robin): at each position the source
    furthest behind its share; every prefix holds each share to within one window."""
    total, taken, order = sum(counts), [0] * len(counts), []
    for pos in range(total):
        i = max((j for j in range(len(counts)) if taken[j] < counts[j]),
                key=lambda j: ((pos + 1) * counts[j] / total - taken[j], -j))
        taken[i] += 1
        order.append(i)
    return order


def mix_windows(parts: Sequence[np.ndarray], weights: Sequence[float], names: Sequence[str],
                seed: int) -> tuple[np.ndarray, list[int]]:
    """The windows of a mix and the part each window came from. One part: its windows as they are."""
    if len(parts) == 1:
        return parts[0], [0] * parts[0].shape[0]
    counts = mix_counts(weights, [p.shape[0] for p in parts], names)
    chosen = []
    for i, (p, c) in enumerate(zip(parts, counts, strict=True)):
        idx = np.arange(p.shape[0]) if c == p.shape[0] else np.sort(np.random.default_rng([seed, i]).permutation(p.shape[0])[:c])
        chosen.append(p[idx])
    order = interleave(counts)
    cursor = [0] * len(parts)
    rows = []
    for i in order:
        rows.append(chosen[i][cursor[i]])
        cursor[i] += 1
    return np.stack(rows), order


Generate = Callable[[Source, int, "int | None"], "tuple[np.ndarray, dict]"]


def load_windows(spec: DataSpec | str, tokenizer, seq_len: int, role: str, *, bos: int | None,
                 data_dir: str | os.PathLike | None = None, max_windows: int | None = None, seed: int = 0,
                 render: Render | None = None, generate: Generate | None = None) -> WindowSet:
    """The windows of ``spec`` for ``role`` (``calibration`` or ``evaluation``). ``bos``: from
    ``runtime.data.bos_id``. ``render`` turns a chat into text (the method's chat template);
    ``generate(source, seq_len, bos)`` samples a ``self`` source (the method's float model);
    without them such sources are refused in one line. ``max_windows`` keeps the first windows;
    ``seed`` picks the windows of a mix's larger sources."""
    if role not in (CALIBRATION, EVALUATION):
        raise ValueError(f"role {role!r}")
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    parts, infos = [], []
    for src in spec.sources:
        if src.kind == "self":
            if role == EVALUATION:
                raise DataError(f"{src.spec} is text the model wrote itself, for calibration and training: evaluate on "
                                "text it never saw (wikitext2, your own file, a hub dataset)")
            if generate is None:
                raise DataError(f"{src.spec} samples text from the float torch model: use it with sasq-train or sasq-export")
            windows, info = generate(src, seq_len, bos)
            info = {"source": src.spec, **info, "tokens": int(windows.size)}
        else:
            docs = read_source(src, role, data_dir)
            tokens = tokenize(docs.text(render, src.spec), tokenizer, special_tokens=False)
            try:
                windows = make_windows(tokens, seq_len, bos=bos)
            except DataError as e:
                raise DataError(f"{src.spec}: {e}") from None
            info = {"source": src.spec, "read": docs.read, "tokens": int(tokens.shape[0])}
            if docs.origin:
                info["from"] = docs.origin
            if docs.chats:
                info["chats"] = docs.chats
        parts.append(windows)
        infos.append(info)
    weights = [s.weight for s in spec.sources]
    windows, order = mix_windows(parts, weights, [s.spec for s in spec.sources], seed)
    if max_windows is not None:
        windows, order = windows[:max_windows], order[:max_windows]
    total = sum(weights)
    for i, (info, p, w) in enumerate(zip(infos, parts, weights, strict=True)):
        info.update(weight=w / total, windows_available=int(p.shape[0]), windows=order.count(i))
    record = {"spec": spec.text, "role": role, "seq_len": int(seq_len), "bos": bos is not None,
              "windows": int(windows.shape[0]), "sources": infos}
    if bos is not None:
        record["bos_id"] = int(bos)
    return WindowSet(windows, bos, record)


__all__ = ["CALIBRATION", "DATA_DIR_ENV", "DEFAULT_CALIBRATION_SPEC",
           "DEFAULT_SPEC", "EVALUATION", "default_spec_for", "DataSpec", "Documents", "Source", "WindowSet",
           "interleave", "load_windows", "mix_counts", "mix_windows", "parse_data_spec", "read_source", "record_summary",
           "record_text"]
