"""What differs per architecture, as data. Every entry is covered by a test on a tiny model
(tests/test_arch.py fails when this registry and the tested list drift apart)."""

from __future__ import annotations

from dataclasses import dataclass

from sasq_edge.errors import ModelLoadError

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """``blocks``: attribute path to the decoder block list; ``targets``: default leaf names of
    the linear layers to quantize inside each block."""

    blocks: str
    targets: tuple[str, ...]


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS),
    "mistral": ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS),
    "qwen2": ArchSpec(blocks="model.layers", targets=LLAMA_LINEARS),
}


def arch_spec(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelLoadError(
            f"architecture {model_type!r} is not supported yet: supported are {', '.join(sorted(ARCHITECTURES))}"
        ) from None
