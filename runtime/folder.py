"""What an export folder holds beside ``model.onnx``, read without torch or transformers:
``config.json`` (context length), ``tokenizer.json`` (through the ``tokenizers`` library, the same
fast tokenizer transformers wraps) and ``generation_config.json`` (end-of-sequence ids).

The ONNX file records a sha256 of every file exported beside it (``sasq.files``); ``check_folder``
refuses a folder whose files no longer belong together (a re-export killed halfway, a scale file
copied in from another run), naming the file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from runtime.errors import RuntimeSetupError
from runtime.io import file_digest, parse_json
from runtime.metadata import META_FILES, META_PROFILE

CONFIG_FILE, TOKENIZER_FILE, GENERATION_FILE = "config.json", "tokenizer.json", "generation_config.json"
# every file an export may write beside the ONNX file (and the engine cache TensorRT adds there)
COMPANION_FILES = (CONFIG_FILE, GENERATION_FILE, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "recipe.json", "scales.safetensors", "genai_config.json", "trt_cache")
QUANTIZED_FILES = ("recipe.json", "scales.safetensors")  # what only a quantized export writes beside the model


def manifest(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """``{name: digest}`` of the named files in ``folder`` (the ones that exist)."""
    folder = Path(folder)
    return {n: file_digest(folder / n) for n in sorted(names) if (folder / n).is_file()}


def exports_in(folder: str | os.PathLike) -> list[str]:
    """The ONNX files in ``folder`` that sasq-edge exported (their metadata lists the files beside
    them); the user's own ONNX files are not counted."""
    from runtime.metadata import read_metadata

    folder = Path(folder)
    found = []
    for p in sorted(folder.glob("*.onnx")) if folder.is_dir() else []:
        try:
            ours = p.is_file() and META_FILES in read_metadata(p)
        except RuntimeSetupError:
            ours = False  # not a readable ONNX file: not an export of ours
        if ours:
            found.append(p.name)
    return found


def check_folder(onnx_path: str | os.PathLike, meta: dict[str, str]) -> None:
    """Refuse a folder whose files are not the ones exported with ``onnx_path`` (``meta`` is its
    metadata). Files the export did not write are not looked at; a foreign ONNX file without
    ``sasq.files`` is not checked."""
    if META_FILES not in meta:
        return
    path = Path(onnx_path)
    try:
        files = parse_json(meta[META_FILES])
    except json.JSONDecodeError:
        files = None
    if not isinstance(files, dict):
        raise RuntimeSetupError(f"{path}: metadata {META_FILES} is damaged: re-export the folder with sasq-export")
    if META_PROFILE not in meta:  # a float model: a quantized export's state beside it is not its own
        foreign = [n for n in QUANTIZED_FILES if n not in files and (path.parent / n).is_file()]
        if foreign:
            raise RuntimeSetupError(f"{path} is a float model, but its folder holds a quantized export's {' and '.join(foreign)}: "
                                    "it is not that export (copied over it?); re-export the folder with sasq-export, or keep "
                                    "the float model in a folder of its own")
    for name, digest in sorted(files.items()):
        f = path.parent / name
        if not f.is_file():
            raise RuntimeSetupError(f"{f} is missing: {path.name} was exported with it; re-export the folder with sasq-export")
        if file_digest(f) != digest:
            raise RuntimeSetupError(f"{f} does not belong to {path.name} (it is not the file exported with it: a re-export "
                                    "stopped halfway, or it was replaced): re-export the folder with sasq-export")


def folder_config(onnx_path: str | os.PathLike) -> dict:
    """``config.json`` beside the model, or ``{}`` when there is none."""
    cfg = Path(onnx_path).parent / CONFIG_FILE
    if not cfg.is_file():
        return {}
    try:
        data = parse_json(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise RuntimeSetupError(f"{cfg} is not a JSON object: re-export the folder with sasq-export")
    return data


def max_positions(onnx_path: str | os.PathLike) -> int | None:
    value = folder_config(onnx_path).get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def load_tokenizer(folder: str | os.PathLike, override: str | None = None):
    """The ``tokenizers.Tokenizer`` of an export folder, or of ``override`` (a folder, a
    ``tokenizer.json`` file, or a hub id)."""
    from tokenizers import Tokenizer

    if override is not None:
        src = Path(override).expanduser()
        path = src / TOKENIZER_FILE if src.is_dir() else src
        if not path.is_file():
            if src.exists() or str(override).startswith((".", "/", "~")):
                raise RuntimeSetupError(f"no {TOKENIZER_FILE} at {src}: pass a folder holding {TOKENIZER_FILE}, the file, or a hub id")
            try:
                return Tokenizer.from_pretrained(str(override))
            except Exception as e:  # tokenizers raises a bare Exception when the hub is unreachable
                raise RuntimeSetupError(f"could not load a tokenizer for {override!r} ({str(e).splitlines()[0][:200]}): "
                                        f"pass a folder holding {TOKENIZER_FILE}") from None
    else:
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise RuntimeSetupError(f"no {TOKENIZER_FILE} beside the model in {folder}: re-export the folder with sasq-export, "
                                    "or pass --tokenizer FOLDER")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise RuntimeSetupError(f"{path} is not a readable tokenizer ({str(e).splitlines()[0][:200]}): re-export the folder") from None


def tokenizer_config(folder: str | os.PathLike, override: str | None = None) -> dict:
    """``tokenizer_config.json`` beside the tokenizer ``load_tokenizer(folder, override)`` reads
    (``{}`` when there is none, or for a hub id): whether windows start with BOS reads its
    ``add_bos_token`` (``runtime.data.bos_id``)."""
    if override is not None:
        src = Path(override).expanduser()
        base = src if src.is_dir() else src.parent if src.is_file() else None
    else:
        base = Path(folder)
    path = base / "tokenizer_config.json" if base is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RuntimeSetupError(f"{path} is not valid JSON: re-export the folder with sasq-export, or fix the file") from None
    return data if isinstance(data, dict) else {}


def eos_ids(onnx_path: str | os.PathLike) -> tuple[int, ...]:
    """End-of-sequence ids: ``generation_config.json``'s, else ``config.json``'s."""
    folder = Path(onnx_path).parent
    ids = folder_config(onnx_path).get("eos_token_id")
    gen = folder / GENERATION_FILE
    if gen.is_file():
        try:
            data = parse_json(gen.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RuntimeSetupError(f"{gen} is not valid JSON: re-export the folder with sasq-export") from None
        if isinstance(data, dict):
            ids = data.get("eos_token_id", ids)
    if ids is None:
        return ()
    return tuple(int(i) for i in ids) if isinstance(ids, list) else (int(ids),)
