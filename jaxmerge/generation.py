"""Greedy decoding with a static KV cache, one `jax.jit` for the whole loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmerge.models.interfaces import VisionLanguageModel
from jaxmerge.models.modules import causal_mask
from jaxmerge.models.transformer import positions_from_mask


def generate(
    model: nnx.Module,
    input_ids,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    attention_mask=None,
    pad_token_id: int | None = None,
    pixel_values=None,
    image_sizes=None,
    feature_index=None,
) -> jax.Array:
    """Greedy continuation of input_ids [B, T] (left-padded, with attention_mask [B, T]
    marking real tokens). Returns [B, T + max_new_tokens]: the prompt, then new tokens;
    after a row's EOS, pad_token_id (default: the first EOS id, as transformers does).
    Decoding stops early once every row has ended. One compilation serves every call
    with the same shapes, max_new_tokens and number of EOS ids. For a VLM, pixel_values
    are the images of the prompt's image tokens (and image_sizes, for LLaVA-NeXT), as its
    transformers processor returns them; inside jit, pass LLaVA-NeXT's feature_index
    (`model.image_inputs(pixel_values, image_sizes)["feature_index"]`) instead of image_sizes.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    eos_ids = jnp.asarray(eos or [-1], jnp.int32)  # -1 never matches a token
    images = {}
    if pixel_values is not None:
        if not isinstance(model, VisionLanguageModel):
            raise ValueError(f"pixel_values given, but {type(model).__name__} takes no images")
        images = model.image_inputs(pixel_values, image_sizes, feature_index)
        model.check_image_tokens(input_ids, images, padded=feature_index is not None)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, input_ids, attention_mask, eos_ids, jnp.int32(pad_token_id), images,
                     max_new_tokens=int(max_new_tokens))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, state, input_ids, attention_mask, eos_ids, pad_id, images, *, max_new_tokens):
    model = nnx.merge(graphdef, state)
    window = model.sliding_window
    B, T = input_ids.shape
    S = T + max_new_tokens
    key_valid = jnp.concatenate([attention_mask, jnp.ones((B, max_new_tokens), jnp.int32)], axis=1)  # [B, S]

    # Prefill: the whole prompt at once, its keys and values written at cache[0:T].
    positions = positions_from_mask(attention_mask)  # [B, T]
    mask = causal_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), key_valid, window)  # [B, T, S]
    logits, cache = model.forward(input_ids, positions, mask, model.init_cache(B, S), 0, **images)
    first_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
    next_position = positions[:, -1] + 1  # [B]
    tokens = jnp.concatenate([input_ids, jnp.full((B, max_new_tokens), pad_id, jnp.int32)], axis=1)

    def not_finished(carry):
        step, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(carry):
        step, token, done, cache, tokens = carry
        token = jnp.where(done, pad_id, token)
        index = T + step
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, index))
        done = done | jnp.isin(token, eos_ids)
        mask = causal_mask(jnp.full((B, 1), index), key_valid, window)  # [B, 1, S]
        logits, cache = model.forward(token[:, None], (next_position + step)[:, None], mask, cache, index)
        return step + 1, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), done, cache, tokens

    carry = (jnp.int32(0), first_token, jnp.zeros((B,), bool), cache, tokens)
    return jax.lax.while_loop(not_finished, decode_step, carry)[-1]
