"""The peak memory of calibration and scale training, estimated from a model's config before any
weight is read, and the memory free for it: ``sasq-train`` refuses, in one line, a run that will
not fit, instead of being killed by the kernel an hour later.

The estimate, in bytes, for one process (``b`` bytes per float weight: 4, or 2 with bf16; ``L``
decoder blocks of hidden size ``H`` and MLP size ``I``; ``V`` the vocabulary; ``T`` tokens per
window, ``B`` windows per step and process)::

    weights      P * b             P = V*H (+ V*H untied head) + L * (H*d*(2*heads + 2*kv_heads) + 3*H*I),
                                   d the head size: embedding, head and every linear of the blocks
    int8         Pq                the frozen INT8 codes of the quantized linears (Pq of the P)
    snapshot     Pq * b            --smooth-learn: the original weights, to fold the learned factors once
    search       P * b + Pq + E    --smooth-alpha auto: every strength is tried on a copy of the model
    activations  B*T * (Lk * A + 16 * V)
                 A = (15 H + 7.5 I) * 4 per token and block, (27 H + 9.5 I) * 4 with --smooth-learn: what
                     autograd keeps for the backward pass of one fake-quantized Llama-type block
                     (measured with torch.autograd.graph.saved_tensors_hooks on SmolLM2's shape);
                 Lk = L blocks, or with --gradient-checkpointing one block plus the L block inputs
                     (L * H * b per token); 16 * V: float32 logits, the teacher's (kd), the
                     log-softmax and the logits' gradient
    requant      --smooth-learn: every block re-quantizes its weights each pass and keeps two float32
                 copies for the backward pass (three with bf16 weights): 8 * Pq (12 * Pq), or one
                 block's share with --gradient-checkpointing
    E            T * V * 12        one window's float32 logits and their float64 copy (perplexity)
    overhead     0.6 GiB           torch, transformers, the tokenizer (on a GPU: 1 GiB CUDA context)

    peak = overhead + weights + max(search, int8 + snapshot + activations + requant, int8 + E)

On a GPU the device holds all but the snapshot and the overhead, which stay in host memory
(``host = 0.6 GiB + weights + snapshot``: the weights load there first). Several processes on one
machine (``accelerate launch``) each hold all of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.layout import AttentionLayout
from sasq_edge.config import AUTO_ALPHA, QuantConfig
from sasq_edge.errors import ConfigError

GIB = 2**30
HOST_OVERHEAD = int(0.6 * GIB)  # measured: python + torch + transformers + a tokenizer, before any model
CUDA_OVERHEAD = 1 * GIB  # the CUDA context and allocator slack
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def _get(config: Any, key: str, default: Any = None) -> Any:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, key, default)


@dataclass(frozen=True)
class Sizes:
    """The parameter counts of a decoder from its config."""

    params: int  # every parameter: embedding, untied head, the blocks' linears (norms and biases left out)
    quantized: int  # the parameters of the linears the config quantizes
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: Any, lm_head: bool = False) -> Sizes:
        lay = AttentionLayout.of(config.get_text_config() if hasattr(config, "get_text_config") else config)
        hidden, inter, vocab = _get(config, "hidden_size"), _get(config, "intermediate_size"), _get(config, "vocab_size")
        block = hidden * lay.head_dim * (2 * lay.heads + 2 * lay.kv_heads) + 3 * hidden * inter  # q, o; k, v; gate, up, down
        embedding = vocab * hidden
        tied = bool(_get(config, "tie_word_embeddings", False))
        params = embedding + (0 if tied else embedding) + lay.layers * block
        quantized = lay.layers * block + (embedding if lm_head else 0)
        return cls(params, quantized, lay.layers, hidden, inter, vocab)


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate's terms (bytes; see the module docstring) and where they live."""

    device: str  # "cpu" or "cuda"
    weights: int
    int8: int
    snapshot: int
    search: int
    activations: int
    requant: int
    evaluation: int
    overhead: int

    @property
    def peak(self) -> int:
        """Peak of the device training runs on (the host for ``cpu``)."""
        on_device = 0 if self.device == "cuda" else self.snapshot
        train = self.int8 + on_device + self.activations + self.requant
        return self.overhead + self.weights + max(self.search, train, self.int8 + self.evaluation)

    @property
    def host(self) -> int:
        """Host memory when training runs on a GPU (the weights load there first; the snapshot stays)."""
        return HOST_OVERHEAD + self.weights + self.snapshot

    def summary(self) -> str:
        parts = [("weights", self.weights), ("int8", self.int8), ("activations", self.activations)]
        parts += [(k, v) for k, v in (("snapshot", self.snapshot), ("requant", self.requant), ("alpha search", self.search)) if v]
        return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts) + f", overhead {self.overhead / GIB:.2f} GiB"


def estimate(config: Any, qconfig: QuantConfig, *, dtype: str = "float32", gradient_checkpointing: bool = False,
             device: str = "cpu") -> MemoryEstimate:
    """The peak memory of ``run_sasq`` for a model of ``config`` (a transformers config), with
    its weights in ``dtype`` (``float32`` or ``bfloat16``), on ``device`` (``cpu`` or ``cuda``)."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"no memory estimate for weights in {dtype}: use float32 or bfloat16")
    b = DTYPE_BYTES[dtype]
    s = Sizes.of(config, qconfig.lm_head)
    tokens = qconfig.batch_size * qconfig.seq_len
    learn = qconfig.smooth_learn
    per_block = (15 * s.hidden + 7.5 * s.intermediate + (12 * s.hidden + 2 * s.intermediate if learn else 0)) * 4
    kept = per_block + s.layers * s.hidden * b if gradient_checkpointing else s.layers * per_block
    activations = int(tokens * (kept + 16 * s.vocab)) if qconfig.train_steps else 0
    requant = (12 if b == 2 else 8) * s.quantized if learn and qconfig.train_steps else 0
    if gradient_checkpointing:
        requant //= s.layers
    evaluation = qconfig.seq_len * s.vocab * 12
    search = s.params * b + s.quantized + evaluation if qconfig.smooth_alpha == AUTO_ALPHA else 0
    return MemoryEstimate(device, s.params * b, s.quantized, s.quantized * b if learn else 0, search, activations, requant,
                          evaluation, CUDA_OVERHEAD if device == "cuda" else HOST_OVERHEAD)


def host_available(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes: what the kernel can give without swapping
    (free memory plus reclaimable cache); None where there is no such file (not Linux)."""
    try:
        text = Path(meminfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def device_available(device) -> int | None:
    """Free memory of a CUDA ``device`` (``torch.cuda.mem_get_info``); None for the CPU."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    return int(torch.cuda.mem_get_info(device)[0])


def _fixes(est: MemoryEstimate, qconfig: QuantConfig, dtype: str, gradient_checkpointing: bool) -> str:
    fixes = [] if est.device == "cuda" else ["train on a GPU (--device cuda)"]
    if dtype == "float32":
        fixes.append("--dtype bf16")
    if not gradient_checkpointing and est.activations:
        fixes.append("--gradient-checkpointing")
    fixes.append(f"a shorter --seq-len (now {qconfig.seq_len})")
    if qconfig.batch_size > 1:
        fixes.append(f"a smaller --batch-size (now {qconfig.batch_size})")
    return ", ".join(fixes[:-1]) + f" or {fixes[-1]}" if len(fixes) > 1 else fixes[0]


def check(est: MemoryEstimate, qconfig: QuantConfig, *, dtype: str, gradient_checkpointing: bool, processes: int = 1,
          host_free: int | None = None, device_free: int | None = None) -> None:
    """Raise a one-line ``ConfigError`` when ``est`` does not fit: ``processes`` copies of it in
    the host's free memory (CPU training), or one in the GPU's and the host part of ``processes``
    in the host's. Free memory that cannot be read is not checked."""
    fix = _fixes(est, qconfig, dtype, gradient_checkpointing)
    many = f"{processes} processes x " if processes > 1 else ""
    checks = [("this GPU", est.peak, 1, device_free), ("this machine", est.host, processes, host_free)] if est.device == "cuda" \
        else [("this machine", est.peak, processes, host_free)]
    for where, need, count, free in checks:
        if free is not None and need * count > free:
            raise ConfigError(f"calibration and training need about {many if count > 1 else ''}{need / GIB:.1f} GiB "
                              f"({est.summary()}), {where} has {free / GIB:.1f} GiB free: use {fix} "
                              "(--no-memory-check trains anyway)")


@dataclass(frozen=True)
class BlockwiseEstimate:
    """The peak memory of the block-wise pass (``sasq_edge.blockwise``), bytes: one decoder
    block's float32 weights and INT8 codes, the embedding while the block inputs are captured,
    three ``(windows, T, hidden)`` float32 streams (float input, quantized input, float target)
    plus the block's output, and the activations autograd keeps for one training step of one
    block (``A`` per token, as in ``estimate``); with ``whole=True`` the whole model's weights
    instead of one block's and a window's logits for the held-out perplexity."""

    block: int
    embedding: int
    streams: int
    activations: int
    model: int
    overhead: int = HOST_OVERHEAD

    @property
    def peak(self) -> int:
        return self.overhead + self.model + self.streams + max(self.embedding, self.block + self.activations)

    def summary(self) -> str:
        parts = [("model" if self.model else "one block", self.model or self.block), ("streams", self.streams),
                 ("activations", self.activations), ("embedding", self.embedding)]
        return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts) + f", overhead {self.overhead / GIB:.2f} GiB"


def estimate_blockwise(config: Any, qconfig: QuantConfig, *, whole: bool) -> BlockwiseEstimate:
    """``BlockwiseEstimate`` of a model of ``config`` (a transformers config) trained block by
    block on ``qconfig.block_windows`` windows; ``whole``: the model is held in memory whole."""
    s = Sizes.of(config, qconfig.lm_head)
    per_layer = (s.params - s.vocab * s.hidden * (1 if _get(config, "tie_word_embeddings", False) else 2)) // max(s.layers, 1)
    block = per_layer * 5  # float32 weights and their INT8 codes
    tokens = qconfig.seq_len * qconfig.batch_size
    per_token = (15 * s.hidden + 7.5 * s.intermediate + (12 * s.hidden + 2 * s.intermediate if qconfig.smooth_learn else 0)) * 4
    streams = 4 * qconfig.block_windows * qconfig.seq_len * s.hidden * 4
    model = s.params * 4 + s.quantized + qconfig.seq_len * s.vocab * 12 if whole else 0
    return BlockwiseEstimate(block, 0 if whole else s.vocab * s.hidden * 4, streams, int(tokens * per_token), model)
