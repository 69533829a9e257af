"""ONNX Runtime sessions for sasq-edge folders (and plain float ONNX causal LMs).

Imports only numpy, onnx and onnxruntime: this package runs on a device without torch.
The session options a model needs (for example ``session.qdqisint8allowed``) are read from its
``metadata_props``, so users never have to know them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeSetupError
from runtime.folder import check_folder
from runtime.graph import PAST_PREFIX, PRESENT_PREFIX
from runtime.metadata import META_GRAPH, META_PROFILE, read_metadata, session_config
from runtime.profiles import PROFILES, inexact_here

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
REQUIRED_INPUTS = ("input_ids", "attention_mask")
REQUIRED_OUTPUT = "logits"
_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class CacheSpec:
    """The graph's KV-cache inputs (optimum's names): ``past_key_values.{i}.key|value`` of shape
    ``[batch, kv_heads, past_sequence, head_dim]``, returned as ``present.{i}.key|value``."""

    past_names: tuple[str, ...]
    kv_heads: int
    head_dim: int
    dtype: type

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self.past_names)

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for n in self.past_names}


def _config_head_dim(path: Path) -> int | None:
    """The attention head size from the ``genai_config.json`` or ``config.json`` beside the model, or None."""
    try:  # ONNX Runtime GenAI's folders carry genai_config.json only
        genai = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        if isinstance(genai, int):
            return genai
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        config = json.loads((path.parent / "config.json").read_text())
    except (OSError, ValueError):
        return None
    head_dim = config.get("head_dim")
    if isinstance(head_dim, int):
        return head_dim
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def _cache_spec(sess: ort.InferenceSession, path: Path) -> CacheSpec | None:
    past = [i for i in sess.get_inputs() if i.name.startswith(PAST_PREFIX)]
    if not past:
        return None
    shape = list(past[0].shape)
    if len(shape) == 4 and isinstance(shape[1], int) and not isinstance(shape[3], int):
        shape[3] = _config_head_dim(path)  # a symbolic head size (ONNX Runtime GenAI's builder): the config's
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise RuntimeSetupError(f"{path}: cache input {past[0].name} has shape {shape}, expected [batch, kv_heads, past, head_dim]")
    outputs = {o.name for o in sess.get_outputs()}
    spec = CacheSpec(tuple(i.name for i in past), shape[1], shape[3], _ORT_FLOAT.get(past[0].type, np.float32))
    missing = [n for n in spec.present_names if n not in outputs]
    if missing:
        raise RuntimeSetupError(f"{path}: cache inputs without matching present outputs: re-export it with sasq-export")
    return spec


@dataclass
class LMSession:
    """An ORT session over a causal-LM graph ``(input_ids, attention_mask[, position_ids, past]) -> logits[, present]``."""

    session: ort.InferenceSession
    path: Path
    providers: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    cache: CacheSpec | None = None

    @property
    def profile(self) -> str | None:
        return self.metadata.get(META_PROFILE)

    @property
    def takes_positions(self) -> bool:
        return any(i.name == "position_ids" for i in self.session.get_inputs())

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """``(B, T)`` int64 token ids -> ``(B, T, V)`` float32 logits (no padding, no past)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if self.cache is None:
            return self.session.run([REQUIRED_OUTPUT], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        return self.step(ids, self.cache.empty(ids.shape[0]))[0]

    def step(self, input_ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One cached call: new tokens ``(B, T)`` after ``past`` (from ``cache.empty`` or the
        previous step) -> logits ``(B, T, V)`` and the cache to pass to the next step."""
        if self.cache is None:
            raise RuntimeSetupError(f"{self.path} has no KV-cache inputs: re-export it without --no-kv-cache")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, new = ids.shape
        start = next(iter(past.values())).shape[2]
        feed = {"input_ids": ids, "attention_mask": np.ones((batch, start + new), np.int64), **past}
        if self.takes_positions:  # the traced graph takes them; the fused graph derives them from the mask
            feed["position_ids"] = np.broadcast_to(np.arange(start, start + new, dtype=np.int64), (batch, new)).copy()
        outs = self.session.run([REQUIRED_OUTPUT, *self.cache.present_names], feed)
        return outs[0], dict(zip(self.cache.past_names, outs[1:], strict=True))

    @property
    def shares_buffer(self) -> bool:
        """Whether the graph takes a shared past/present buffer (the fused graph's
        GroupQueryAttention) in host memory: on the CPU provider (on a GPU provider the host
        buffer would be copied to the device and back every step)."""
        return self.cache is not None and self.metadata.get(META_GRAPH) == "fused" and self.providers[0] == PROVIDERS["cpu"]

    def decoder(self, batch: int = 1, capacity: int | None = None) -> Decoder | SharedBufferDecoder:
        """A cached decoder for ``batch`` rows: with a shared-buffer graph and a ``capacity``
        (the most tokens the sequence will hold), one that updates the cache in place."""
        if self.cache is None:
            raise RuntimeSetupError(f"{self.path} has no KV-cache inputs: re-export it without --no-kv-cache")
        if capacity is not None and self.shares_buffer:
            return SharedBufferDecoder(self, batch, capacity)
        return Decoder(self, batch)


class Decoder:
    """Cached decoding that hands each step's cache back as numpy arrays (``LMSession.step``):
    the graph writes a new present tensor, past plus the new tokens, every call."""

    def __init__(self, sess: LMSession, batch: int) -> None:
        self.sess = sess
        self.past = sess.cache.empty(batch)

    @property
    def length(self) -> int:
        return next(iter(self.past.values())).shape[2]

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        logits, self.past = self.sess.step(input_ids, self.past)
        return logits


class SharedBufferDecoder:
    """Cached decoding over GroupQueryAttention's shared past/present buffer (the fused graph):
    one ``[batch, kv_heads, capacity, head_dim]`` tensor per cache name is bound as both the past
    input and the present output, so a step writes only its new keys and values in place, where
    ``LMSession.step`` has the graph copy the whole past into a new present tensor every token.
    The lengths come from the attention mask (width = tokens so far), as ONNX Runtime GenAI's
    generator feeds them."""

    def __init__(self, sess: LMSession, batch: int, capacity: int) -> None:
        if capacity < 1:
            raise RuntimeSetupError(f"cache capacity {capacity} must be at least 1 token")
        spec = sess.cache
        self.sess, self.batch, self.capacity, self.length = sess, batch, capacity, 0
        self.binding = sess.session.io_binding()
        self.binding.bind_output(REQUIRED_OUTPUT, "cpu")  # first: outputs come back in binding order
        self.buffers = {}
        for past, present in zip(spec.past_names, spec.present_names, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, spec.kv_heads, capacity, spec.head_dim), spec.dtype))
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
            self.buffers[past] = value
        self._feed: dict[str, np.ndarray] = {}  # the bound numpy inputs, alive until the next step

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.shape[0] != self.batch:
            raise RuntimeSetupError(f"this decoder holds a cache for batch {self.batch}, got input of batch {ids.shape[0]}")
        total = self.length + ids.shape[1]
        if total > self.capacity:
            raise RuntimeSetupError(f"{total} tokens do not fit the cache of {self.capacity}: open a decoder with a larger capacity")
        self._feed = {"input_ids": ids, "attention_mask": np.ones((self.batch, total), np.int64)}
        for name, value in self._feed.items():
            self.binding.bind_cpu_input(name, value)
        self.binding.bind_output(REQUIRED_OUTPUT, "cpu")  # unallocated: its shape follows the step's length
        self.sess.session.run_with_iobinding(self.binding)
        self.length = total
        return self.binding.get_outputs()[0].numpy()


def resolve_providers(names: list[str] | tuple[str, ...]) -> list[str]:
    """Map short names (cpu, cuda, tensorrt) to ORT providers, failing clearly on missing ones."""
    if not names:
        raise RuntimeSetupError("no execution provider given: use --provider cpu, cuda or tensorrt")
    available = ort.get_available_providers()
    out = []
    for name in names:
        if name not in PROVIDERS:
            raise RuntimeSetupError(f"unknown execution provider {name!r}: choose from {', '.join(PROVIDERS)}")
        if PROVIDERS[name] not in available:
            raise RuntimeSetupError(
                f"execution provider {name!r} ({PROVIDERS[name]}) is not in this onnxruntime build "
                f"(available: {', '.join(available)}): install onnxruntime-gpu for cuda/tensorrt, or use --provider cpu"
            )
        out.append(PROVIDERS[name])
    return out


def provider_options(providers: list[str], path: Path, quantized: bool) -> list[str | tuple[str, dict[str, str]]]:
    """ORT provider entries with the options each needs. TensorRT: INT8 enabled for Q/DQ models
    (TensorRT then takes the graph's scales: explicit quantization, no calibration table), FP16
    for the float layers, and its engine cached beside the model (the first build takes minutes).
    Not run in this project's CI, which has no GPU: see docs/METHOD.md, Limits."""
    out: list[str | tuple[str, dict[str, str]]] = []
    for name in providers:
        if name == PROVIDERS["tensorrt"]:
            out.append((name, {
                "trt_int8_enable": "True" if quantized else "False",
                "trt_fp16_enable": "True",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(path.parent / "trt_cache"),
            }))
        else:
            out.append(name)
    return out


def session_options(path: str | os.PathLike, threads: int | None = None, meta: dict[str, str] | None = None) -> ort.SessionOptions:
    """ORT session options for ``path``: quiet logging, ``threads`` intra-op threads, and the
    config entries the model's deploy profile asks for in its metadata."""
    path = Path(path)
    meta = read_metadata(path) if meta is None else meta
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    for key, value in session_config(meta, path).items():
        so.add_session_config_entry(key, value)
    return so


def open_session(path: str | os.PathLike, providers: list[str] | tuple[str, ...] = ("cpu",), threads: int | None = None, *,
                 config: dict[str, str] | None = None, arena: bool = True) -> LMSession:
    """Open ``path`` on the given providers with the session options its metadata asks for;
    ``config``: more session config entries (``session.disable_prepacking``, ...); ``arena``:
    ONNX Runtime's CPU memory arena (bench/memory_runtime.py measures both)."""
    path = Path(path)
    if threads is not None and threads < 1:
        raise RuntimeSetupError(f"threads={threads} must be at least 1 (or None for all cores)")
    meta = read_metadata(path)
    check_folder(path, meta)
    so = session_options(path, threads, meta)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.enable_cpu_mem_arena = arena
    ort_providers = provider_options(resolve_providers(list(providers)), path, quantized=META_PROFILE in meta)
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=ort_providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        first = str(e).strip().splitlines()[0][:300]
        raise RuntimeSetupError(f"ONNX Runtime cannot load {path}: {first}") from None
    inputs = {i.name for i in sess.get_inputs()}
    outputs = {o.name for o in sess.get_outputs()}
    if not set(REQUIRED_INPUTS) <= inputs or REQUIRED_OUTPUT not in outputs:
        raise RuntimeSetupError(
            f"{path} is not a causal-LM graph: it needs inputs {', '.join(REQUIRED_INPUTS)} and output "
            f"{REQUIRED_OUTPUT} (it has {', '.join(sorted(inputs))} -> {', '.join(sorted(outputs))}); export it with sasq-export"
        )
    why = cpu_mismatch(meta.get(META_PROFILE), sess.get_providers())
    if why and str(path.resolve()) not in _WARNED:
        _WARNED.add(str(path.resolve()))
        print(f"sasq: warning: {path}: {why}", file=sys.stderr, flush=True)
    return LMSession(sess, path, sess.get_providers(), meta, _cache_spec(sess, path))


_WARNED: set[str] = set()  # files warned about in this process (once each)


def cpu_mismatch(profile: str | None, providers: list[str]) -> str | None:
    """Why this CPU does not run the ``profile`` exactly where the CPU provider computes it, else None."""
    if profile not in PROFILES or not providers or providers[0] != "CPUExecutionProvider":
        return None
    return inexact_here(profile)
