"""The jitted fitness metrics equal `jaxmerge.metrics` on the decoded text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxmerge import metrics
from jaxmerge.search.fitness import TokenTable, exact_match_scores, mgsm_scores, rouge_l_scores

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PIECES = list("0123456789,.-−こアaB ") + ["１", "12", "345", "7000"]  # grouped and full-width digits too


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + PIECES)}
    pattern = "|".join(sorted((p for p in PIECES if len(p) > 1), key=len, reverse=True)) + "|."
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def random_responses(tokenizer, count, length, seed):
    rng = np.random.default_rng(seed)
    ids = [tokenizer.convert_tokens_to_ids(p) for p in PIECES]
    weights = np.array([4.0 if p.isdigit() else 1.0 for p in PIECES])
    tokens = rng.choice(ids, size=(count, length), p=weights / weights.sum())
    ends = rng.integers(1, length + 1, count)  # some rows end early with EOS, then junk
    for row, end in enumerate(ends):
        if end < length:
            tokens[row, end] = tokenizer.eos_token_id
    return tokens.astype(np.int32)


def decoded(tokenizer, row):
    row = list(row)
    if tokenizer.eos_token_id in row:
        row = row[:row.index(tokenizer.eos_token_id)]
    return tokenizer.decode(row)


@pytest.mark.parametrize("require_japanese", [True, False])
def test_mgsm_scores_equal_the_text_metric(tokenizer, require_japanese):
    tokens = random_responses(tokenizer, 3000, 10, seed=int(require_japanese))
    texts = [decoded(tokenizer, row) for row in tokens]
    rng = np.random.default_rng(7)
    # Half the answers are the text's own last number (when it is an integer that fits), so positives occur.
    answers = []
    for text in texts:
        value = metrics.extract_answer(text)
        own = value is not None and value == int(value) and abs(value) < 1e9
        answers.append(int(value) if own and rng.random() < 0.5 else int(rng.integers(-20, 2000)))
    expected = np.array([metrics.mgsm_correct(t, a, require_japanese) for t, a in zip(texts, answers)])
    table = TokenTable.from_tokenizer(tokenizer)
    got = jax.jit(mgsm_scores)(
        jnp.asarray(tokens), jnp.asarray(answers, jnp.int32), table, jnp.asarray([tokenizer.eos_token_id]),
        require_japanese=require_japanese)
    assert expected.sum() > 100  # the test exercises positives
    wrong = np.flatnonzero(np.asarray(got, bool) != expected)
    assert not len(wrong), [(texts[i], answers[i], expected[i]) for i in wrong[:5]]


def test_exact_match_scores(tokenizer):
    eos = tokenizer.eos_token_id
    ref = [5, 6, eos, 0]
    cases = {(5, 6, eos, 9): 1.0, (5, 6, 7, eos): 0.0, (5, 7, eos, 0): 0.0, (5, eos, 6, 0): 0.0}
    tokens = jnp.asarray(list(cases), jnp.int32)
    got = exact_match_scores(tokens, jnp.asarray([ref] * len(cases), jnp.int32), jnp.asarray([eos]))
    assert np.asarray(got).tolist() == list(cases.values())


class _IdTokenizer:
    """rouge-score's tokenizer protocol over space-separated token ids."""
    def tokenize(self, text):
        return text.split()


def test_rouge_l_scores_equal_rouge_score(tokenizer):
    """The jitted token-level ROUGE-L equals rouge-score's F-measure on the same token ids,
    and zeroes a non-Japanese response to a Japanese reference as `metrics.is_japanese` says."""
    from rouge_score import rouge_scorer

    eos = tokenizer.eos_token_id
    responses = random_responses(tokenizer, 500, 8, seed=3)
    references = random_responses(tokenizer, 500, 6, seed=4)
    references[:, -1] = eos  # every reference ends
    references[:, 0] = np.where(references[:, 0] == eos, responses[:, 0], references[:, 0])  # none is empty
    references[::3, :3] = responses[::3, :3]  # overlaps of every length occur
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_IdTokenizer())
    table = TokenTable.from_tokenizer(tokenizer)

    def ids(row):
        row = list(row)
        return row[:row.index(eos)] if eos in row else row

    expected = []
    for response, reference in zip(responses, references):
        f = scorer.score(" ".join(map(str, ids(reference))), " ".join(map(str, ids(response))))["rougeL"].fmeasure
        if metrics.is_japanese(decoded(tokenizer, reference)) and not metrics.is_japanese(decoded(tokenizer, response)):
            f = 0.0
        expected.append(f)
    expected = np.array(expected)
    got = jax.jit(rouge_l_scores)(jnp.asarray(responses), jnp.asarray(references), jnp.asarray([eos]), table)
    assert np.sum((expected > 0) & (expected < 1)) > 100 and np.sum(expected == 1) > 5  # partial and full hits
    assert np.sum([metrics.is_japanese(decoded(tokenizer, r)) for r in references]) > 20  # the check is exercised
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
