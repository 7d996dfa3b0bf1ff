"""Greedy decoding with a static KV cache, one `jax.jit` for the whole loop."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.interfaces import VisionLanguageModel, decoding, language_model
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
    _check_arguments(model, input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id,
                     images=pixel_values is not None)
    if pixel_values is None and (image_sizes is not None or feature_index is not None):
        raise ValueError("image_sizes or feature_index given without pixel_values: the images would be ignored")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
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
    return greedy_program(graphdef, state, input_ids, attention_mask, eos_ids, jnp.int32(pad_token_id), images,
                     max_new_tokens=int(max_new_tokens))


def _is_integer(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_arguments(model, input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id,
                     images: bool) -> None:
    """Bad arguments as ValueErrors naming them, on the host before jit: inside it an empty
    prompt or a negative length fails obscurely, and an all-padding row, right padding or
    a token id outside the vocabulary (NaN logits, or a negative id wrapping around) give
    wrong tokens silently. Values are checked only when concrete (not traced)."""
    if not _is_integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and not all(_is_integer(v) for v in np.ravel(np.asarray(value, dtype=object))):
            raise ValueError(f"{name} must be an integer token id (or a list of them, for eos_token_id), got {value!r}")
    shape = np.shape(input_ids)
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {shape}): each prompt needs at least one token")
    dtype = input_ids.dtype if hasattr(input_ids, "dtype") else np.asarray(input_ids).dtype  # a tracer: its dtype only
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {dtype}")
    if attention_mask is not None and np.shape(attention_mask) != shape:
        raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {shape}")
    check_length(text_config(model), shape[1], int(max_new_tokens))
    _check_cache_memory(model, shape[0], shape[1] + int(max_new_tokens), int(max_new_tokens))
    # A VLM's image tokens stand for image features, whatever the vocabulary.
    image_token = model.config.image_token_id if images and isinstance(model, VisionLanguageModel) else None
    text_config(model).check_token_ids(input_ids, "input_ids", also_allowed=image_token)
    if attention_mask is None or isinstance(attention_mask, jax.core.Tracer):
        return
    mask = np.asarray(attention_mask)
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"attention_mask row {empty[0]} is all 0: the prompt has no tokens")
    right_padded = np.flatnonzero(mask[:, -1] == 0)  # generation continues from the last column
    if right_padded.size:
        raise ValueError(f"attention_mask row {right_padded[0]} ends in padding: generate needs left-padded prompts "
                         "(tokenizer.padding_side = 'left')")


def text_config(model) -> TransformerConfig:
    """The config of the model's language model (a layer path's wraps one)."""
    return language_config(language_model(model).config)


def language_config(config) -> TransformerConfig:
    """The language model's config within a model's config (a VLM's or a layer path's wraps one)."""
    while not isinstance(config, TransformerConfig):
        config = config.text
    return config


def check_length(config: TransformerConfig, prompt_length: int, max_new_tokens: int,
                 name: str = "max_new_tokens") -> None:
    """Raises ValueError, naming `name`, if the prompt and the new tokens pass the model's context
    (`TransformerConfig.context_length`): positions it was not made for, and a KV cache sized for
    them (10^8 new tokens would allocate hundreds of GB before failing)."""
    limit = config.context_length
    total = prompt_length + max_new_tokens
    if limit is not None and total > limit:
        what = "max_position_embeddings" + ("" if limit == config.max_position_embeddings else " and RoPE scaling")
        raise ValueError(f"{name} {max_new_tokens}: with the prompt's {prompt_length} tokens that is {total} "
                         f"positions, beyond the model's context of {limit} tokens ({what} in its config.json)")


def _check_cache_memory(model, batch: int, length: int, max_new_tokens: int) -> None:
    """Raises ValueError if the KV cache for `length` positions would not fit in the memory of all
    devices together, before compiling: the bound where no context bounds the length (dynamic RoPE
    scaling), or where a batch is large."""
    memory = _memory_bytes()
    if memory is None:
        return
    cache = jax.eval_shape(lambda: model.init_cache(batch, length))
    need = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))
    if need > memory:
        raise ValueError(f"max_new_tokens {max_new_tokens}: the KV cache for {batch} prompt(s) of {length} positions "
                         f"needs {need / 2**30:.1f} GiB, more than the {memory / 2**30:.1f} GiB of all devices' memory")


@functools.cache
def _memory_bytes() -> int | None:
    """The memory of all devices together: each accelerator's limit, and the host's memory once for
    CPU devices (or one that does not say); None if unknown."""
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = None
    total, host_counted = 0, False
    for device in jax.local_devices():
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
        except Exception:  # a backend without memory statistics
            limit = None
        if limit:
            total += limit
        elif not host_counted:
            if host is None:
                return None
            total, host_counted = total + host, True
    return total * jax.process_count()


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def greedy_program(graphdef, state, input_ids, attention_mask, eos_ids, pad_id, images, *, max_new_tokens):
    """`generate`'s compiled program: one per graph, batch shape and max_new_tokens (its
    cache size tells how often generation compiled)."""
    model = nnx.merge(graphdef, state)
    B, T = input_ids.shape
    S = T + max_new_tokens
    key_valid = jnp.concatenate([attention_mask, jnp.ones((B, max_new_tokens), jnp.int32)], axis=1)  # [B, S]

    # Prefill: the whole prompt at once, its keys and values written at cache[0:T].
    positions = positions_from_mask(attention_mask)  # [B, T]
    mask = causal_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), key_valid)  # [B, T, S]
    # the output head at the last position only: the prompt's other logits are never read
    forward, cache, _ = decoding(model, model.init_cache(B, S))  # the layers split once: each step reads them in place
    logits, cache = forward(input_ids, positions, mask, cache, 0, logits_last=1, **images)
    first_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
    next_position = positions[:, -1] + 1  # [B]
    tokens = jnp.concatenate([input_ids, jnp.full((B, max_new_tokens), pad_id, jnp.int32)], axis=1)

    def not_finished(carry):  # the last token is written after the loop: nothing follows it, so no forward
        step, _, done, _, _ = carry
        return (step < max_new_tokens - 1) & ~jnp.all(done)

    def decode_step(carry):
        step, token, done, cache, tokens = carry
        token = jnp.where(done, pad_id, token)
        index = T + step
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, index))
        done = done | jnp.isin(token, eos_ids)
        mask = causal_mask(jnp.full((B, 1), index), key_valid)  # [B, 1, S]
        logits, cache = forward(token[:, None], (next_position + step)[:, None], mask, cache, index)
        return step + 1, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), done, cache, tokens

    carry = (jnp.int32(0), first_token, jnp.zeros((B,), bool), cache, tokens)
    if max_new_tokens == 0:
        return tokens
    step, token, done, _, tokens = jax.lax.while_loop(not_finished, decode_step, carry)
    return jax.lax.dynamic_update_slice(tokens, jnp.where(done, pad_id, token)[:, None], (0, T + step))
