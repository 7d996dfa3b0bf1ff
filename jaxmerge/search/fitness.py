"""Fitness inside jit: the paper's metrics computed on generated token ids.

A search scores every candidate on a minibatch, inside one jitted, vmapped function, so
the metric cannot decode strings. `TokenTable` precomputes, once per tokenizer, what each
token contributes to `jaxmerge.metrics`: its digits (as a value and a digit count, so
that tokenizers that group digits work), whether it is a minus sign, a thousands
separator or a decimal point, and its count of Japanese and of all letters. With it,
`mgsm_scores` finds the last number of each response and applies the Japanese check
exactly as `metrics.mgsm_correct` does on the decoded text (a test holds them equal).
"""

from __future__ import annotations

import unicodedata

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.metrics import _is_japanese_char

MAX_DIGITS = 9  # int32 values: longer numbers never match


@flax.struct.dataclass
class TokenTable:
    digit_value: jax.Array  # [V] int32: the token's value if it is all digits, else 0
    digit_count: jax.Array  # [V] int32: its number of digits if all digits, else 0
    significant: jax.Array  # [V] int32: digits of its value without leading zeros ("007": 1)
    minus: jax.Array  # [V] bool
    comma: jax.Array  # [V] bool
    point: jax.Array  # [V] bool
    japanese_letters: jax.Array  # [V] int32
    letters: jax.Array  # [V] int32

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenTable":
        size = len(tokenizer)
        value, count, significant = (np.zeros(size, np.int32) for _ in range(3))
        minus, comma, point = np.zeros(size, bool), np.zeros(size, bool), np.zeros(size, bool)
        japanese, letters = np.zeros(size, np.int32), np.zeros(size, np.int32)
        special = set(tokenizer.all_special_ids)
        for token_id in range(size):
            if token_id in special:
                continue
            text = unicodedata.normalize("NFKC", tokenizer.decode([token_id]))
            if text.isdigit() and text.isascii() and len(text) <= MAX_DIGITS:
                value[token_id], count[token_id] = int(text), len(text)
                significant[token_id] = len(str(int(text))) if int(text) else 0
            minus[token_id] = text in ("-", "−")
            comma[token_id] = text == ","
            point[token_id] = text == "."
            alpha = [c for c in text if c.isalpha()]
            letters[token_id] = len(alpha)
            japanese[token_id] = sum(_is_japanese_char(c) for c in alpha)
        return cls(*(jnp.asarray(a) for a in (value, count, significant, minus, comma, point, japanese, letters)))


def _run_value(digits: jax.Array, value: tuple, joins: jax.Array, end: jax.Array):
    """The number whose last digit token is at `end`: (start index, value, significant
    digits). value: per token (value, digit count, significant digits)."""
    index = jnp.arange(digits.shape[0])
    in_number = digits | joins
    start = jnp.max(jnp.where(~in_number & (index <= end), index, -1)) + 1
    span = (index >= start) & (index <= end) & digits
    count = jnp.where(span, value[1], 0)  # digits per token
    after = jnp.cumsum(count[::-1])[::-1] - count  # digits to the right, within the number
    significant = jnp.max(jnp.where(span & (value[0] > 0), value[2] + after, 0))
    number = jnp.sum(jnp.where(span, value[0] * jnp.power(10, jnp.minimum(after, MAX_DIGITS)), 0))
    return start, number, significant


def _run_lengths(counts: jax.Array, reverse: bool) -> jax.Array:
    """Digits in the contiguous digit run through each position, counted from the left
    end of the run up to it (or from it to the right end, reversed); 0 off runs."""
    def step(total, c):
        total = jnp.where(c > 0, total + c, 0)
        return total, total

    return jax.lax.scan(step, jnp.int32(0), counts, reverse=reverse)[1]


def last_number(tokens: jax.Array, table: TokenTable, alive: jax.Array):
    """The last number of one response [N] (tokens where `alive`): (found, value).
    Like `metrics.extract_answer`: a comma between digits is a thousands separator, a
    leading minus is a sign; a decimal whose fraction is not zero never equals an integer."""
    n = tokens.shape[0]
    index = jnp.arange(n)
    digits = (table.digit_count[tokens] > 0) & alive
    value = (table.digit_value[tokens], table.digit_count[tokens], table.significant[tokens])
    before = jnp.concatenate([jnp.array([False]), digits[:-1]])
    after = jnp.concatenate([digits[1:], jnp.array([False])])
    # A thousands separator, as the regex of `metrics` reads it: 1-3 digits before, 3 after.
    counts = jnp.where(digits, value[1], 0)
    left = jnp.concatenate([jnp.array([0]), _run_lengths(counts, reverse=False)[:-1]])
    right = jnp.concatenate([_run_lengths(counts, reverse=True)[1:], jnp.array([0])])
    joins = table.comma[tokens] & before & after & alive & (left <= 3) & (right == 3)
    end = jnp.max(jnp.where(digits, index, -1))
    start, number, total = _run_value(digits, value, joins, end)
    # "12.50": the run found is the fraction; the integer part ends two tokens earlier.
    # (Unless that integer part is itself a fraction, "1.2.3" reads as 1.2 and 3; longer
    # dotted chains, which no answer has, may read differently from the regex.)
    def follows_point(position):
        return (position >= 2) & table.point[tokens[jnp.maximum(position - 1, 0)]] & \
            digits[jnp.maximum(position - 2, 0)]

    int_start, int_number, int_total = _run_value(digits, value, joins, jnp.maximum(start - 2, 0))
    is_fraction = follows_point(start) & ~follows_point(int_start)
    start = jnp.where(is_fraction, int_start, start)
    found = (end >= 0) & jnp.where(is_fraction, (number == 0) & (int_total <= MAX_DIGITS), total <= MAX_DIGITS)
    number = jnp.where(is_fraction, int_number, number)
    signed = (start >= 1) & table.minus[tokens[jnp.maximum(start - 1, 0)]] & alive[jnp.maximum(start - 1, 0)]
    return found, jnp.where(signed, -number, number)


def is_japanese(tokens: jax.Array, table: TokenTable, alive: jax.Array, threshold: float = 0.5) -> jax.Array:
    """More than `threshold` of the response's letters are kana or kanji."""
    japanese = jnp.sum(jnp.where(alive, table.japanese_letters[tokens], 0))
    letters = jnp.sum(jnp.where(alive, table.letters[tokens], 0))
    return (letters > 0) & (japanese > threshold * letters)


def response_mask(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """[B, N] True before each row's first end-of-sequence token."""
    ended = jnp.isin(tokens, eos_ids)
    return jnp.cumsum(ended, axis=-1) == 0


def mgsm_scores(tokens: jax.Array, answers: jax.Array, table: TokenTable, eos_ids: jax.Array,
                require_japanese: bool | jax.Array = True) -> jax.Array:
    """[B] 1.0 where the response's last number equals the answer (and it is Japanese).
    tokens [B, N] generated ids, answers [B] int32; require_japanese: for all rows, or [B]
    per row (a minibatch that mixes tasks)."""
    alive = response_mask(tokens, eos_ids)
    found, value = jax.vmap(last_number, in_axes=(0, None, 0))(tokens, table, alive)
    japanese = jax.vmap(is_japanese, in_axes=(0, None, 0))(tokens, table, alive)
    correct = found & (value == answers) & (japanese | ~jnp.asarray(require_japanese, bool))
    return correct.astype(jnp.float32)


def exact_match_scores(tokens: jax.Array, references: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """[B] 1.0 where the response equals the reference up to its end. references [B, N]:
    token ids followed by an end-of-sequence id and padding (anything)."""
    alive = response_mask(references, eos_ids)
    ends = jnp.argmin(alive, axis=-1)  # the reference's end-of-sequence position
    same = jnp.all((tokens == references) | ~alive, axis=-1)
    column = jnp.arange(tokens.shape[-1])[None, :] == ends[:, None]
    stops = jnp.any(column & jnp.isin(tokens, eos_ids), axis=-1) | jnp.all(alive, axis=-1)
    return (same & stops).astype(jnp.float32)


def rouge_l_scores(tokens: jax.Array, references: jax.Array, eos_ids: jax.Array,
                   table: TokenTable | None = None) -> jax.Array:
    """[B] ROUGE-L F-measure of each response against its reference, over token ids: the
    longest common subsequence of the two up to their ends of sequence. A smooth stand-in,
    inside jit, for the paper's ROUGE-L (`metrics.rouge_l_ja` tokenises decoded text with
    MeCab): a response with the right content in the wrong form earns part of the score,
    where exact match gives nothing. With a `TokenTable`, a response that is not Japanese
    (`metrics.is_japanese`: over half its letters kana or kanji) scores 0 against a Japanese
    reference, as there.
    tokens [B, T] generated ids; references [B, N] ids, end of sequence, padding."""
    response = response_mask(tokens, eos_ids)  # [B, T]
    reference = response_mask(references, eos_ids)  # [B, N]
    match = (references[:, :, None] == tokens[:, None, :]) & reference[:, :, None] & response[:, None, :]  # [B, N, T]

    def reference_step(previous, match_row):  # previous, match_row: [B, T]; one DP row per reference token
        def response_step(left, j):
            current = jnp.maximum(jnp.maximum(left, previous[:, j]),
                                  jnp.where(match_row[:, j], jnp.where(j > 0, previous[:, j - 1], 0) + 1, 0))
            return current, current
        _, row = jax.lax.scan(response_step, jnp.zeros(previous.shape[0], jnp.int32), jnp.arange(previous.shape[1]))
        row = row.T  # [B, T]
        return row, None

    first = jnp.zeros(tokens.shape, jnp.int32)
    last, _ = jax.lax.scan(reference_step, first, jnp.moveaxis(match, 1, 0))
    lcs = last[:, -1].astype(jnp.float32)
    length_response = jnp.sum(response, axis=-1).astype(jnp.float32)
    length_reference = jnp.sum(reference, axis=-1).astype(jnp.float32)
    precision = lcs / jnp.maximum(length_response, 1.0)
    recall = lcs / jnp.maximum(length_reference, 1.0)
    f = jnp.where(lcs > 0, 2 * precision * recall / jnp.maximum(precision + recall, 1e-9), 0.0)
    if table is not None:
        def japanese(ids, mask):
            japanese_letters = jnp.sum(jnp.where(mask, table.japanese_letters[ids], 0), axis=-1)
            return 2 * japanese_letters > jnp.sum(jnp.where(mask, table.letters[ids], 0), axis=-1)
        f = jnp.where(japanese(references, reference) & ~japanese(tokens, response), 0.0, f)
    return f
