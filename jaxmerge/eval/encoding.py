"""Prompts and references as left-padded token arrays, for generation and jitted scoring."""

from __future__ import annotations

import numpy as np

from jaxmerge.eval.loglik import encode


def encode_ids(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt, starting with the tokenizer's BOS."""
    return [encode(tokenizer, p) for p in prompts]


def encode_prompts(tokenizer, prompts, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids [B, T] and attention mask [B, T] (with the tokenizer's BOS)."""
    encoded = encode_ids(tokenizer, prompts)
    length = length or max(map(len, encoded))
    ids = np.full((len(encoded), length), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(encoded), length), np.int32)
    for row, tokens in enumerate(encoded):
        if len(tokens) > length:
            raise ValueError(f"prompt {row} has {len(tokens)} tokens, more than {length}")
        ids[row, length - len(tokens):] = tokens
        mask[row, length - len(tokens):] = 1
    return ids, mask


def encode_references(tokenizer, answers, length: int) -> np.ndarray:
    """[B, length]: each answer's ids, then EOS, then padding (for exact match in jit)."""
    out = np.full((len(answers), length), tokenizer.eos_token_id, np.int32)
    for row, answer in enumerate(answers):
        tokens = tokenizer(answer, add_special_tokens=False).input_ids[:length]
        out[row, :len(tokens)] = tokens
    return out


def answer_length(tokenizer, answers) -> int:
    """Tokens of the longest answer, plus its end of sequence."""
    return 1 + max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers)
