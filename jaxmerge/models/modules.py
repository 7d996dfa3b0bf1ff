"""Building blocks of a Llama/Mistral decoder: linear, RMSNorm, RoPE, attention, MLP, block.

A linear layer's `kernel` is [in, out] (Flax's layout, about twice as fast as torch's
[out, in] for decoding on CPU); the checkpoint code transposes it to and from the
`weight` of a Hugging Face checkpoint. Axis names used in shape comments:
  B batch, T query length, S key length (cache length), D hidden size,
  N query heads = K key/value heads x G groups, H head dim, F MLP size, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmerge.models.config import RopeConfig, TransformerConfig

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

_init = nnx.initializers.normal(0.02)

# A finite "minus infinity": a fully masked row (a left-padding query) stays NaN-free.
def _mask_value(dtype) -> float:
    return float(jnp.finfo(dtype).min)


class Linear(nnx.Module):
    """y = x K (+ b), kernel K [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token embedding [V, D]; `attend` is the tied output projection."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_init(rngs.params(), (num_embeddings, features), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]
        return jnp.einsum("btd,vd->btv", x, self.weight[...])


class RMSNorm(nnx.Module):
    def __init__(self, size: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32, scale in the input dtype: what transformers does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [H/2] in float32, for the rope types transformers calls
    "default", "linear" and "llama3"."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        context = rope.original_max_position_embeddings
        low_freq_wavelen = context / rope.low_freq_factor
        high_freq_wavelen = context / rope.high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_type {rope.rope_type!r} (supported: default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [B, T, N, H] by positions [B, T] (the "rotate half" convention of HF Llama)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def causal_mask(query_index: jax.Array, key_valid: jax.Array, sliding_window: int | None) -> jax.Array:
    """Which keys each query may attend to: mask [B, T, S] (True = attend).

    query_index [B, T]: each query's index in the key sequence; key_valid [B, S]: False
    for padding. A sliding window keeps keys with query - key < window, as transformers does.
    """
    key_index = jnp.arange(key_valid.shape[1])[None, None, :]  # [1, 1, S]
    query_index = query_index[:, :, None]  # [B, T, 1]
    mask = key_index <= query_index
    if sliding_window is not None:
        mask &= key_index > query_index - sliding_window
    return mask & key_valid[:, None, :].astype(bool)


class Attention(nnx.Module):
    def __init__(self, config: TransformerConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.config = config
        bias = c.attention_bias
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        mask: jax.Array,  # [B, T, S]
        kv_cache: tuple[jax.Array, jax.Array] | None = None,  # 2 x [B, S, K, H]
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.config
        B, T, _ = x.shape
        inv_freq = rope_inverse_frequencies(c.rope, c.head_dim)
        q = apply_rope(self.q_proj(x).reshape(B, T, c.num_heads, c.head_dim), positions, inv_freq)
        k = apply_rope(self.k_proj(x).reshape(B, T, c.num_kv_heads, c.head_dim), positions, inv_freq)
        v = self.v_proj(x).reshape(B, T, c.num_kv_heads, c.head_dim)  # [B, T, K, H]

        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)  # [B, S, K, H]
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            kv_cache = (k, v)

        # Query head n uses key/value head n // G, as transformers' repeat_kv does.
        q = q.reshape(B, T, c.num_kv_heads, c.num_groups, c.head_dim)  # [B, T, K, G, H]
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k) * c.head_dim**-0.5  # [B, K, G, T, S]
        scores = jnp.where(mask[:, None, None], scores, _mask_value(scores.dtype))
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, c.num_heads * c.head_dim)
        return self.o_proj(out), kv_cache


class MLP(nnx.Module):
    def __init__(self, config: TransformerConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        bias = c.mlp_bias
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=bias, dtype=dtype, rngs=rngs)
        self.activation = c.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        gate = ACTIVATIONS[self.activation](self.gate_proj(x))  # [B, T, F]
        return self.down_proj(gate * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: TransformerConfig, *, dtype, rngs: nnx.Rngs):
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (supported: {sorted(ACTIVATIONS)})")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, mask, kv_cache=None, cache_index=0):
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, mask, kv_cache, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache
