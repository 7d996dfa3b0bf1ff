"""The jitted token metrics equal the text metrics of `jaxmerge.eval.metrics` on the decoded text."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import piece_tokenizer

from jaxmerge.eval import metrics
from jaxmerge.eval.token_metrics import TokenTable, exact_match_scores, number_scores, rouge_l_scores

# Grouped and full-width digits; Japanese, Korean, Cyrillic and Latin letters, one and two to a token.
PIECES = list("0123456789,.-−こアaB 한Ж") + ["１", "12", "345", "7000", "한국", "Жи", "aЖ"]
LANGUAGES = ("japanese", "korean", "cyrillic")


@pytest.fixture(scope="module")
def tokenizer():
    return piece_tokenizer(PIECES)


@pytest.fixture(scope="module")
def table(tokenizer):
    return TokenTable.from_tokenizer(tokenizer, languages=LANGUAGES)


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


def until_eos(row, eos):
    row = list(row)
    return row[:row.index(eos)] if eos in row else row


def decoded(tokenizer, row):
    return tokenizer.decode(until_eos(row, tokenizer.eos_token_id))


def test_table_counts_letters_per_script(tokenizer, table):
    def counts(piece):
        token = tokenizer.convert_tokens_to_ids(piece)
        return int(table.letters[token]), [int(table.script_letters[table.language_index(name), token])
                                           for name in LANGUAGES]

    assert table.languages == LANGUAGES and table.script_letters.shape == (3, len(tokenizer))
    assert counts("こ") == (1, [1, 0, 0]) and counts("한국") == (2, [0, 2, 0])
    assert counts("aЖ") == (2, [0, 0, 1]) and counts("12") == (0, [0, 0, 0])
    assert int(table.digit_value[tokenizer.convert_tokens_to_ids("7000")]) == 7000


def test_table_language_index(tokenizer, table):
    assert table.language_index("ko") == table.language_index("korean") == 1
    assert table.language_index("ru") == 2
    with pytest.raises(ValueError, match="japanese, korean, cyrillic.*'greek'"):
        table.language_index("greek")
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        table.language_index("klingon")
    default = TokenTable.from_tokenizer(tokenizer)
    assert default.languages == ("japanese",) and default.script_letters.shape == (1, len(tokenizer))
    assert TokenTable.from_tokenizer(tokenizer, languages=("ja", "japanese")).languages == ("japanese",)


@pytest.mark.parametrize(("language", "strict"), [(None, False), ("japanese", False), ("japanese", True),
                                                   ("ko", False), ("ko", True), ("cyrillic", False)])
def test_number_scores_equal_the_text_metric(tokenizer, table, language, strict):
    tokens = random_responses(tokenizer, 3000, 10, seed=len(language or ""))
    texts = [decoded(tokenizer, row) for row in tokens]
    rng = np.random.default_rng(7)
    # Half the answers are the text's own last number (when it is an integer that fits), so positives occur.
    answers = []
    for text in texts:
        value = metrics.extract_number(text)
        own = value is not None and value == int(value) and abs(value) < 1e9
        answers.append(int(value) if own and rng.random() < 0.5 else int(rng.integers(-20, 2000)))
    expected = np.array([metrics.number_correct(t, a, language, strict) for t, a in zip(texts, answers, strict=True)])
    score = jax.jit(functools.partial(number_scores, language=language, strict=strict))
    got = score(jnp.asarray(tokens), jnp.asarray(answers, jnp.int32), table, jnp.asarray([tokenizer.eos_token_id]))
    assert expected.sum() > 100  # the test exercises positives
    if language is not None:  # and the language check rejects right numbers
        assert sum(metrics.number_correct(t, a) for t, a in zip(texts, answers, strict=True)) > expected.sum() + 100
    if strict:  # and the strict rule rejects right numbers without letters that the lenient one passes
        lenient = sum(metrics.number_correct(t, a, language) for t, a in zip(texts, answers, strict=True))
        assert lenient > expected.sum() + 20
    wrong = np.flatnonzero(np.asarray(got, bool) != expected)
    assert not len(wrong), [(texts[i], answers[i], expected[i]) for i in wrong[:5]]


def test_number_scores_need_the_language_in_the_table(tokenizer):
    table = TokenTable.from_tokenizer(tokenizer)
    tokens = jnp.asarray(random_responses(tokenizer, 2, 4, seed=0))
    with pytest.raises(ValueError, match="korean"):
        number_scores(tokens, jnp.zeros(2, jnp.int32), table, jnp.asarray([tokenizer.eos_token_id]), "korean")


def test_exact_match_scores(tokenizer):
    eos = tokenizer.eos_token_id
    ref = [5, 6, eos, 0]
    cases = {(5, 6, eos, 9): 1.0, (5, 6, 7, eos): 0.0, (5, 7, eos, 0): 0.0, (5, eos, 6, 0): 0.0}
    tokens = jnp.asarray(list(cases), jnp.int32)
    got = exact_match_scores(tokens, jnp.asarray([ref] * len(cases), jnp.int32), jnp.asarray([eos]))
    assert np.asarray(got).tolist() == list(cases.values())
    # A reference with no end of sequence matches a response equal over its whole length.
    full = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    assert exact_match_scores(full, full, jnp.asarray([eos])).tolist() == [1.0]


class _IdTokenizer:
    """rouge-score's tokenizer protocol over space-separated token ids."""
    def tokenize(self, text):
        return text.split()


@pytest.mark.parametrize(("language", "strict"), [(None, False), ("japanese", False), ("japanese", True),
                                                   ("korean", False)])
def test_rouge_l_scores_equal_the_text_metrics(tokenizer, table, language, strict):
    """The jitted token-level ROUGE-L equals `metrics.rouge_l_tokens` and rouge-score's F-measure on
    the same token ids, and zeroes a response not in the language against a reference in it, as
    `metrics.is_language` says (`strict`: a text without letters is in no language)."""
    from rouge_score import rouge_scorer

    eos = tokenizer.eos_token_id
    responses = random_responses(tokenizer, 1000, 8, seed=3)
    references = random_responses(tokenizer, 1000, 6, seed=4)
    references[:, -1] = eos  # every reference ends
    references[:, 0] = np.where(references[:, 0] == eos, responses[:, 0], references[:, 0])  # none is empty
    references[::3, :3] = responses[::3, :3]  # overlaps of every length occur
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_IdTokenizer())

    expected, zeroed, differs = [], 0, 0
    for response, reference in zip(responses, references, strict=True):
        response_ids, reference_ids = until_eos(response, eos), until_eos(reference, eos)
        f = metrics.rouge_l_tokens(response_ids, reference_ids)
        assert f == pytest.approx(scorer.score(" ".join(map(str, reference_ids)),
                                               " ".join(map(str, response_ids)))["rougeL"].fmeasure)
        if language is not None and metrics.is_language(decoded(tokenizer, reference), language, strict=strict) and \
                not metrics.is_language(decoded(tokenizer, response), language, strict=strict):
            zeroed += f > 0
            f = 0.0
        if strict:  # rows the lenient rule scores otherwise
            lenient = metrics.is_language(decoded(tokenizer, reference), language) and \
                not metrics.is_language(decoded(tokenizer, response), language)
            differs += (f == 0.0) != lenient and metrics.rouge_l_tokens(response_ids, reference_ids) > 0
        expected.append(f)
    expected = np.array(expected)
    score = jax.jit(functools.partial(rouge_l_scores, language=language, strict=strict))
    got = score(jnp.asarray(responses), jnp.asarray(references), jnp.asarray([eos]), table)
    assert np.sum((expected > 0) & (expected < 1)) > 100 and np.sum(expected == 1) > 5  # partial and full hits
    assert language is None or zeroed > 20  # the language check is exercised
    assert not strict or differs > 20  # and the strict rule is not the lenient one
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


def test_rouge_l_scores_language_needs_a_table(tokenizer):
    tokens = jnp.asarray(random_responses(tokenizer, 2, 4, seed=0))
    with pytest.raises(ValueError, match="TokenTable"):
        rouge_l_scores(tokens, tokens, jnp.asarray([tokenizer.eos_token_id]), language="japanese")
