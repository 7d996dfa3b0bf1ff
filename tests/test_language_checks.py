"""The language check passes a response without letters (a bare number is in no script), on
the host and in jit; the trivial baselines get the check models get; and the checks before a
search say when a task's language check rejects most responses or every source scores 0
(issue 28, item 1: with `language: latin` every model scored 0 on English sums). A task's
`language_strict` restores the paper's rule (a bare number fails), also on the host and in jit
alike, and the paper's toy ja_math keeps its published scores with it."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import piece_tokenizer
from transformers import AutoTokenizer

import jaxmerge
from jaxmerge.eval import metrics
from jaxmerge.eval.tasks import (
    FitnessBatches,
    Task,
    TaskData,
    TaskSpec,
    evaluate,
    evaluate_with_checks,
    generate_texts,
    language_check_warnings,
    language_rejections,
    prepare_task,
    response_scores,
    table_checks,
    trivial_rows,
    zero_score_tasks,
)
from jaxmerge.eval.token_metrics import TokenTable, language_check, number_scores, response_mask, rouge_l_scores
from jaxmerge.pipeline.config import ConfigError, load_config
from jaxmerge.testing import toy_world as tw

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

PIECES = list("0123456789,.-− ?:") + ["answer", "is", "答え", "は", "Ответ", "Ж"]


@pytest.fixture(scope="module")
def tokenizer():
    """Words and digits, one token each."""
    return piece_tokenizer(PIECES)


@pytest.fixture(scope="module")
def table(tokenizer):
    return TokenTable.from_tokenizer(tokenizer, languages=("latin", "japanese"))


def encode(tokenizer, texts, length=8):
    """[B, length] ids of each text, then EOS, then padding."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert tokenizer.unk_token_id not in ids and len(ids) <= length, text
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    return jnp.asarray(rows, jnp.int32)


# (response, the answer 1 is right: its last number) in English sums with `language: latin`.
RESPONSES = {"1": True, "-1": False, " 1.": True, "1,000": False, "answer is 1": True, "答えは1": False,
             "Ответ: 1": False, "": False}


@pytest.mark.parametrize("language", ["latin", "english", "en"])
def test_a_bare_number_passes_the_language_check_on_the_host(language):
    assert metrics.number_correct("1", 1, language) and metrics.number_correct("-7", -7, language)
    assert metrics.number_correct("1,000.", 1000, "japanese")  # in no script, so in no wrong one
    assert not metrics.number_correct("答えは1", 1, language) and not metrics.number_correct("Ответ: 1", 1, language)
    assert [metrics.number_correct(text, 1, language) for text in RESPONSES] == list(RESPONSES.values())
    spec = TaskSpec("sums", metric="number", language=language, test=TaskData(("?",) * len(RESPONSES),
                                                                              ("1",) * len(RESPONSES)))
    task = Task(spec, None, None, spec.test)
    assert response_scores(task, spec.test, list(RESPONSES), None) == \
        {"sums": pytest.approx(100 * np.mean(list(RESPONSES.values())))}


@pytest.mark.parametrize("language", ["latin", "english"])
def test_a_bare_number_passes_the_language_check_in_jit(tokenizer, table, language):
    tokens = encode(tokenizer, list(RESPONSES))
    eos = jnp.asarray([tokenizer.eos_token_id])
    score = jax.jit(functools.partial(number_scores, language=language))
    got = score(tokens, jnp.ones(len(RESPONSES), jnp.int32), table, eos)
    assert np.asarray(got).tolist() == [float(right) for right in RESPONSES.values()]
    passes = language_check(tokens, table, response_mask(tokens, eos), language)
    assert np.asarray(passes).tolist() == [metrics.is_language(text, language) for text in RESPONSES]
    assert np.asarray(passes).tolist() == [True, True, True, True, True, False, False, True]


def test_rouge_l_checks_a_response_against_a_reference_in_the_language(tokenizer, table):
    """A response without letters keeps its ROUGE-L against a reference in the language; a
    response in another script loses it, also against a reference without letters (in no
    script, so in every one: the task's language governs)."""
    eos = jnp.asarray([tokenizer.eos_token_id])
    references = ["答えは1", "答えは1", "1", "答えは1"]
    responses = ["1", "answer is 1", "answer is 1", "答えは2"]
    got = np.asarray(rouge_l_scores(encode(tokenizer, responses), encode(tokenizer, references), eos, table,
                                     "japanese"))
    assert got[0] == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3)) and got[1] == got[2] == 0.0
    assert got[3] == pytest.approx(2 / 3)
    assert np.asarray(rouge_l_scores(encode(tokenizer, responses), encode(tokenizer, references), eos))[2] > 0
    # The paper's Japanese ROUGE-L (MeCab words): a bare number is no longer replaced by "".
    assert metrics.rouge_l_ja(["1"], ["答えは1"], bootstrap=False) > 0.0
    assert metrics.rouge_l_ja(["answer is 1"], ["答えは1"], bootstrap=False) == 0.0


def test_trivial_rows_get_the_language_check_models_get():
    """Commonest fitness answer "3こ" on a task in Latin script: rejected now, as a model's
    "3こ" is (it was scored without the check); the copied numbers pass."""
    fitness = TaskData(("what is 3?", "2 + 1 = ?", "0 + 3 = ?"), ("3こ", "3こ", "3こ"))
    test = TaskData(("what is 3?", "5 + 3 = ?"), ("3", "8"))
    spec = TaskSpec("sums", metric="number", language="latin", fitness=fitness, test=test)
    rows = {row["model"]: row for row in trivial_rows(Task(spec, fitness, None, test), None)}
    assert {name: row["scores"]["sums"] for name, row in rows.items()} == {
        "commonest fitness answer to each question": 0.0, "copy the first number": 50.0,
        "copy the last number": 50.0}
    assert rows["commonest fitness answer to each question"]["language_checks"] == {
        "sums": {"language": "latin", "strict": False, "responses": 2, "scorable": 1, "rejected": 1}}
    assert rows["copy the last number"]["language_checks"]["sums"]["rejected"] == 0
    fitness = TaskData(("1 + 2 = ?",), ("3",))
    spec = dataclasses.replace(spec, fitness=fitness)
    rows = {row["model"]: row for row in trivial_rows(Task(spec, fitness, None, test), None)}
    assert rows["commonest fitness answer to each question"]["scores"]["sums"] == 50.0


def sums_task(language="latin", metric="number"):
    answers = tuple(str(n) for n in range(10))
    spec = TaskSpec("sums", metric=metric, language=language, test=TaskData(tuple(f"{n} + 0 = ?" for n in range(10)),
                                                                           answers))
    return Task(spec, None, None, spec.test)


def test_language_rejections_flag_a_check_that_rejects_most_answers():
    task = sums_task()
    japanese = [f"答えは{n}" for n in range(8)] + ["8", "answer is 0"]  # 8 right and rejected, 1 right, 1 wrong
    counts = language_rejections(task, task.test, japanese, None)
    assert counts == {"language": "latin", "strict": False, "responses": 10, "scorable": 9, "rejected": 8}
    [message] = language_check_warnings("ja_lm", {"sums": counts})
    assert message.startswith("task sums: the language check (latin) rejected 89% of ja_lm's responses") and \
        "(8 of 9; 10 responses)" in message

    healthy = [str(n) for n in range(5)] + [f"answer is {n}" for n in range(5, 9)] + ["答えは9"]
    counts = language_rejections(task, task.test, healthy, None)
    assert counts == {"language": "latin", "strict": False, "responses": 10, "scorable": 10, "rejected": 1}
    assert language_check_warnings("en_lm", {"sums": counts}) == []
    # Wrong numbers are not the check's doing; a task without a language has nothing to check.
    assert language_rejections(task, task.test, ["答えは7"] * 10, None)["scorable"] == 1
    assert language_rejections(sums_task(language=None), task.test, japanese, None) is None
    with pytest.raises(ValueError, match="task sums: 2 responses to 10 test rows"):
        language_rejections(task, task.test, ["1", "2"], None)


def test_language_rejections_of_a_rouge_task(tokenizer):
    """A metric without a per-row scorer (ROUGE-L's report) is checked row by row."""
    answers = ("answer is 1", "1", "answer is 2", "answer is 3")
    spec = TaskSpec("qa", metric="rouge_l", language="latin", test=TaskData(("?",) * 4, answers))
    task = Task(spec, None, None, spec.test)
    responses = ["答えは1", "1", "答えは2", "answer is 3"]  # rejected, fine (no letters), rejected, fine
    assert language_rejections(task, task.test, responses, tokenizer) == {
        "language": "latin", "strict": False, "responses": 4, "scorable": 4, "rejected": 2}


def test_zero_score_tasks_and_table_checks():
    rows = [{"model": "ja", "kind": "source", "scores": {"sums": 0.0, "qa": 12.0, "qa_rouge_l": 0.0},
             "language_checks": {"sums": {"language": "latin", "responses": 4, "scorable": 4, "rejected": 4}}},
            {"model": "math", "kind": "source", "scores": {"sums": 0.0, "qa": 0.0, "qa_rouge_l": 0.0}},
            {"model": "base", "kind": "base", "scores": {"sums": 25.0, "qa": 0.0, "qa_rouge_l": 3.0}},
            {"model": "copy the last number", "kind": "trivial", "scores": {"sums": 13.0}}]
    assert zero_score_tasks(rows) == ["sums", "qa_rouge_l"]
    assert zero_score_tasks(rows, kinds=("source", "base")) == []
    assert zero_score_tasks(rows[2:]) == []  # no source: nothing to say
    messages = table_checks(rows)
    assert len(messages) == 3 and messages[0].startswith("task sums: the language check (latin) rejected 100% of "
                                                         "ja's responses")
    assert messages[1] == ("task sums: every source scored 0 (ja, math): the search starts on a flat landscape; "
                           "check the task's metric, language, prompt and answers")
    assert messages[2].startswith("task qa_rouge_l: every source scored 0")
    rows[0]["scores"]["sums"] = 25.0
    rows[0]["language_checks"]["sums"]["rejected"] = 2  # half: not most
    assert table_checks(rows) == [messages[2]]


@pytest.fixture(scope="module")
def world():
    path = tw.world_dir(0) / "base"
    return jaxmerge.load(path), AutoTokenizer.from_pretrained(path)


def test_a_model_answering_english_sums_with_bare_numbers_scores_under_latin(world):
    """The issue's run: the toy base model answers English sums with a bare number; with
    `language: english` it scored 0 on the test split (host) and in the search (jit)."""
    model, tokenizer = world
    fitness = tw.task_data(1, 12, tw.english_math, False)
    test = tw.task_data(3, 8, tw.english_math, False, set(fitness.prompts))
    spec = TaskSpec("sums", metric="number", language="english", fitness=fitness, test=test, max_new_tokens=4)
    task = prepare_task(spec, tokenizer, validation_size=4)

    scores, samples, checks = evaluate_with_checks(model, tokenizer, [task])
    assert (scores, samples) == evaluate(model, tokenizer, [task])
    unchecked = Task(dataclasses.replace(spec, language=None), task.fitness, task.validation, task.test)
    assert 0 < scores["sums"] == evaluate(model, tokenizer, [unchecked])[0]["sums"]
    assert checks == {"sums": {"language": "english", "strict": False, "responses": 8,
                               "scorable": round(scores["sums"] * 8 / 100), "rejected": 0}}

    fitness = FitnessBatches([task], tokenizer, TokenTable.from_tokenizer(tokenizer, ("latin",)), minibatch=4)
    rows = np.asarray(fitness.row_scores(task, model, fitness.validation["sums"]))
    free = FitnessBatches([unchecked], tokenizer, fitness.table, minibatch=4)
    assert rows.sum() > 0 and rows.tolist() == np.asarray(free.row_scores(unchecked, model,
                                                                           free.validation["sums"])).tolist()


# ----------------------------------------------------------------------------- the strict rule (language_strict)

# RESPONSES under the strict rule: only the right number in a response with letters, mostly Latin.
STRICT = {"1": False, "-1": False, " 1.": False, "1,000": False, "answer is 1": True, "答えは1": False,
          "Ответ: 1": False, "": False}


def test_the_strict_rule_fails_a_bare_number():
    assert not metrics.is_language("42", "japanese", strict=True) and metrics.is_language("42", "japanese")
    assert not metrics.number_correct("42", 42, "japanese", strict=True)
    assert metrics.number_correct("答えは42", 42, "japanese", strict=True)
    assert not metrics.number_correct("the answer is 42", 42, "japanese", strict=True)


@pytest.mark.parametrize("strict", [False, True])
def test_number_scores_strict_and_lenient_on_the_host_and_in_jit(tokenizer, table, strict):
    """The registry's number scorers (host: one decoded response; jit: token ids) read the
    task's `language_strict` and agree, row by row."""
    expected = list((STRICT if strict else RESPONSES).values())
    assert [metrics.number_correct(text, 1, "latin", strict) for text in RESPONSES] == expected
    answers = ("1",) * len(RESPONSES)
    spec = TaskSpec("sums", metric="number", language="latin", language_strict=strict,
                    test=TaskData(("?",) * len(RESPONSES), answers))
    task, metric = Task(spec, None, None, spec.test), spec.scoring
    host = [metric.host_scorer(task, spec.test, "test", row, text, tokenizer) for row, text in enumerate(RESPONSES)]
    tokens, eos = encode(tokenizer, list(RESPONSES)), jnp.asarray([tokenizer.eos_token_id])
    batch = {k: jnp.asarray(v) for k, v in metric.answer_arrays(answers, tokenizer, 1).items()}
    jitted = jax.jit(lambda tokens, batch: metric.token_scorer(tokens, batch, spec, table, eos))(tokens, batch)
    assert host == np.asarray(jitted).tolist() == [float(right) for right in expected]
    assert response_scores(task, spec.test, list(RESPONSES), tokenizer) == {"sums": pytest.approx(100 * np.mean(host))}

    texts = ["42", "答えは42", "answer is 4"]
    check = jax.jit(functools.partial(language_check, language="japanese", strict=strict))
    passes = check(encode(tokenizer, texts), table, response_mask(encode(tokenizer, texts), eos))
    assert np.asarray(passes).tolist() == [not strict, True, False] == \
        [metrics.is_language(text, "japanese", strict=strict) for text in texts]


@pytest.mark.parametrize("strict", [False, True])
def test_rouge_l_strict_and_lenient_on_the_host_and_in_jit(tokenizer, table, strict):
    """Token ROUGE-L (the host report and the jitted scorer of the registry) with the strict
    rule: a bare response loses its overlap with a reference in the language, and a reference
    without letters, in no language, checks nothing."""
    references = ("answer is 1", "1", "answer is 2", "1")
    responses = ["1", "answer is 1", "answer is 2", "答えは1"]
    spec = TaskSpec("qa", metric="rouge_l", language="latin", language_strict=strict,
                    test=TaskData(("?",) * 4, references))
    task, metric = Task(spec, None, None, spec.test), spec.scoring
    host = [metric.report(task, spec.test.take([row]), "test", [text], tokenizer)["rouge_l"] / 100
            for row, text in enumerate(responses)]
    batch = {k: jnp.asarray(v) for k, v in metric.answer_arrays(references, tokenizer, 8).items()}
    eos = jnp.asarray([tokenizer.eos_token_id])
    jitted = jax.jit(lambda tokens, batch: metric.token_scorer(tokens, batch, spec, table, eos))(
        encode(tokenizer, responses), batch)
    np.testing.assert_allclose(np.asarray(jitted), host, atol=1e-6)
    # "1" against "answer is 1": 2 x 1 x 1/5 / (1 + 1/5); "答えは1" against "1": 2 x 1/3 x 1 / (1/3 + 1).
    assert host[0] == (0.0 if strict else pytest.approx(1 / 3)) and host[2] == 1.0
    assert host[1] > 0  # "1" as reference: in every language (lenient) or none (strict); a Latin response passes
    assert host[3] == (pytest.approx(0.5) if strict else 0.0)  # "1": in no language, checks nothing (strict)
    # The paper's Japanese ROUGE-L (MeCab words) by the same rule.
    bare = metrics.rouge_l_ja(["1"], ["答えは1"], bootstrap=False, strict=strict)  # "1" of 答え / は / 1
    assert bare == (0.0 if strict else pytest.approx(50.0))
    assert (metrics.rouge_l_ja(["answer 1"], ["1"], bootstrap=False, strict=strict) > 0) == strict
    japanese = TaskSpec("qa", metric="rouge_l", language="japanese", language_strict=strict,
                        test=TaskData(("?",), ("答えは1",)))
    scores = response_scores(Task(japanese, None, None, japanese.test), japanese.test, ["1"], tokenizer)
    assert (scores["qa_rouge_l"] == 0.0) == strict


def test_language_rejections_under_the_strict_rule():
    """Bare right numbers: the strict rule rejects all of them and says so; the trivial rows of
    a strict task are scored as copies written in the language (upper bounds, as published)."""
    strict = Task(dataclasses.replace(sums_task().spec, language_strict=True), None, None, sums_task().test)
    bare = [str(n) for n in range(10)]
    counts = language_rejections(strict, strict.test, bare, None)
    assert counts == {"language": "latin", "strict": True, "responses": 10, "scorable": 10, "rejected": 10}
    assert language_rejections(sums_task(), strict.test, bare, None)["rejected"] == 0
    [message] = language_check_warnings("math", {"sums": counts})
    assert message.startswith("task sums: the language check (latin, strict) rejected 100% of math's") and \
        "(language_strict: one without letters fails)" in message

    fitness = TaskData(("1 + 2 = ?", "3 + 0 = ?"), ("3", "3"))
    test = TaskData(("what is 3?", "5 + 3 = ?"), ("3", "8"))
    lenient = TaskSpec("sums", metric="number", language="latin", fitness=fitness, test=test)
    rows = {spec.language_strict: trivial_rows(Task(spec, fitness, None, test), None)
            for spec in (lenient, dataclasses.replace(lenient, language_strict=True))}
    assert rows[True] == rows[False] and rows[True][0]["scores"] == {"sums": 50.0}


def test_language_strict_needs_a_language():
    with pytest.raises(ValueError, match="task sums: language_strict is a rule of the language check; give the task "
                                         "a language"):
        TaskSpec("sums", metric="number", language_strict=True, test=TaskData(("?",), ("1",)))


def test_the_example_configs_load_with_the_strict_rule():
    config = load_config(EXPERIMENTS / "toy_keep_skills.yml")
    assert [(t.name, t.language, t.language_strict) for t in config.tasks] == [
        ("ja_math", "japanese", True), ("ja_qa", None, False), ("en_math", None, False)]
    assert load_config(EXPERIMENTS / "toy_multiple_choice.yml").tasks[1].language_strict
    lenient = load_config(EXPERIMENTS / "toy_keep_skills.yml", ["tasks[0].language_strict=false"])
    assert not lenient.tasks[0].language_strict
    with pytest.raises(ConfigError, match=r"toy_keep_skills.yml.*tasks\[0\]: task ja_math: language_strict is a rule"):
        load_config(EXPERIMENTS / "toy_keep_skills.yml", ["tasks[0].language=null"])
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.language_strict"):
        load_config(EXPERIMENTS / "toy_keep_skills.yml", ["tasks[0].language_strict=strict"])


@pytest.fixture(scope="module")
def toy_math_source():
    """The shipped toy world's math source on the paper's toy ja_math test split (seed 0, 300
    rows, as experiments/results_ja_math.md reports it): the task and the greedy responses."""
    world = tw.world_dir(0)
    tokenizer = AutoTokenizer.from_pretrained(world / "math")
    task = prepare_task(tw.tasks(0, 300, 0.0)[0], tokenizer)
    return task, tokenizer, generate_texts(jaxmerge.load(world / "math"), tokenizer, task.test,
                                           task.spec.max_new_tokens)


def test_toy_ja_math_keeps_its_published_scores(toy_math_source):
    """results_ja_math.md: math (source) 9.0 on ja_math, best trivial answer (copy the first
    number) 10.0. The math model answers many problems with a bare number ("7"): the lenient
    rule would count those."""
    task, tokenizer, responses = toy_math_source
    assert task.spec.language == "japanese" and task.spec.language_strict
    assert response_scores(task, task.test, responses, tokenizer) == {"ja_math": pytest.approx(9.0)}
    lenient = Task(dataclasses.replace(task.spec, language_strict=False), task.fitness, task.validation, task.test)
    assert response_scores(lenient, task.test, responses, tokenizer)["ja_math"] > 9.0 + 10
    trivial = {row["model"]: row["scores"]["ja_math"] for row in trivial_rows(task, tokenizer)}
    best = max(trivial, key=trivial.get)
    assert best == "copy the first number" and trivial[best] == pytest.approx(10.0)


@pytest.mark.parametrize("strict", [False, True])
def test_toy_ja_math_host_and_jit_agree(toy_math_source, strict):
    """The math source's real responses, scored row by row on the host and in jit (their token
    ids), under either rule."""
    task, tokenizer, responses = toy_math_source
    spec = dataclasses.replace(task.spec, language_strict=strict)
    task, metric = Task(spec, task.fitness, task.validation, task.test), spec.scoring
    host = [metric.host_scorer(task, task.test, "test", row, text, tokenizer) for row, text in enumerate(responses)]
    table = TokenTable.from_tokenizer(tokenizer, ("japanese",))
    eos = jnp.asarray([tokenizer.eos_token_id])
    batch = {k: jnp.asarray(v) for k, v in metric.answer_arrays(task.test.answers, tokenizer, 4).items()}
    jitted = jax.jit(lambda tokens, batch: metric.token_scorer(tokens, batch, spec, table, eos))(
        encode(tokenizer, responses, length=spec.max_new_tokens + 1), batch)
    assert np.asarray(jitted).tolist() == host and 0 < sum(host) < len(host)
