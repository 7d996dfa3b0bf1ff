"""A decoder-only transformer (Llama / Mistral) in Flax NNX with stacked, scanned layers.

The layers live in one `DecoderBlock` whose parameters carry a leading layer axis
[L, ...]; the forward pass runs them with `jax.lax.scan`, so compile time does not grow
with depth and merge code can treat "layer" as an ordinary array axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.modules import DecoderBlock, Embedding, Linear, RMSNorm, causal_mask

KVCache = tuple[jax.Array, jax.Array]  # keys and values, each [L, B, S, K, H]


def _stacked_blocks(config: TransformerConfig, dtype, rngs: nnx.Rngs) -> DecoderBlock:
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock(config, dtype=dtype, rngs=rngs)

    return make(rngs)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions [B, T] for left-padded rows: 0 at each row's first real token
    (transformers' `cumsum - 1`, padding set to 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nnx.Module):
    """`model(input_ids)` -> logits [B, T, V]. Parameters: `nnx.split(model)`."""

    def __init__(self, config: TransformerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = _stacked_blocks(config, dtype, rngs)
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None if c.tie_word_embeddings
            else Linear(c.hidden_size, c.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    @property
    def dtype(self):
        return self.embed_tokens.weight[...].dtype

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] for input_ids [B, T]; attention_mask [B, T] marks real tokens
        (0 for left padding)."""
        B, T = input_ids.shape
        self.config.check_token_ids(input_ids)  # NaN logits otherwise (concrete ids only)
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        query_index = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = causal_mask(query_index, attention_mask, self.config.sliding_window)
        logits, _ = self.forward(input_ids, positions_from_mask(attention_mask), mask)
        return logits

    def forward(
        self,
        input_ids: jax.Array,  # [B, T]
        positions: jax.Array,  # [B, T]
        mask: jax.Array,  # [B, T, S]
        kv_cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        inputs_embeds: jax.Array | None = None,  # [B, T, D], instead of embedding input_ids
    ) -> tuple[jax.Array, KVCache | None]:
        """The whole network, with an optional KV cache written at `cache_index`."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        graphdef, layer_params = nnx.split(self.layers)

        def layer(x, params_and_cache):
            params, cache = params_and_cache
            return nnx.merge(graphdef, params)(x, positions, mask, cache, cache_index)

        x, kv_cache = jax.lax.scan(layer, x, (layer_params, kv_cache))
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed_tokens.attend(x), kv_cache
        return self.lm_head(x), kv_cache

    @property
    def sliding_window(self) -> int | None:
        return self.config.sliding_window

    def init_cache(self, batch_size: int, length: int) -> KVCache:
        c = self.config
        shape = (c.num_layers, batch_size, length, c.num_kv_heads, c.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)
