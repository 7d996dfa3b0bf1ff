"""Frozen configuration of a decoder-only transformer (Llama / Mistral family)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding, as transformers' `rope_parameters` describe it."""

    theta: float = 10_000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything the Flax model needs; hashable, so it can be static under `jax.jit`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    sliding_window: int | None = None  # keys further back than this are not attended
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_dim"):  # divisors and shapes: 0 fails obscurely later
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def check_token_ids(self, input_ids, name: str = "input_ids", also_allowed: int | None = None) -> None:
        """Raises ValueError if concrete `input_ids` hold an id outside the vocabulary: the
        embedding lookup would give NaN logits for it, or wrap a negative id around. Traced
        ids (inside jit) are not checked. also_allowed: an id outside it that the caller
        handles (a VLM's image token)."""
        if isinstance(input_ids, jax.core.Tracer):
            return
        ids = np.asarray(input_ids)
        outside = (ids < 0) | (ids >= self.vocab_size)
        if also_allowed is not None:
            outside &= ids != also_allowed
        if outside.any():
            where = tuple(int(i) for i in np.argwhere(outside)[0])
            raise ValueError(f"{name} holds token id {ids[where]} at {list(where)}, outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")

    @property
    def num_groups(self) -> int:
        """Query heads sharing one key/value head (1: multi-head, num_heads: multi-query)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def tiny(cls, **overrides) -> "TransformerConfig":
        """A small preset for tests and toy experiments."""
        fields = dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16,
        )
        fields.update(overrides)
        return cls(**fields)
