"""``genai_config.json``: what ONNX Runtime GenAI needs to load an export folder with a fused graph
(``onnxruntime_genai.Model(folder)``), beside the files optimum reads. The fused graph already has
GenAI's shape (GroupQueryAttention over ``past_key_values.{i}.key|value`` -> ``present.{i}...``,
positions from the attention mask), so the config names the tensors and the model's sizes, and
asks for GenAI's shared past/present buffer (``past_present_share_buffer``), which
GroupQueryAttention fills in place.
"""

from __future__ import annotations

from torch import nn

from runtime.graph import PAST_PREFIX, PRESENT_PREFIX
from runtime.layout import AttentionLayout

GENAI_FILE = "genai_config.json"


def _ids(value) -> int | list[int] | None:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) != 1 else int(value[0])
    return None if value is None else int(value)


def genai_config(model: nn.Module, onnx_name: str, session_config: dict[str, str] | None = None) -> dict:
    cfg, lay = model.config, AttentionLayout.of(model.config)
    gen = getattr(model, "generation_config", None)
    eos = _ids(getattr(gen, "eos_token_id", None) or cfg.eos_token_id)
    bos = _ids(getattr(gen, "bos_token_id", None) or getattr(cfg, "bos_token_id", None))
    pad = _ids(getattr(cfg, "pad_token_id", None))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    context = int(cfg.max_position_embeddings)
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    if session_config:
        session["config_entries"] = dict(session_config)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": session,
                "filename": onnx_name,
                "head_size": lay.head_dim,
                "hidden_size": int(cfg.hidden_size),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": PAST_PREFIX + "%d.key",
                    "past_value_names": PAST_PREFIX + "%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_PREFIX + "%d.key",
                    "present_value_names": PRESENT_PREFIX + "%d.value",
                },
                "num_attention_heads": lay.heads,
                "num_hidden_layers": lay.layers,
                "num_key_value_heads": lay.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": cfg.model_type,
            "vocab_size": int(cfg.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
