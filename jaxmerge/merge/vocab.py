"""Aligning the vocabularies of models whose tokenizers differ (mergekit's
`tokenizer_source`): every model's embedding rows are re-ordered to one output
vocabulary, and a token a model lacks gets a row from elsewhere:

  - the base model's row, if the base has the token;
  - else the row of the one model that has it;
  - else the mean of the rows of the models that have it.

The output vocabulary is the base's tokenizer (`base`), a given model's (a path), or
`union`: the base's vocabulary, then the other models' tokens it lacks, then every
added (special) token, in recipe order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # transformers is imported when a tokenizer is needed: a plain merge never loads it
    from transformers import PreTrainedTokenizerBase


def _tokenizer(directory: str) -> PreTrainedTokenizerBase:
    from jaxmerge.checkpoint import load_tokenizer

    try:
        return load_tokenizer(directory)
    except ValueError as e:
        raise ValueError(f"tokenizer_source: {e}") from None


def build_vocabulary(source: str, base: str, models: list[str], vocab_sizes: dict[str, int]
                     ) -> PreTrainedTokenizerBase:
    """The output tokenizer. source: "base", "union" or a model directory."""
    if source == "base":
        return _tokenizer(base)
    if source != "union":
        return _tokenizer(source)
    tokenizers = {m: _tokenizer(m) for m in [base] + [m for m in models if m != base]}
    out = _tokenizer(base)  # a copy of the base tokenizer to extend (no temporary files)
    known = set(out.get_vocab())
    added = {}
    for model, tok in tokenizers.items():
        specials = {info.content for info in tok.added_tokens_decoder.values()}
        for token, index in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if index >= vocab_sizes[model] or token in specials or token in known:
                continue
            out.add_tokens(token)
            known.add(token)
        for index, info in sorted(tok.added_tokens_decoder.items()):
            if index < vocab_sizes[model] and info.content not in known and info.content not in added:
                added[info.content] = info
    for info in added.values():
        out.add_tokens(info)
    return out


def permutations(output: PreTrainedTokenizerBase, models: list[str], vocab_sizes: dict[str, int]
                 ) -> dict[str, np.ndarray]:
    """For each model, the row of each output token in that model's embeddings (-1: absent)."""
    vocab = output.get_vocab()
    size = max(vocab.values()) + 1
    result = {}
    for model in models:
        own = _tokenizer(model).get_vocab()
        rows = np.full(size, -1, np.int64)
        for token, index in vocab.items():
            row = own.get(token, -1)
            rows[index] = row if row < vocab_sizes[model] else -1
        result[model] = rows
    return result


def align_tables(tables: dict[str, np.ndarray], rows: dict[str, np.ndarray], base: str | None
                 ) -> dict[str, np.ndarray]:
    """Every model's token-indexed table (tokens on the first axis) re-ordered to the output
    vocabulary, in its own dtype; a token a model lacks gets the fill row (see above)."""
    models = list(tables)
    present = np.stack([rows[m] >= 0 for m in models])  # [M, V]
    as_float = {m: np.asarray(tables[m], np.float32) for m in models}
    fill = np.zeros((present.shape[1],) + as_float[models[0]].shape[1:], np.float32)
    for token in np.flatnonzero(~present.all(axis=0)):
        donors = [m for m, has in zip(models, present[:, token], strict=True) if has]
        if not donors:
            continue  # no model has it: zeros
        if base in donors:
            donors = [base]
        fill[token] = np.mean([as_float[m][rows[m][token]] for m in donors], axis=0)
    out = {}
    for m in models:
        has = rows[m] >= 0
        table = np.where(has.reshape((-1,) + (1,) * (fill.ndim - 1)), as_float[m][np.maximum(rows[m], 0)], fill)
        out[m] = table.astype(tables[m].dtype)
    return out


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    tokenizer.save_pretrained(directory)
    return directory
