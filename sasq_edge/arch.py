"""What differs per architecture, as data. Every entry is covered by a tiny seeded model in
tests/test_families.py, which fails when this registry and the tested list drift apart.

Adding a family: one ``ArchSpec`` here (where the decoder blocks are, which linear leaves are
quantized, which operation's output feeds which linears) and one ``Family`` in
tests/test_families.py; docs/ARCHITECTURE.md, "Adding a model family", says how to read a
modeling file for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sasq_edge.errors import ModelLoadError

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
    """``blocks``: attribute path to the decoder block list; ``targets``: default leaf names of
    the linear layers to quantize inside each block; ``smooth``: the smoothing groups of each
    block; ``norm_offset``: the blocks' RMSNorms multiply by ``norm_offset + weight`` (0 for
    Llama's ``x * w``, 1 for Gemma's ``x * (1 + w)``), which decides how a factor folds into them;
    ``rotated``: the linears (inside a block) whose input a ``rotate_block`` recipe rotates online
    (runtime.rotation): the MLP's down projection, whose input carries the massive activations,
    and the linears that read a norm's output (one rotation of that output serves all of them);
    not the attention output projection, where rotating measured no clear gain (it traded WikiText
    for code, untrained: bench/results/rotation_smollm2.md)."""

    blocks: str
    targets: tuple[str, ...]
    smooth: tuple[SmoothGroup, ...] = ()
    norm_offset: float = 0.0
    rotated: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                                "mlp.down_proj")


_LLAMA = ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS, smooth=LLAMA_SMOOTH)
_GEMMA = ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS, smooth=GEMMA_SMOOTH, norm_offset=1.0)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,  # Llama 1-3.x (Llama 3.x rope scaling changes no module), SmolLM 1 and 2
    "mistral": _LLAMA,
    "qwen2": _LLAMA,  # Qwen2 and Qwen2.5: q/k/v biases (a v_proj bias absorbs 1 / s with its rows)
    "qwen3": _LLAMA,  # per-head q/k RMSNorm after q_proj/k_proj
    "smollm3": _LLAMA,  # some layers without rotary embedding (NoPE): no module differs
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": ArchSpec(blocks="model.layers", targets=FUSED_LINEARS, smooth=FUSED_SMOOTH,
                     rotated=("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")),
}

HOW_TO_ADD = ("add an ArchSpec to sasq_edge/arch.py and a tiny seeded test to tests/test_families.py "
              "(docs/ARCHITECTURE.md, 'Adding a model family')")


def unsupported(model_type: str) -> ModelLoadError:
    return ModelLoadError(f"architecture {model_type!r} is not supported yet: supported are "
                          f"{', '.join(sorted(ARCHITECTURES))}; to add one, {HOW_TO_ADD}")


def arch_spec(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise unsupported(model_type) from None
