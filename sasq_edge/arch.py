"""What differs per architecture, as data. Every entry is covered by a test on a tiny model
(tests/test_arch.py fails when this registry and the tested list drift apart)."""

from __future__ import annotations

from dataclasses import dataclass

from sasq_edge.errors import ModelLoadError

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that read the output of one preceding operation, inside a decoder block.

    ``prev`` is an RMSNorm (its weight absorbs ``1 / s``) or a linear whose output rows absorb
    ``1 / s`` (``v_proj`` before ``o_proj``, ``up_proj`` before ``down_proj``: the attention
    mix and the gated product are linear in those outputs). ``heads`` marks ``v_proj`` ->
    ``o_proj``, where grouped-query attention repeats each key/value head, so one factor serves
    every query head that reads it.
    """

    prev: str
    linears: tuple[str, ...]
    heads: bool = False


LLAMA_SMOOTH = (
    SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), heads=True),
    SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class ArchSpec:
    """``blocks``: attribute path to the decoder block list; ``targets``: default leaf names of
    the linear layers to quantize inside each block."""

    blocks: str
    targets: tuple[str, ...]
    smooth: tuple[SmoothGroup, ...] = ()


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS, smooth=LLAMA_SMOOTH),
    "mistral": ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS, smooth=LLAMA_SMOOTH),
    "qwen2": ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS, smooth=LLAMA_SMOOTH),
}


def arch_spec(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelLoadError(
            f"architecture {model_type!r} is not supported yet: supported are {', '.join(sorted(ARCHITECTURES))}"
        ) from None
