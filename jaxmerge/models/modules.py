"""Building blocks of a decoder (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3): linear, RMSNorm,
RoPE, attention, MLP, block.

A linear layer's `kernel` is [in, out] (Flax's layout, about twice as fast as torch's
[out, in] for decoding on CPU); the checkpoint code transposes it to and from the
`weight` of a Hugging Face checkpoint. Axis names used in shape comments:
  B batch, T query length, S key length (cache length), D hidden size,
  N query heads = K key/value heads x G groups, H head dim, F MLP size, V vocabulary.
"""

from __future__ import annotations

import functools
import math

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

default_init = nnx.initializers.normal(0.02)  # transformers' initializer_range default

# A finite "minus infinity": a fully masked row (a left-padding query) stays NaN-free.
def _mask_value(dtype) -> float:
    return float(jnp.finfo(dtype).min)


def matmul(subscripts: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    """einsum of activations and a weight, accumulated in float32 and rounded to x's dtype. Said
    explicitly so that XLA-CPU keeps a bfloat16 weight as it is (its native bf16 dot) instead of
    writing a float32 copy of it at every call, which made bf16 decoding 3x slower than float32's."""
    return jnp.einsum(subscripts, x, weight, preferred_element_type=jnp.float32).astype(x.dtype)


class Linear(nnx.Module):
    """y = x K (+ b), kernel K [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(default_init(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul("...i,io->...o", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token embedding [V, D]; `attend` is the tied output projection."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(default_init(rngs.params(), (num_embeddings, features), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]
        return matmul("btd,vd->btv", x, self.weight[...])


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis. Llama's scales by w after casting back to the input
    dtype; Gemma's (`gemma=True`) by (1 + w) in float32, then casts."""

    def __init__(self, size: int, *, eps: float, dtype, gemma: bool = False):
        self.weight = nnx.Param(jnp.zeros((size,), dtype) if gemma else jnp.ones((size,), dtype))
        self.eps = eps
        self.gemma = gemma

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * x32.astype(x.dtype)


def _float32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int, seq_len: jax.Array | int | None = None):
    """Inverse frequencies [R/2] in float32 (R = the rotating part of a head), for the rope
    types transformers calls "default", "linear", "llama3", "yarn", "dynamic" and "longrope".
    seq_len (the largest position + 1; may be traced) is read by "dynamic" and "longrope"
    only: they change with the length (numpy otherwise, jax then)."""
    dim = int(head_dim * rope.partial_rotary_factor)
    exponents = _float32(np.arange(0, dim, 2)) / np.float32(dim)
    powers = _float32(np.float32(rope.theta) ** exponents)  # base ** (2i / dim)
    inv_freq = _float32(1.0 / powers)
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":
        return _float32(inv_freq / np.float32(rope.factor))
    if rope.rope_type == "llama3":
        context = rope.original_max_position_embeddings
        low_freq_wavelen = context / rope.low_freq_factor
        high_freq_wavelen = context / rope.high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return _float32(np.where(is_medium, smoothed, scaled))
    if rope.rope_type == "yarn":
        def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in the context
            context = rope.original_max_position_embeddings
            return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((_float32(np.arange(dim // 2)) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = _float32(1 - ramp)  # 1: keep the frequency, 0: interpolate it
        interpolated = _float32(1.0 / (np.float32(rope.factor) * powers))
        return _float32(interpolated * (1 - extrapolation) + inv_freq * extrapolation)
    if rope.rope_type == "dynamic":  # NTK: the base grows once the length passes max_position_embeddings
        if seq_len is None:
            return inv_freq
        limit = rope.max_position_embeddings
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), limit)
        base = rope.theta * (rope.factor * length / limit - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base ** jnp.asarray(exponents)
    if rope.rope_type == "longrope":  # per-frequency divisors, the long ones past the original context
        short, long_ = _float32(rope.short_factor), _float32(rope.long_factor)
        if seq_len is None:
            return _float32(1.0 / (short * powers))
        factors = jnp.where(jnp.asarray(seq_len) > rope.original_max_position_embeddings, long_, short)
        return 1.0 / (factors * jnp.asarray(powers))
    raise ValueError(f"unsupported rope_type {rope.rope_type!r} "
                     "(supported: default, linear, llama3, yarn, dynamic, longrope)")


def rope_attention_scaling(rope: RopeConfig, max_position_embeddings: int) -> float:
    """The factor cos and sin are multiplied by (yarn's and longrope's "attention factor")."""
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.rope_type == "yarn":
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if rope.mscale and rope.mscale_all_dim:
            return float(mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim))
        return mscale(rope.factor)
    if rope.rope_type == "longrope":
        factor = max_position_embeddings / rope.original_max_position_embeddings
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(rope.original_max_position_embeddings))
    return 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, scaling=1.0) -> jax.Array:
    """Rotates x [B, T, N, H] by positions [B, T] (the "rotate half" convention of HF Llama);
    with R = 2 len(inv_freq) < H, only the first R features of each head rotate."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    cos, sin = (jnp.cos(angles) * scaling).astype(x.dtype), (jnp.sin(angles) * scaling).astype(x.dtype)
    rotary = angles.shape[-1]
    x, passed = x[..., :rotary], x[..., rotary:]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x * cos + rotated * sin, passed], axis=-1)


def causal_mask(query_index: jax.Array, key_valid: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """Which keys each query may attend to: mask [B, T, S] (True = attend).

    query_index [B, T]: each query's index in the key sequence; key_valid [B, S]: False
    for padding. A sliding window keeps keys with query - key < window, as transformers
    does (models apply their layers' windows themselves: see `Attention`).
    """
    key_index = jnp.arange(key_valid.shape[1])[None, None, :]  # [1, 1, S]
    query_index = query_index[:, :, None]  # [B, T, 1]
    mask = key_index <= query_index
    if sliding_window is not None:
        mask &= key_index > query_index - sliding_window
    return mask & key_valid[:, None, :].astype(bool)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): Gemma 2's bound on attention scores and logits."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
    """Grouped-query attention with RoPE. Per layer (traced, so that one scan runs every
    layer and a layer path any order of them): whether the layer slides."""

    def __init__(self, config: TransformerConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.config = config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if c.fused_projections:  # Phi-3: one projection [D, q + 2 kv], split after
            self.qkv_proj = Linear(c.hidden_size, q + 2 * kv, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        else:
            self.q_proj = Linear(c.hidden_size, q, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
            self.k_proj = Linear(c.hidden_size, kv, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
            self.v_proj = Linear(c.hidden_size, kv, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(q, c.hidden_size, bias=c.o_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype, gemma=c.gemma_norm)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype, gemma=c.gemma_norm)

    def _rope(self, positions: jax.Array, sliding: jax.Array):
        """This layer's inverse frequencies and cos/sin scale (Gemma 3's local layers have their own)."""
        c = self.config
        seq_len = jnp.max(positions) + 1
        inv_freq = rope_inverse_frequencies(c.rope, c.head_dim, seq_len)
        scaling = rope_attention_scaling(c.rope, c.max_position_embeddings)
        if c.rope_local is not None:
            local = rope_inverse_frequencies(c.rope_local, c.head_dim, seq_len)
            inv_freq = jnp.where(sliding, local, inv_freq)
            scaling = jnp.where(sliding, rope_attention_scaling(c.rope_local, c.max_position_embeddings), scaling)
        return inv_freq, scaling

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        mask: jax.Array,  # [B, T, S]: causal and padding (each layer adds its window)
        kv_cache: tuple[jax.Array, jax.Array] | None = None,  # 2 x [B, S, K, H]
        cache_index: jax.Array | int = 0,
        sliding: jax.Array | bool = False,  # [] this layer attends within the sliding window
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c = self.config
        B, T, _ = x.shape
        if c.fused_projections:
            q, k, v = jnp.split(self.qkv_proj(x), [c.num_heads * c.head_dim, (c.num_heads + c.num_kv_heads)
                                                   * c.head_dim], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, c.num_heads, c.head_dim)  # [B, T, N, H]
        k = k.reshape(B, T, c.num_kv_heads, c.head_dim)  # [B, T, K, H]
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, scaling = self._rope(positions, sliding)
        q, k = apply_rope(q, positions, inv_freq, scaling), apply_rope(k, positions, inv_freq, scaling)

        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)  # [B, S, K, H]
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            kv_cache = (k, v)

        if c.sliding_window is not None:  # queries sit at cache_index + t, keys at 0..S-1
            query_index = cache_index + jnp.arange(T)[:, None]  # [T, 1]
            in_window = jnp.arange(k.shape[1])[None, :] > query_index - c.sliding_window  # [T, S]
            mask = mask & (in_window | ~jnp.asarray(sliding))[None]

        # Query head n uses key/value head n // G, as transformers' repeat_kv does.
        q = q.reshape(B, T, c.num_kv_heads, c.num_groups, c.head_dim)  # [B, T, K, G, H]
        scale = (c.head_dim if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar) ** -0.5
        scores = soft_cap(jnp.einsum("btkgh,bskh->bkgts", q, k) * scale, c.attn_logit_softcap)  # [B, K, G, T, S]
        scores = jnp.where(mask[:, None, None], scores, _mask_value(scores.dtype))
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, c.num_heads * c.head_dim)
        return self.o_proj(out), kv_cache


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); Phi-3 stores gate and up as one gate_up_proj."""

    def __init__(self, config: TransformerConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        bias = c.mlp_bias
        if c.fused_projections:
            self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size, bias=bias, dtype=dtype, rngs=rngs)
        else:
            self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=bias, dtype=dtype, rngs=rngs)
            self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=bias, dtype=dtype, rngs=rngs)
        self.activation = c.hidden_act
        self.fused = c.fused_projections

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)  # 2 x [B, T, F]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ACTIVATIONS[self.activation](gate) * up)


class DecoderBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). With sandwich norms (Gemma)
    the attention and MLP outputs are normed too, before the residual sum; the norms keep
    transformers' names (post_attention_layernorm is then the one after attention)."""

    def __init__(self, config: TransformerConfig, *, dtype, rngs: nnx.Rngs):
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (supported: {sorted(ACTIVATIONS)})")

        def norm():
            return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, gemma=config.gemma_norm)

        self.input_layernorm = norm()
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.sandwich = config.sandwich_norms

    def __call__(self, x, positions, mask, kv_cache=None, cache_index=0, sliding=False):
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, mask, kv_cache, cache_index, sliding)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn_out)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), kv_cache
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache
