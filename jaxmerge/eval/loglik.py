"""Log-likelihood scoring, no generation: how likely a model finds given continuations.

The host side encodes (context, continuation) pairs as lm-evaluation-harness does
(`_encode_pair`: trailing whitespace of the context moves to the continuation, and the
continuation's tokens are those of `context + continuation` after the context's), into
left-padded rows with a mask of the tokens to score. The device side is pure and
jittable: summed log-probabilities of those tokens, multiple-choice accuracy (lm-eval's
`acc`, and `acc_norm` with the choices' character lengths), and the mean log-likelihood
of a reference answer.

Every prompt starts with the tokenizer's BOS: it is added where the tokenizer does not
add it itself (as the experiments encode prompts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ContinuationBatch:
    """Left-padded (context + continuation) rows; numpy arrays on the host."""

    ids: np.ndarray  # [N, T] int32: token ids, padding on the left
    mask: np.ndarray  # [N, T] int32: 1 on real tokens
    targets: np.ndarray  # [N, T] int32: 1 where the token is a continuation token to score


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, starting with the tokenizer's BOS (added if the tokenizer does not)."""
    tokens = list(tokenizer(text).input_ids)
    bos = tokenizer.bos_token_id
    if bos is not None and tokens[:1] != [bos]:
        tokens = [bos] + tokens
    if bos is not None and tokens[:2] == [bos, bos]:  # a chat template that writes BOS, and a tokenizer that adds it
        tokens = tokens[1:]
    return tokens


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens), as lm-eval's `_encode_pair`: the context's
    trailing whitespace moves to the continuation, and the continuation's tokens are those
    of the whole text after as many tokens as the context alone has."""
    spaces = len(context) - len(context.rstrip())
    if spaces > 0:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_tokens = encode(tokenizer, context)
    return context_tokens, whole[len(context_tokens):]


def encode_continuations(
    tokenizer, contexts: list[str], continuations: list[str], length: int | None = None
) -> ContinuationBatch:
    """Rows `context tokens + continuation tokens`, left-padded to `length` (default: the
    longest row), with the continuation tokens marked in `targets`."""
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    return _encode_rows(tokenizer, contexts, continuations, length, [f"row {i}" for i in range(len(contexts))])


def _encode_rows(tokenizer, contexts: list[str], continuations: list[str], length: int | None,
                 names: list[str]) -> ContinuationBatch:
    """encode_continuations, with each row's name for errors."""
    rows = []
    for name, context, continuation in zip(names, contexts, continuations, strict=True):
        context_tokens, continuation_tokens = encode_pair(tokenizer, context, continuation)
        if not continuation_tokens:
            raise ValueError(f"{name}: continuation {continuation!r} (after context {context!r}) "
                             "encodes to no tokens")
        if not context_tokens:  # no BOS and an empty context: nothing predicts the first token
            raise ValueError(f"{name}: empty context and a tokenizer without BOS; the first "
                             "continuation token cannot be scored")
        rows.append((context_tokens, continuation_tokens))
    if not rows:
        raise ValueError("no rows to encode")
    longest = max(len(c) + len(t) for c, t in rows)
    length = longest if length is None else length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    targets = np.zeros((len(rows), length), np.int32)
    for row, (name, (context_tokens, continuation_tokens)) in enumerate(zip(names, rows, strict=True)):
        tokens = context_tokens + continuation_tokens
        if len(tokens) > length:
            raise ValueError(f"{name} has {len(tokens)} tokens, more than length {length}")
        ids[row, length - len(tokens):] = tokens
        mask[row, length - len(tokens):] = 1
        targets[row, length - len(continuation_tokens):] = 1
    return ContinuationBatch(ids=ids, mask=mask, targets=targets)


def continuation_logprobs(logits: jax.Array, ids: jax.Array, targets: jax.Array) -> jax.Array:
    """[N]: the summed log-probability of the target tokens. The token at t is scored by the
    logits at t - 1 (in float32); a target at position 0 has no logits and is not scored."""
    logits = logits[:, :-1].astype(jnp.float32)  # [N, T-1, V]
    next_ids = jnp.asarray(ids)[:, 1:]  # [N, T-1]
    chosen = jnp.take_along_axis(logits, next_ids[:, :, None], axis=-1)[:, :, 0]  # [N, T-1]
    token_logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)  # [N, T-1]: log_softmax at the token
    scored = jnp.asarray(targets)[:, 1:] > 0  # [N, T-1]
    return jnp.sum(jnp.where(scored, token_logprobs, 0.0), axis=-1)


def token_counts(targets: jax.Array) -> jax.Array:
    """[N] int32: the number of scored target tokens per row (position 0 is never scored)."""
    return jnp.sum(jnp.asarray(targets)[:, 1:] > 0, axis=-1).astype(jnp.int32)


def continuation_tail(targets: np.ndarray) -> np.ndarray:
    """The last W columns of left-padded `targets` [N, T] that hold every row's continuation,
    plus the column before them (never a target): [N, W], W = 1 + the longest continuation.
    `sequence_logprobs` then computes the output head at those W positions only (the head is
    a large share of a forward's FLOPs with a large vocabulary, and its logits elsewhere are
    never read). Cut a task's whole split at once, so that its minibatches share one shape."""
    targets = np.asarray(targets)
    columns = np.flatnonzero(targets.any(axis=0))
    if columns.size == 0:
        return targets[:, -1:]
    return targets[:, max(0, columns[0] - 1):]


def sequence_logprobs(model: nnx.Module, ids: jax.Array, mask: jax.Array, targets: jax.Array,
                      **model_inputs) -> jax.Array:
    """[N]: summed log-probability of the target tokens under `model(ids, attention_mask=mask,
    **model_inputs)` (e.g. pixel_values for a VLM). targets: [N, T], or its last W columns
    ([N, W], `continuation_tail`): then the model's head runs at the last W positions only."""
    ids = jnp.asarray(ids, jnp.int32)  # [N, T]
    T, W = ids.shape[-1], targets.shape[-1]
    if W > T:
        raise ValueError(f"targets have {W} columns, more than the {T} of the ids")
    logits = model(ids, attention_mask=jnp.asarray(mask, jnp.int32), logits_last=None if W == T else W,
                   **model_inputs)  # [N, W, V]
    return continuation_logprobs(logits, ids[:, T - W:], targets)


def multiple_choice_correct(logprobs: jax.Array, label: jax.Array, valid: jax.Array,
                            lengths: jax.Array | None = None) -> jax.Array:
    """[B] float32: 1.0 where the most likely valid choice is the label (lm-eval's `acc`);
    with the choices' character `lengths` [B, K], the choice with the highest logprob per
    character (`acc_norm`). logprobs, valid, lengths: [B, K]; label: [B]. Ties go to the
    first choice, as with numpy's argmax."""
    valid = jnp.asarray(valid).astype(bool)  # [B, K]
    scores = jnp.asarray(logprobs, jnp.float32)  # [B, K]
    if lengths is not None:
        scores = scores / jnp.where(valid, jnp.asarray(lengths, jnp.float32), 1.0)
    scores = jnp.where(valid, scores, -jnp.inf)
    return (jnp.argmax(scores, axis=-1) == jnp.asarray(label)).astype(jnp.float32)


def reference_loglik(logprobs: jax.Array, counts: jax.Array) -> jax.Array:
    """[N]: mean log-probability per answer token (higher is better); 0 for an empty answer."""
    counts = jnp.asarray(counts)
    return jnp.asarray(logprobs, jnp.float32) / jnp.maximum(counts, 1).astype(jnp.float32)


def reference_scores(model: nnx.Module, batch: dict, **model_inputs) -> jax.Array:
    """[N]: each row's mean log-probability per target token, of an `encode_continuations`
    batch as a dict (ids, mask, targets). Pure: usable inside jit and vmap."""
    logprobs = sequence_logprobs(model, batch["ids"], batch["mask"], batch["targets"], **model_inputs)
    return reference_loglik(logprobs, token_counts(batch["targets"]))


def multiple_choice_batch(tokenizer, prompts: list[str], choices: list[list[str]], labels: list[int],
                          delimiter: str = " ", length: int | None = None) -> dict[str, np.ndarray]:
    """Items with different numbers of choices, as arrays: each item's rows (prompt,
    delimiter + choice) are padded to K choices with copies of its first choice, which
    `valid` marks as padding. Returns ids, mask, targets [B*K, T] (row b*K + k is item b's
    choice k), valid [B, K] bool, label [B] int32 and lengths [B, K] float32 (each choice's
    character count, without the delimiter, as lm-eval's acc_norm divides by)."""
    if not len(prompts) == len(choices) == len(labels):
        raise ValueError(f"{len(prompts)} prompts, {len(choices)} choice lists and {len(labels)} labels")
    for item, (options, label) in enumerate(zip(choices, labels, strict=True)):
        if not options:
            raise ValueError(f"item {item} has no choices")
        if not 0 <= label < len(options):
            raise ValueError(f"item {item}: label {label} is not one of its {len(options)} choices")
    K = max(map(len, choices))
    contexts, continuations, names = [], [], []
    valid = np.zeros((len(prompts), K), bool)
    lengths = np.ones((len(prompts), K), np.float32)
    for item, (prompt, options) in enumerate(zip(prompts, choices, strict=True)):
        for k in range(K):
            choice = k if k < len(options) else 0  # padding repeats the first choice
            contexts.append(prompt)
            continuations.append(delimiter + options[choice])
            names.append(f"item {item} choice {choice}")
        valid[item, :len(options)] = True
        lengths[item, :len(options)] = [len(option) for option in options]
    batch = _encode_rows(tokenizer, contexts, continuations, length, names)
    return {"ids": batch.ids, "mask": batch.mask, "targets": batch.targets, "valid": valid,
            "label": np.asarray(labels, np.int32), "lengths": lengths}


def multiple_choice_scores(model: nnx.Module, batch: dict, normalize: bool, **model_inputs) -> jax.Array:
    """[B] float32 correctness per item of a `multiple_choice_batch` (acc; with normalize,
    acc_norm). Pure: usable inside jit and vmap; model_inputs (e.g. pixel_values) are per
    flattened row [B*K, ...]."""
    B, K = batch["valid"].shape
    logprobs = sequence_logprobs(model, batch["ids"], batch["mask"], batch["targets"], **model_inputs)  # [B*K]
    lengths = batch["lengths"] if normalize else None
    return multiple_choice_correct(logprobs.reshape(B, K), batch["label"], batch["valid"], lengths)
