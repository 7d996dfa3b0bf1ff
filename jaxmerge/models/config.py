"""Frozen configuration of a decoder-only transformer: Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3.

One config describes every family: their differences are flags (biases, q/k norms, Gemma's
norms and soft-capping, fused projections) and per-layer data (which layers slide).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding, as transformers' `rope_parameters` describe it."""

    theta: float = 10_000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3" | "yarn" | "dynamic" | "longrope"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3, yarn, longrope
    partial_rotary_factor: float = 1.0  # the fraction of each head that rotates (Phi-3 family)
    # yarn: ramp bounds, and the cos/sin scale (None: from factor and mscale, as transformers does).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope: per-frequency divisors below and above original_max_position_embeddings.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # dynamic: the length up to which nothing is scaled (the config's max_position_embeddings).
    max_position_embeddings: int = 0


LAYER_TYPES = ("full_attention", "sliding_attention")


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
    qkv_bias: bool = False  # biases on q/k/v (Llama's attention_bias, Qwen2)
    o_bias: bool = False  # a bias on o_proj (Llama's attention_bias; Qwen2 has none)
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)
    gemma_norm: bool = False  # RMSNorm scales by (1 + w), in float32 (Gemma)
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma 2/3)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power (None: head_dim)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits likewise (Gemma 2)
    fused_projections: bool = False  # one qkv_proj and one gate_up_proj (Phi-3)
    # Per layer, "full_attention" or "sliding_attention"; None: every layer slides if
    # sliding_window is set (Mistral), none does otherwise.
    layer_types: tuple[str, ...] | None = None
    rope_local: RopeConfig | None = None  # the sliding layers' RoPE, where it differs (Gemma 3)

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_dim"):  # divisors and shapes: 0 fails obscurely later
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = set(self.layer_types) - set(LAYER_TYPES)
            if unknown:
                raise ValueError(f"unknown layer type(s) {sorted(unknown)} (supported: {', '.join(LAYER_TYPES)})")
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
    def context_length(self) -> int | None:
        """The longest sequence (prompt and new tokens) the model is made for: max_position_embeddings,
        or the length its RoPE scaling stretches positions to (linear: factor times it; llama3 and
        yarn: factor times the original length), whichever is longer, as vLLM derives its
        max_model_len. None under dynamic NTK scaling, which adapts RoPE to any length."""
        lengths = [self.max_position_embeddings]
        for rope in (self.rope, self.rope_local):
            if rope is None:
                continue
            if rope.rope_type == "dynamic":
                return None
            if rope.rope_type == "linear":
                lengths.append(int(self.max_position_embeddings * rope.factor))
            elif rope.rope_type in ("llama3", "yarn"):
                lengths.append(int(rope.original_max_position_embeddings * rope.factor))
        return max(lengths)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends within the sliding window only."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.layer_types is None:
            return (True,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def features(self) -> list[str]:
        """What sets this config apart from a plain Llama, in words (for `jaxmerge info`)."""
        flags = [("qkv-bias", self.qkv_bias), ("o-bias", self.o_bias), ("mlp-bias", self.mlp_bias),
                 ("qk-norm", self.qk_norm), ("gemma-norm", self.gemma_norm),
                 ("sandwich-norms", self.sandwich_norms), ("embedding-scale", self.scale_embeddings),
                 ("attn-softcap", self.attn_logit_softcap is not None),
                 ("final-softcap", self.final_logit_softcap is not None),
                 ("sliding-window", self.sliding_window is not None),
                 ("local/global layers", len(set(self.sliding_layers)) > 1),
                 ("fused-qkv", self.fused_projections), ("fused-gate-up", self.fused_projections),
                 ("partial-rotary", self.rope.partial_rotary_factor < 1),
                 ("tied-embeddings", self.tie_word_embeddings)]
        return [name for name, on in flags if on]

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
