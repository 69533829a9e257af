"""Each model family as data: the one description of a decoder that the method (which linears to
quantize, where smoothing factors fold, which inputs rotate), the traced exporter, the fused CPU
graph writer and ``sasq-validate``'s probe all read. Plain data, no torch (the bottom layer, beside
``ScaleState``, for the same reason: every layer above reads it). Every entry is covered by a tiny
seeded model in tests/test_families.py, on both graph kinds; a meta-test there fails when a
registered family lacks either.

Adding a family: one ``ArchSpec`` here and one ``Family`` in tests/test_families.py;
docs/ARCHITECTURE.md, "Adding a model family", says how to read a modeling file for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from runtime.errors import ModelLoadError

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that read the output of one preceding operation, inside a decoder block.

    ``prev`` is an RMSNorm (its weight absorbs ``1 / s``) or a linear whose output rows absorb
    ``1 / s`` (``v_proj`` before ``o_proj``, ``up_proj`` before ``down_proj``: the attention
    mix and the gated product are linear in those outputs). ``heads`` marks ``v_proj`` ->
    ``o_proj``, where grouped-query attention repeats each key/value head, so one factor serves
    every query head that reads it. ``rows`` says which of a preceding linear's output rows the
    linears read: ``"all"``, or ``"tail"``, the last ones, as many as there are factors (a fused
    projection: the value rows of Phi-3's ``qkv_proj``, the up half of its ``gate_up_proj``);
    only those absorb ``1 / s``.
    """

    prev: str
    linears: tuple[str, ...]
    heads: bool = False
    rows: Literal["all", "tail"] = "all"


LLAMA_SMOOTH = (
    SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), heads=True),
    SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),
)

# Gemma 2 and 3 norm the attention output before the residual add (post_attention_layernorm, no
# linear reads it) and the MLP input with pre_feedforward_layernorm. The q/k norms of Gemma 3
# come after q_proj/k_proj and leave the value path alone, so v_proj -> o_proj folds as in Llama;
# GeGLU's gelu_tanh(gate) * up is linear in up.
GEMMA_SMOOTH = (
    SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), heads=True),
    SmoothGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),
)

# Phi-3 fuses q, k, v into qkv_proj (rows: q, then k, then v) and gate, up into gate_up_proj
# (rows: gate, then up): o_proj reads the value rows, down_proj the up half.
FUSED_SMOOTH = (
    SmoothGroup("input_layernorm", ("self_attn.qkv_proj",)),
    SmoothGroup("self_attn.qkv_proj", ("self_attn.o_proj",), heads=True, rows="tail"),
    SmoothGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
    SmoothGroup("mlp.gate_up_proj", ("mlp.down_proj",), rows="tail"),
)


@dataclass(frozen=True)
class ArchSpec:
    """One decoder family. Names of modules inside a block are relative to the block.

    The method's part: ``blocks``, the attribute path to the decoder block list; ``targets``, the
    leaf names of the linears to quantize; ``smooth``, the smoothing groups of each block;
    ``norm_offset``, the RMSNorms multiply by ``norm_offset + weight`` (0 for Llama's ``x * w``, 1
    for Gemma's ``x * (1 + w)``), which decides how a factor folds into them and what the fused
    graph stores as the norm's gamma; ``rotated``, the linears whose input a ``rotate_block``
    recipe rotates online (runtime.rotation): the MLP's down projection, whose input carries the
    massive activations, and the linears that read a norm's output (one rotation of that output
    serves all of them); not the attention output projection, where rotating measured no clear
    gain (bench/results/rotation_smollm2.md).

    The block as a graph (the fused writer, the probe): ``qkv``, the projections that read the
    attention norm's output (one name: q, k and v rows fused in one matrix, in that order);
    ``o_proj``; ``gate_up`` (one name: gate rows, then up rows); ``down_proj``; the norms:
    ``input_norm`` before attention, ``attn_out_norm`` on the attention output before the residual
    add (Gemma), ``mlp_norm`` before the MLP, ``mlp_out_norm`` on the MLP output (Gemma),
    ``final_norm`` after the last block (a path from the model's root); ``qk_norm``, per-head
    RMSNorms of q and k before the rotary embedding (Qwen3, Gemma 3); ``embed_scale``, the
    embeddings times ``sqrt(hidden_size)`` (Gemma); ``rope_per_layer_type``, one rotary table per
    entry of ``config.layer_types`` (Gemma 3's local and global bases). The activation, the
    sliding window of each layer, the NoPE layers and soft-capping come from the config
    (``activation``, ``layer_plan``, ``softcaps``)."""

    blocks: str
    targets: tuple[str, ...]
    smooth: tuple[SmoothGroup, ...] = ()
    norm_offset: float = 0.0
    rotated: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                                "mlp.down_proj")
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o_proj: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down_proj: str = "mlp.down_proj"
    input_norm: str = "input_layernorm"
    attn_out_norm: str | None = None
    mlp_norm: str = "post_attention_layernorm"
    mlp_out_norm: str | None = None
    final_norm: str = "model.norm"
    qk_norm: tuple[str, str] | None = None
    embed_scale: bool = False
    rope_per_layer_type: bool = False

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a block, in the order the block runs them."""
        return (*self.qkv, self.o_proj, *self.gate_up, self.down_proj)


_LLAMA = ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS, smooth=LLAMA_SMOOTH)
_GEMMA = ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS, smooth=GEMMA_SMOOTH, norm_offset=1.0,
                  attn_out_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                  mlp_out_norm="post_feedforward_layernorm", embed_scale=True)
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,  # Llama 1-3.x (Llama 3.x rope scaling changes no module), SmolLM 1 and 2
    "mistral": _LLAMA,
    "qwen2": _LLAMA,  # Qwen2 and Qwen2.5: q/k/v biases (a v_proj bias absorbs 1 / s with its rows)
    "qwen3": ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS, smooth=LLAMA_SMOOTH, qk_norm=_QK_NORM),  # q/k norms
    "smollm3": _LLAMA,  # some layers without rotary embedding (NoPE): no module differs
    "gemma2": _GEMMA,
    "gemma3_text": ArchSpec(**{**_GEMMA.__dict__, "qk_norm": _QK_NORM, "rope_per_layer_type": True}),
    "phi3": ArchSpec(blocks="model.layers", targets=FUSED_LINEARS, smooth=FUSED_SMOOTH,
                     rotated=("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"), qkv=("self_attn.qkv_proj",),
                     gate_up=("mlp.gate_up_proj",)),
}

HOW_TO_ADD = ("add an ArchSpec to runtime/families.py and a tiny seeded test to tests/test_families.py "
              "(docs/ARCHITECTURE.md, 'Adding a model family')")


def unsupported(model_type: str) -> ModelLoadError:
    return ModelLoadError(f"architecture {model_type!r} is not supported yet: supported are "
                          f"{', '.join(sorted(ARCHITECTURES))}; to add one, {HOW_TO_ADD}")


def arch_spec(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise unsupported(model_type) from None


# --- what the config decides -----------------------------------------------------------------

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def activation(config: Any) -> str:
    """The MLP's activation (``silu``, ``gelu_tanh`` or ``gelu``), from ``hidden_activation``
    (Gemma) or ``hidden_act``."""
    name = _get(config, "hidden_activation") or _get(config, "hidden_act") or "silu"
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"activation {name!r} is not supported yet: supported are {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class LayerPlan:
    """What differs between the decoder layers of one model: whether the layer applies the rotary
    embedding (SmolLM3's NoPE layers do not), its sliding window (-1: full attention; the layer
    keeps keys ``kv > q - window``, which GroupQueryAttention's ``local_window_size`` with the same
    number matches), and its ``layer_types`` entry (which rotary table it reads)."""

    rope: bool
    window: int
    layer_type: str | None


def layer_plan(config: Any) -> list[LayerPlan]:
    n = int(_get(config, "num_hidden_layers"))
    types = _get(config, "layer_types")
    window = _get(config, "sliding_window")
    no_rope = _get(config, "no_rope_layers")
    out = []
    for i in range(n):
        sliding = (types[i] == "sliding_attention" and bool(window)) if types else bool(window)  # Mistral: every layer
        out.append(LayerPlan(bool(no_rope[i]) if no_rope else True, int(window) if sliding else -1, types[i] if types else None))
    return out


def softcaps(config: Any) -> tuple[float | None, float | None]:
    """Gemma 2's soft-capping ``c * tanh(x / c)`` of the attention logits and of the output
    logits (None where the config has none)."""
    def value(key: str) -> float | None:
        v = _get(config, key)
        return float(v) if v else None

    return value("attn_logit_softcapping"), value("final_logit_softcapping")


def embedding_scale(spec: ArchSpec, config: Any) -> float | None:
    return math.sqrt(int(_get(config, "hidden_size"))) if spec.embed_scale else None


ROPE_FIXED = (None, "default", "linear", "llama3")  # rotary tables that do not change with the sequence length


def fused_refusal(config: Any) -> str | None:
    """Why the fused graph cannot express this config (None: it can). GroupQueryAttention reads one
    fixed cos/sin table: RoPE that changes with the sequence length (``dynamic``, ``longrope``,
    ``yarn``) or rotates part of each head does not fit it."""
    model_type = _get(config, "model_type")
    if model_type not in ARCHITECTURES:
        return f"{model_type!r} is not a registered family"
    scaling = _get(config, "rope_scaling") or {}
    kinds = {p.get("rope_type", p.get("type")) for p in (scaling.values() if all(isinstance(v, dict) for v in scaling.values())
                                                         and scaling else [scaling]) if isinstance(p, dict)}
    kinds = kinds or {None}
    odd = sorted(str(k) for k in kinds if k not in ROPE_FIXED)
    if odd:
        return f"RoPE scaling {odd[0]!r} changes with the sequence length"
    if float(_get(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "the rotary embedding covers part of each head (partial_rotary_factor)"
    return None
