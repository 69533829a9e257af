"""Reading one ``--data`` source (``runtime.dataspec.Source``) into documents: WikiText-2, a
``datasets`` id, text, JSON lines, JSON and parquet files and folders of them; the chat heuristics
(which column holds the text, ``messages``, prompt/response pairs). The standard library and
numpy; ``datasets`` only lazily, for hub ids and ``.parquet`` files.

A COLUMN names a text column, a column of chat ``messages`` (lists of ``{role, content}``), or
``PROMPT+RESPONSE`` columns made into a user/assistant chat; without one, ``text`` is used, else
``messages``, else the first of the prompt/response pairs in ``CHAT_PAIRS`` the rows have.
Documents (a text file, a row, a rendered chat) are joined with ``"\\n\\n"``, tokenized once per
source and cut into non-overlapping windows (``runtime.data.make_windows``, BOS-aware).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runtime.data import SPLITS, load_text, read_text_file, resolve_data_dir
from runtime.dataspec import CALIBRATION, JSON_SUFFIXES, PARQUET_SUFFIXES, Source, folder_files
from runtime.errors import DataError
from runtime.io import parse_json

CHAT_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "output"), ("question", "answer"))
DOC_SEP = "\n\n"  # between documents, as between WikiText-2's rows

Chat = list  # [{"role": ..., "content": ...}, ...]
Render = Callable[[Chat], str]


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
        files = folder_files(path) if path.is_dir() else [path]
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


