"""The text metrics of `jaxmerge.eval.metrics`, computed inside jit on generated token ids.

A search scores every candidate on a minibatch, inside one jitted, vmapped function, so
the metric cannot decode strings. `TokenTable` precomputes, once per tokenizer, what each
token contributes to the text metrics: its digits (as a value and a digit count, so that
tokenizers that group digits work), whether it is a minus sign, a thousands separator or a
decimal point, its count of letters, and its count of letters in each of a few languages'
scripts. With it, `number_scores` finds the last number of each response and applies the
language check exactly as `metrics.number_correct` does on the decoded text (a test holds
them equal).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.eval.metrics import SCRIPTS, resolve_language

MAX_DIGITS = 9  # int32 values: longer numbers never match


@flax.struct.dataclass
class TokenTable:
    digit_value: jax.Array  # [V] int32: the token's value if it is all digits, else 0
    digit_count: jax.Array  # [V] int32: its number of digits if all digits, else 0
    significant: jax.Array  # [V] int32: digits of its value without leading zeros ("007": 1)
    minus: jax.Array  # [V] bool
    comma: jax.Array  # [V] bool
    point: jax.Array  # [V] bool
    letters: jax.Array  # [V] int32: letters (`str.isalpha`) in the token
    script_letters: jax.Array  # [S, V] int32: of those, letters in the script of languages[s]
    languages: tuple[str, ...] = flax.struct.field(pytree_node=False)  # keys of `metrics.SCRIPTS`

    @classmethod
    def from_tokenizer(cls, tokenizer, languages: Sequence[str] = ("japanese",)) -> TokenTable:
        """The table of a Hugging Face tokenizer, with letter counts for `languages` (names or aliases)."""
        languages = tuple(dict.fromkeys(resolve_language(name) for name in languages))
        size = len(tokenizer)
        value, count, significant, letters = (np.zeros(size, np.int32) for _ in range(4))
        minus, comma, point = np.zeros(size, bool), np.zeros(size, bool), np.zeros(size, bool)
        script_letters = np.zeros((len(languages), size), np.int32)
        ranges = [SCRIPTS[language] for language in languages]
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
            alpha = [ord(c) for c in text if c.isalpha()]
            letters[token_id] = len(alpha)
            for row, script in enumerate(ranges):
                script_letters[row, token_id] = sum(any(low <= code <= high for low, high in script) for code in alpha)
        return cls(digit_value=jnp.asarray(value), digit_count=jnp.asarray(count),
                   significant=jnp.asarray(significant), minus=jnp.asarray(minus), comma=jnp.asarray(comma),
                   point=jnp.asarray(point), letters=jnp.asarray(letters),
                   script_letters=jnp.asarray(script_letters), languages=languages)

    def language_index(self, name: str) -> int:
        """The row of `script_letters` for a language name or alias."""
        language = resolve_language(name)
        if language not in self.languages:
            raise ValueError(f"this TokenTable counts letters of {', '.join(self.languages) or 'no language'}, "
                             f"not {name!r}: build it with TokenTable.from_tokenizer(tokenizer, languages=...)")
        return self.languages.index(language)


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


def last_number(tokens: jax.Array, table: TokenTable, alive: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The last number of one response [N] (tokens where `alive`): (found, value).
    Like `metrics.extract_number`: a comma between digits is a thousands separator, a
    leading minus is a sign; a decimal whose fraction is not zero never equals an integer."""
    n = tokens.shape[0]
    index = jnp.arange(n)
    digits = (table.digit_count[tokens] > 0) & alive
    value = (table.digit_value[tokens], table.digit_count[tokens], table.significant[tokens])
    before = jnp.concatenate([jnp.array([False]), digits[:-1]])
    after = jnp.concatenate([digits[1:], jnp.array([False])])
    # A thousands separator, as `metrics.NUMBER_PATTERN` reads it: 1-3 digits before, 3 after.
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


def language_check(tokens: jax.Array, table: TokenTable, alive: jax.Array, language: str,
                   threshold: float = 0.5, strict: bool = False) -> jax.Array:
    """[...] The language check of each text (tokens [..., N] where `alive`), as
    `metrics.is_language` on the decoded text: more than `threshold` of its letters are in
    the language's script; a text without letters ("42") passes, or, `strict` (static),
    fails."""
    script = table.script_letters[table.language_index(language)]
    in_language = jnp.sum(jnp.where(alive, script[tokens], 0), axis=-1)
    letters = jnp.sum(jnp.where(alive, table.letters[tokens], 0), axis=-1)
    if strict:
        return (letters > 0) & (in_language > threshold * letters)
    return (letters == 0) | (in_language > threshold * letters)


def response_mask(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """[B, N] True before each row's first end-of-sequence token."""
    ended = jnp.isin(tokens, eos_ids)
    return jnp.cumsum(ended, axis=-1) == 0


def number_scores(tokens: jax.Array, answers: jax.Array, table: TokenTable, eos_ids: jax.Array,
                  language: str | None = None, strict: bool = False) -> jax.Array:
    """[B] 1.0 where the response's last number equals the answer (and, given a language, the
    response is in it; `strict`: a bare number is not), as `metrics.number_correct`. tokens
    [B, N] generated ids, answers [B] int32; `language` and `strict` are static (under jit:
    static_argnames or a partial)."""
    alive = response_mask(tokens, eos_ids)
    in_language = True if language is None else language_check(tokens, table, alive, language, strict=strict)
    found, value = jax.vmap(last_number, in_axes=(0, None, 0))(tokens, table, alive)
    return (found & (value == answers) & in_language).astype(jnp.float32)


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
                   table: TokenTable | None = None, language: str | None = None, strict: bool = False) -> jax.Array:
    """[B] ROUGE-L F-measure of each response against its reference, over token ids: the
    longest common subsequence of the two up to their ends of sequence (`metrics.rouge_l_tokens`).
    A smooth stand-in, inside jit, for a text ROUGE-L (`metrics.rouge_l_ja` tokenises decoded
    text with MeCab): a response with the right content in the wrong form earns part of the
    score, where exact match gives nothing. Given a `language` (and the tokenizer's `table`),
    a response not in it scores 0 against a reference in it, as `rouge_l_ja` does for Japanese
    (`language_check` on both: one without letters is in every language, or, `strict`
    (static), in none). tokens [B, T] generated ids; references [B, N] ids, end of sequence,
    padding."""
    if language is not None and table is None:
        raise ValueError(f"the {language!r} check of rouge_l_scores needs the tokenizer's TokenTable")
    response = response_mask(tokens, eos_ids)  # [B, T]
    reference = response_mask(references, eos_ids)  # [B, N]
    wrong_language = False if language is None else (
        language_check(references, table, reference, language, strict=strict)
        & ~language_check(tokens, table, response, language, strict=strict))
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
    return jnp.where((lcs > 0) & ~wrong_language, 2 * precision * recall / jnp.maximum(precision + recall, 1e-9), 0.0)
