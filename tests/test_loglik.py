"""Log-likelihood scoring equals transformers' PyTorch model; lm-eval's pair encoding and metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import jaxmerge
from jaxmerge.eval.loglik import (
    continuation_logprobs,
    continuation_tail,
    encode,
    encode_continuations,
    encode_pair,
    multiple_choice_batch,
    multiple_choice_correct,
    multiple_choice_scores,
    reference_loglik,
    sequence_logprobs,
    token_counts,
)

ATOL = 1e-4
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# Words carry their leading space (as in BPE vocabularies), so where a space goes matters.
WORDS = [" yes", " no", " red", " blue", " the", " sky", " is", " it"]
PIECES = WORDS + list("abcdefghijklmnopqrstuvwxyzAQ:?. ")


def build_tokenizer(bos_template: bool) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + PIECES)}
    pattern = "|".join(sorted(WORDS, key=len, reverse=True)) + "|."
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    if bos_template:  # a tokenizer that adds BOS itself: it must not be added twice
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", params=[False, True], ids=["bos_added_here", "bos_template"])
def tokenizer(request):
    return build_tokenizer(request.param)


@pytest.fixture
def model_pair(hf_checkpoint):
    """(transformers model, the same model loaded by jaxmerge)."""
    hf_model, directory = hf_checkpoint("mistral_gqa")
    return hf_model, jaxmerge.load(directory)


def hf_token_logprobs(hf_model, ids: np.ndarray, mask: np.ndarray, targets: np.ndarray) -> list[np.ndarray]:
    """Per row: log-probabilities of its target tokens, from transformers on the unpadded row."""
    out = []
    for row in range(ids.shape[0]):
        real = mask[row].astype(bool)
        tokens, scored = ids[row][real], targets[row][real].astype(bool)
        with torch.no_grad():
            logits = hf_model(torch.as_tensor(tokens[None].astype(np.int64))).logits[0].float()  # [L, V]
        logprobs = torch.log_softmax(logits, dim=-1).numpy()  # [L, V]
        positions = np.flatnonzero(scored)
        assert positions.min() >= 1
        out.append(logprobs[positions - 1, tokens[positions]])
    return out


def lm_eval_encode_pair(tokenizer, context, continuation):
    """lm-evaluation-harness `HFLM._encode_pair` (causal LM branch), verbatim but for `encode`."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = encode(tokenizer, context + continuation)
    context_enc = encode(tokenizer, context)
    context_enc_len = len(context_enc)
    continuation_enc = whole_enc[context_enc_len:]
    return context_enc, continuation_enc


CONTEXTS = ["Q: is the sky blue? A: ", "Q: red? A:", "", "Q: is it red or blue? A:", "it is"]
CONTINUATIONS = ["yes", " no", "Q: the sky", " blue.", " the sky is red"]


def test_encode_pair_moves_trailing_space(tokenizer):
    context, continuation = "Q: is the sky blue? A: ", "yes"
    context_tokens, continuation_tokens = encode_pair(tokenizer, context, continuation)
    assert tokenizer.convert_ids_to_tokens(continuation_tokens) == [" yes"]
    assert context_tokens == encode(tokenizer, "Q: is the sky blue? A:")
    assert context_tokens[0] == tokenizer.bos_token_id and context_tokens.count(tokenizer.bos_token_id) == 1
    # Where it matters: a naive split keeps the space in the context and spells out "yes".
    naive = encode(tokenizer, context), tokenizer(continuation, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(naive[1]) == ["y", "e", "s"]
    assert (context_tokens, continuation_tokens) != naive
    for context, continuation in zip(CONTEXTS, CONTINUATIONS, strict=True):
        assert encode_pair(tokenizer, context, continuation) == lm_eval_encode_pair(tokenizer, context, continuation)


def test_encode_continuations_layout(tokenizer):
    batch = encode_continuations(tokenizer, CONTEXTS, CONTINUATIONS)
    N, T = batch.ids.shape
    assert batch.mask.shape == batch.targets.shape == (N, T) and N == len(CONTEXTS)
    for row, (context, continuation) in enumerate(zip(CONTEXTS, CONTINUATIONS, strict=True)):
        context_tokens, continuation_tokens = encode_pair(tokenizer, context, continuation)
        tokens = context_tokens + continuation_tokens
        padding = T - len(tokens)
        assert batch.ids[row, padding:].tolist() == tokens
        assert (batch.ids[row, :padding] == tokenizer.pad_token_id).all()
        assert batch.mask[row].tolist() == [0] * padding + [1] * len(tokens)
        assert batch.targets[row].tolist() == [0] * (T - len(continuation_tokens)) + [1] * len(continuation_tokens)
    assert encode_continuations(tokenizer, CONTEXTS, CONTINUATIONS, length=T + 3).ids.shape == (N, T + 3)


def test_encode_errors_name_the_row(tokenizer):
    with pytest.raises(ValueError, match="row 1: continuation '' .* no tokens"):
        encode_continuations(tokenizer, ["Q:", "Q:"], [" yes", ""])
    with pytest.raises(ValueError, match="row 1 has 6 tokens, more than length 5"):
        encode_continuations(tokenizer, ["Q:", "Q: is"], [" yes", " the sky"], length=5)
    with pytest.raises(ValueError, match="item 1 choice 1: continuation"):
        multiple_choice_batch(tokenizer, ["Q:", "Q:"], [["yes"], ["no", ""]], [0, 0], delimiter="")
    with pytest.raises(ValueError, match="item 0: label 2"):
        multiple_choice_batch(tokenizer, ["Q:"], [["yes", "no"]], [2])


def test_continuation_logprobs_match_transformers(tokenizer, model_pair):
    hf_model, model = model_pair
    batch = encode_continuations(tokenizer, CONTEXTS, CONTINUATIONS, length=24)
    assert len(set(batch.mask.sum(1).tolist())) == len(CONTEXTS)  # every row padded differently
    ours = jax.jit(sequence_logprobs)(model, batch.ids, batch.mask, batch.targets)
    reference = hf_token_logprobs(hf_model, batch.ids, batch.mask, batch.targets)
    np.testing.assert_allclose(np.asarray(ours), [r.sum() for r in reference], atol=ATOL, rtol=0)
    assert np.asarray(token_counts(batch.targets)).tolist() == [len(r) for r in reference]
    # The same from logits (bf16 logits are scored in float32).
    logits = model(jnp.asarray(batch.ids), attention_mask=jnp.asarray(batch.mask))  # [N, T, V]
    np.testing.assert_allclose(continuation_logprobs(logits, batch.ids, batch.targets), ours, atol=1e-6, rtol=0)
    assert continuation_logprobs(logits.astype(jnp.bfloat16), batch.ids, batch.targets).dtype == jnp.float32


def test_the_head_at_the_continuations_only_equals_the_full_computation(tokenizer, model_pair):
    """continuation_tail's columns: the head runs at W < T positions, the scores are those of all T."""
    hf_model, model = model_pair
    batch = encode_continuations(tokenizer, CONTEXTS, CONTINUATIONS, length=24)
    tail = continuation_tail(batch.targets)
    longest = int(batch.targets.sum(1).max())
    assert tail.shape == (len(CONTEXTS), longest + 1) and tail.sum() == batch.targets.sum()
    full = jax.jit(sequence_logprobs)(model, batch.ids, batch.mask, batch.targets)
    program = jax.jit(sequence_logprobs).lower(model, batch.ids, batch.mask, tail).as_text()
    assert f"{len(CONTEXTS)}x{longest + 1}x{model.config.vocab_size}xf32" in program  # logits at W positions only
    assert f"{len(CONTEXTS)}x24x{model.config.vocab_size}xf32" not in program
    ours = jax.jit(sequence_logprobs)(model, batch.ids, batch.mask, tail)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(full), atol=1e-5, rtol=0)
    reference = hf_token_logprobs(hf_model, batch.ids, batch.mask, batch.targets)
    np.testing.assert_allclose(np.asarray(ours), [r.sum() for r in reference], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(token_counts(tail), token_counts(batch.targets))


def test_reference_loglik_is_the_mean_token_logprob(tokenizer, model_pair):
    hf_model, model = model_pair
    batch = encode_continuations(tokenizer, CONTEXTS, CONTINUATIONS)
    logprobs = sequence_logprobs(model, batch.ids, batch.mask, batch.targets)
    ours = reference_loglik(logprobs, token_counts(batch.targets))
    reference = hf_token_logprobs(hf_model, batch.ids, batch.mask, batch.targets)
    np.testing.assert_allclose(np.asarray(ours), [r.mean() for r in reference], atol=ATOL, rtol=0)


def test_multiple_choice_correct_by_hand():
    logprobs = jnp.array([[-1.0, -2.0, 0.0], [-6.0, -4.0, -9.0]])  # [B=2, K=3]
    valid = jnp.array([[True, True, False], [True, True, True]])  # item 0's third choice is padding
    lengths = jnp.array([[1.0, 4.0, 1.0], [2.0, 1.0, 9.0]])
    np.testing.assert_array_equal(multiple_choice_correct(logprobs, jnp.array([0, 1]), valid), [1.0, 1.0])
    np.testing.assert_array_equal(multiple_choice_correct(logprobs, jnp.array([1, 2]), valid, lengths), [1.0, 1.0])
    np.testing.assert_array_equal(multiple_choice_correct(logprobs, jnp.array([2, 0]), valid, lengths), [0.0, 0.0])


PROMPTS = ["Q: is the sky blue? A:", "Q: red or blue? A:", "Q: is it? A:"]
CHOICES = [["yes", "no", "the sky"], ["red", "blue"], ["no", "the sky is blue", "yes", "it is"]]
LABELS = [2, 0, 1]


@pytest.mark.parametrize("normalize", [False, True], ids=["acc", "acc_norm"])
def test_multiple_choice_matches_transformers(tokenizer, model_pair, normalize):
    hf_model, model = model_pair
    batch = multiple_choice_batch(tokenizer, PROMPTS, CHOICES, LABELS)
    B, K = batch["valid"].shape
    assert (B, K) == (3, 4) and batch["ids"].shape[0] == B * K
    assert batch["valid"].sum(1).tolist() == [len(c) for c in CHOICES]
    # Plain Python, as lm-eval: logprob of (prompt, " " + choice) for each real choice, argmax.
    expected = {}
    for norm in (False, True):
        correct = []
        for prompt, options, label in zip(PROMPTS, CHOICES, LABELS, strict=True):
            enc = encode_continuations(tokenizer, [prompt] * len(options), [" " + c for c in options])
            lls = [r.sum() for r in hf_token_logprobs(hf_model, enc.ids, enc.mask, enc.targets)]
            scores = [ll / len(c) for ll, c in zip(lls, options, strict=True)] if norm else lls
            correct.append(float(int(np.argmax(scores)) == label))
        expected[norm] = correct
    assert expected[False] != expected[True]  # the case tells acc from acc_norm
    ours = multiple_choice_scores(model, batch, normalize=normalize)
    assert ours.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours), expected[normalize])


def test_multiple_choice_scores_compile_once_and_vmap(tokenizer, model_pair):
    _, model = model_pair
    graphdef, state = nnx.split(model)
    traces = []

    def score(state, batch):
        traces.append(1)  # runs once per trace
        return multiple_choice_scores(nnx.merge(graphdef, state), batch, normalize=True)

    jitted = jax.jit(score)
    first = multiple_choice_batch(tokenizer, PROMPTS, CHOICES, LABELS, length=24)
    second = multiple_choice_batch(tokenizer, ["Q: red? A:", "A:", "Q: is the sky red? A:"],
                                   [["red", "blue", "no", "yes"], ["it", "is"], ["no", "yes"]], [1, 0, 1], length=24)
    for batch in (first, second):
        np.testing.assert_array_equal(jitted(state, batch), multiple_choice_scores(model, batch, normalize=True))
    assert len(traces) == 1
    assert jitted._cache_size() == 1
    # A population: one vmapped call scores every candidate's parameters.
    other = jax.tree.map(lambda x: x * 1.5, state)
    population = jax.tree.map(lambda a, b: jnp.stack([a, b]), state, other)
    batched = jax.jit(jax.vmap(score, in_axes=(0, None)))(population, first)  # [2, B]
    for index, candidate in enumerate((state, other)):
        np.testing.assert_array_equal(batched[index], jitted(candidate, first))
