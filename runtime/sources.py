"""Where calibration and evaluation text comes from: one ``--data`` spec, parsed, read and cut
into windows here (docs/DATA.md). The device side: the standard library and numpy;
``datasets`` only lazily, for hub ids and ``.parquet`` files. What needs the torch model (text
sampled from it, ``self:N``) or a transformers tokenizer (chat templates) is passed in by the
method (``sasq_edge.data``) as two callables, so the device commands read ``.txt`` and
``.jsonl`` without either.

The spec's grammar is ``runtime.dataspec``, reading a source ``runtime.readers``; here: windows
and mixes, and ``load_windows``, the one entry.

Mixes: each source is cut into its own windows; with the weights normalised to sum 1, source i
gives ``n_i = floor(w_i * T)`` windows, where ``T = min_j(available_j / w_j)`` is the largest total
the sources fill in that proportion (the scarcest source gives all its windows). A source with more
windows than that gives a seeded sample of them, kept in text order. The mix interleaves the
sources by weighted round robin, so every prefix of it (``--max-windows``) holds each source's
share to within one window (calibration samples its windows from the mix, and training draws
batches uniformly from it: there the shares hold in expectation).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.data import DATA_DIR_ENV, make_windows, tokenize
from runtime.dataspec import (
    CALIBRATION,
    DEFAULT_CALIBRATION_SPEC,
    DEFAULT_SPEC,
    EVALUATION,
    DataSpec,
    Source,
    default_spec_for,
    parse_data_spec,
)
from runtime.errors import DataError
from runtime.readers import Documents, Render, read_source


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
