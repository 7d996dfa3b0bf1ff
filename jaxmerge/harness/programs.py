"""The compiled programs behind the lm-eval backend: scoring continuations, and greedy decoding
in chunks with a KV cache kept between them (so the host can stop at a stop sequence).

Each program is a pure function of the model's (graphdef, state) and padded arrays; shapes are
bucketed by the caller, so a whole evaluation compiles a few programs, not one per request.
Rows are left-padded; RoPE positions count real tokens only, as transformers' are.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.models.interfaces import decoding
from jaxmerge.models.modules import causal_mask
from jaxmerge.models.transformer import positions_from_mask

SMALLEST_BUCKET = 16


def bucket(length: int, smallest: int = SMALLEST_BUCKET) -> int:
    """The padded length for `length` tokens: the next power of two up to 64, then the next
    multiple of 32 up to 512, then of 128 (about 1.25x steps at most beyond 128), so requests of
    any length share a few compiled shapes without padding half of each batch."""
    if length <= 64:
        return max(smallest, 1 << math.ceil(math.log2(max(length, 1))))
    step = 32 if length <= 512 else 128
    return -(-length // step) * step


@functools.partial(jax.jit, static_argnames=("graphdef", "tail"))
def score_program(graphdef, state, inputs, mask, targets, scored, *, tail: int):
    """Per row: the summed log-probability of the scored targets, and whether each is the argmax.

    inputs, mask, targets, scored: [B, T]; the logits at t score targets[t] (the next token),
    as lm-eval's `_loglikelihood_tokens` scores `(context + continuation)[:-1]`. Only the last
    `tail` positions are scored (rows are left-padded: a continuation ends each row), so the
    output head runs there alone. Returns logprob [B] float32, greedy [B] bool.
    """
    model = nnx.merge(graphdef, state)
    B, T = inputs.shape
    attention = causal_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), mask)  # [B, T, T]
    logits, _ = model.forward(inputs, positions_from_mask(mask), attention, logits_last=tail)  # [B, tail, V]
    logits = logits.astype(jnp.float32)
    targets, scored = targets[:, -tail:], scored[:, -tail:]  # [B, tail]
    chosen = jnp.take_along_axis(logits, targets[:, :, None], axis=-1)[:, :, 0]  # [B, T]
    token_logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    scored = scored.astype(bool)
    greedy = jnp.argmax(logits, axis=-1) == targets  # [B, T]
    return jnp.sum(jnp.where(scored, token_logprobs, 0.0), axis=-1), jnp.all(greedy | ~scored, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length"))
def prefill_program(graphdef, state, ids, mask, *, cache_length: int):
    """The prompts ids [B, T] (left-padded, mask [B, T]) run once, their keys and values written
    at cache[0:T] of a cache of `cache_length` positions. Returns the first greedy token [B],
    the cache, which cache positions are real [B, S], and the next token's RoPE position [B]."""
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    key_valid = jnp.concatenate([mask, jnp.ones((B, cache_length - T), mask.dtype)], axis=1)  # [B, S]
    positions = positions_from_mask(mask)  # [B, T]
    attention = causal_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), key_valid)  # [B, T, S]
    logits, cache = model.forward(ids, positions, attention, model.init_cache(B, cache_length), 0)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
    return first, cache, key_valid, positions[:, -1] + 1


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnames=("cache",))
def decode_program(graphdef, state, token, cache, key_valid, position, index, done, eos_ids, pad_id, *, steps: int):
    """`steps` greedy tokens from `token` [B] (chosen, not yet emitted) at cache index `index`.

    A row that has emitted an EOS id emits pad_id from then on, as transformers' generate does.
    Returns the emitted tokens [B, steps] and the state to continue from: (token, cache,
    position, index, done).
    """
    model = nnx.merge(graphdef, state)
    B = token.shape[0]
    forward, cache, stacked = decoding(model, cache)  # the layers split once per call: each step reads them in place

    def step(carry, _):
        token, cache, position, index, done = carry
        token = jnp.where(done, pad_id, token)
        done = done | jnp.isin(token, eos_ids)
        attention = causal_mask(jnp.full((B, 1), index), key_valid)  # [B, 1, S]
        logits, cache = forward(token[:, None], position[:, None], attention, cache, index)
        next_token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (next_token, cache, position + 1, index + 1, done), token

    (token, cache, position, index, done), emitted = jax.lax.scan(step, (token, cache, position, index, done),
                                                                   length=steps)
    return emitted.T, (token, stacked(cache), position, index, done)
