"""Attention facts of a decoder, read from its config (a transformers config object or the
``config.json`` dict of an export folder): the one place they are computed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _get(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class AttentionLayout:
    layers: int
    heads: int
    kv_heads: int  # grouped-query attention: each key/value head serves heads // kv_heads query heads
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> AttentionLayout:
        heads = _get(config, "num_attention_heads")
        kv_heads = _get(config, "num_key_value_heads") or heads
        head_dim = _get(config, "head_dim") or _get(config, "hidden_size") // heads
        return cls(_get(config, "num_hidden_layers"), heads, kv_heads, head_dim)

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads
