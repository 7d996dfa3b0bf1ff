"""A decoder-only transformer (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) in Flax NNX with
stacked, scanned layers.

The layers live in one `DecoderBlock` whose parameters carry a leading layer axis
[L, ...]; the forward pass runs them with `jax.lax.scan`, so compile time does not grow
with depth and merge code can treat "layer" as an ordinary array axis. What differs per
layer (Gemma's alternating local and global layers) is data scanned beside them.

Decoding is the exception: a loop of many steps over the same weights, bound by reading
them. A layer's weights read as a slice of the stacked arrays are copied first (XLA
materialises the slice, in `lax.scan` at every step), which triples the bytes a step moves;
so decoding loops split the layers once (`split_layers`) and run them in a Python loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.modules import DecoderBlock, Embedding, Linear, RMSNorm, causal_mask, soft_cap

KVCache = tuple[jax.Array, jax.Array]  # keys and values, each [L, B, S, K, H]
LayerCaches = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: keys and values, each [B, S, K, H]
LayerParams = tuple[nnx.State, ...]  # per layer: its parameters, arrays of their own


def stacked_blocks(config: TransformerConfig, dtype, rngs: nnx.Rngs) -> DecoderBlock:
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock(config, dtype=dtype, rngs=rngs)

    return make(rngs)


def embed(embedding: Embedding, input_ids: jax.Array, config: TransformerConfig) -> jax.Array:
    """Token embeddings [B, T, D]; Gemma scales them by sqrt(D), rounded to their dtype as transformers does."""
    x = embedding(input_ids)
    return x * jnp.asarray(config.hidden_size**0.5, x.dtype) if config.scale_embeddings else x


def output_logits(x: jax.Array, embedding: Embedding, lm_head: Linear | None, config: TransformerConfig) -> jax.Array:
    """Logits [B, T, V] of the final normed hidden states [B, T, D] (tied: the embedding's transpose)."""
    logits = embedding.attend(x) if lm_head is None else lm_head(x)
    return soft_cap(logits, config.final_logit_softcap)


def final_norm(config: TransformerConfig, dtype) -> RMSNorm:
    return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, gemma=config.gemma_norm)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions [B, T] for left-padded rows: 0 at each row's first real token
    (transformers' `cumsum - 1`, padding set to 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _layer(index: int, stacked: jax.Array) -> jax.Array:
    return stacked[index]


class Transformer(nnx.Module):
    """`model(input_ids)` -> logits [B, T, V]. Parameters: `nnx.split(model)`."""

    def __init__(self, config: TransformerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = stacked_blocks(config, dtype, rngs)
        self.norm = final_norm(c, dtype)
        self.lm_head = (
            None if c.tie_word_embeddings
            else Linear(c.hidden_size, c.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    @property
    def dtype(self):
        return self.embed_tokens.weight[...].dtype

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 logits_last: int | None = None) -> jax.Array:
        """Logits [B, T, V] for input_ids [B, T]; attention_mask [B, T] marks real tokens
        (0 for left padding). logits_last=k: the logits at the last k positions only [B, k, V]."""
        B, T = input_ids.shape
        self.config.check_token_ids(input_ids)  # NaN logits otherwise (concrete ids only)
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        query_index = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = causal_mask(query_index, attention_mask)
        logits, _ = self.forward(input_ids, positions_from_mask(attention_mask), mask, logits_last=logits_last)
        return logits

    def forward(
        self,
        input_ids: jax.Array,  # [B, T]
        positions: jax.Array,  # [B, T]
        mask: jax.Array,  # [B, T, S]
        kv_cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        inputs_embeds: jax.Array | None = None,  # [B, T, D], instead of embedding input_ids
        logits_last: int | None = None,  # logits at the last this many positions only (None: all)
        layers: LayerParams | None = None,  # `split_layers()`: the layers one by one (kv_cache: LayerCaches)
    ) -> tuple[jax.Array, KVCache | LayerCaches | None]:
        """The whole network, with an optional KV cache written at `cache_index`. mask: causal
        and padding; each layer applies its own sliding window. logits_last: the output head
        (the largest matmul of a small model, and logits [B, T, V]) at the last positions only.
        layers: this model's layers split by `split_layers`, run in a Python loop that reads each
        weight in place, with a cache per layer; for decoding loops (`interfaces.decoding`)."""
        c = self.config
        x = embed(self.embed_tokens, input_ids, c) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        graphdef, layer_params = nnx.split(self.layers)
        if layers is not None:
            caches = []
            for i, params in enumerate(layers):
                cache = None if kv_cache is None else kv_cache[i]
                x, cache = nnx.merge(graphdef, params)(x, positions, mask, cache, cache_index, c.sliding_layers[i])
                caches.append(cache)
            kv_cache = None if kv_cache is None else tuple(caches)
        else:
            def layer(x, inputs):
                params, cache, slides = inputs
                return nnx.merge(graphdef, params)(x, positions, mask, cache, cache_index, slides)

            sliding = jnp.asarray(c.sliding_layers)  # [L]
            x, kv_cache = jax.lax.scan(layer, x, (layer_params, kv_cache, sliding))
        x = x if logits_last is None else x[:, -logits_last:]  # the head only where logits are read
        return output_logits(self.norm(x), self.embed_tokens, self.lm_head, c), kv_cache

    def split_layers(self) -> LayerParams:
        """Each layer's parameters as arrays of their own (a copy of the stacked ones), for
        `forward(layers=...)`: made once before a decoding loop, they are read in place at
        every step."""
        _, stacked = nnx.split(self.layers)
        return tuple(jax.tree.map(functools.partial(_layer, i), stacked) for i in range(self.config.num_layers))

    def init_cache(self, batch_size: int, length: int) -> KVCache:
        c = self.config
        shape = (c.num_layers, batch_size, length, c.num_kv_heads, c.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)
