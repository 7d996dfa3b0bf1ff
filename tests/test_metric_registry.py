"""Metrics registered from outside the package score tasks as the built-in ones do: in the
search's jitted fitness, on the host, and on the test splits, through the pipeline's own
`prepare_task`, `FitnessBatches` and `evaluate`, on the toy world's base model (which gets
some of its sums right)."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

import jaxmerge
from jaxmerge.eval.metric_registry import (
    GENERATION,
    Metric,
    get_metric,
    metric_names,
    reference_arrays,
    register_metric,
    resolve_metric_name,
    unregister_metric,
)
from jaxmerge.eval.metrics import normalize_japanese
from jaxmerge.eval.tasks import FitnessBatches, TaskSpec, evaluate, generate_texts, prepare_task, response_scores
from jaxmerge.eval.token_metrics import TokenTable, response_mask
from jaxmerge.testing import toy_world as tw

BUILT_IN = ("exact", "number", "rouge_l", "host", "multiple_choice", "multiple_choice_norm", "loglik")


def starts_with_answer_tokens(tokens, batch, spec, table, eos_ids):
    """[B] 1.0 where the generated ids begin with the answer's ids (in jit)."""
    references = batch["references"]  # [B, N]: ids, EOS, padding
    return jnp.all((tokens == references) | ~response_mask(references, eos_ids), axis=-1).astype(jnp.float32)


def starts_with_answer(task, data, split, row, response, tokenizer) -> float:
    return float(response.startswith(data.answers[row]))


def answer_length_match(task, data, split, row, response, tokenizer) -> float:
    return float(len(response) == len(data.answers[row]))


EXACT_PREFIX = Metric("exact_prefix", GENERATION, describe=lambda spec: "the response begins with the answer",
                      host_scorer=starts_with_answer, token_scorer=starts_with_answer_tokens,
                      answer_arrays=reference_arrays, stops_at_answer=True)
LENGTH_MATCH = Metric("answer_length_match", GENERATION, host_scorer=answer_length_match)


@pytest.fixture
def register():
    """register_metric, undone at the test's end."""
    names = []

    def register_for_the_test(metric: Metric) -> Metric:
        names.append(metric.name)
        return register_metric(metric)
    yield register_for_the_test
    for name in names:
        if name in metric_names():
            unregister_metric(name)
    assert metric_names() == BUILT_IN


@pytest.fixture(scope="module")
def world():
    path = tw.world_dir(0) / "base"
    return jaxmerge.load(path), AutoTokenizer.from_pretrained(path)


def math_task(tokenizer, metric: str, **fields):
    """Toy English sums: 12 fitness rows (the last 4 the validation split), 8 test rows."""
    fitness = tw.task_data(1, 12, tw.english_math, False)
    test = tw.task_data(3, 8, tw.english_math, False, set(fitness.prompts))
    spec = TaskSpec("sums", metric=metric, fitness=fitness, test=test, max_new_tokens=4, **fields)
    return prepare_task(spec, tokenizer, validation_size=4)


def jitted_fitness(fitness: FitnessBatches, model):
    """The search's fitness as the pipeline compiles it: the model's state as data."""
    graphdef, state = nnx.split(model)
    score = jax.jit(lambda state, batch: fitness.score(nnx.merge(graphdef, state), batch))
    return lambda batch: score(state, batch)


def test_a_registered_jitted_metric_scores_the_search_and_the_test_split(register, world):
    model, tokenizer = world
    register(EXACT_PREFIX)
    task = math_task(tokenizer, "exact_prefix")
    fitness = FitnessBatches([task], tokenizer, TokenTable.from_tokenizer(tokenizer, ()), minibatch=4)
    assert not fitness.uses_host and fitness.new_tokens(task) == 3  # two digits and EOS, not max_new_tokens
    assert fitness.describe() == "1 x sums (the response begins with the answer)"

    responses = generate_texts(model, tokenizer, task.validation, fitness.new_tokens(task))
    expected = [float(r.startswith(a)) for r, a in zip(responses, task.validation.answers, strict=True)]
    assert 0 < sum(expected) < len(expected)  # some right, not all: the comparison means something
    rows = fitness.row_scores(task, model, fitness.validation["sums"])
    np.testing.assert_array_equal(np.asarray(rows), expected)
    np.testing.assert_allclose(float(jitted_fitness(fitness, model)(fitness.validation)), np.mean(expected))

    scores, samples = evaluate(model, tokenizer, [task])
    responses = generate_texts(model, tokenizer, task.test, task.spec.max_new_tokens)
    assert samples["sums"] == responses[:5]
    expected = [float(r.startswith(a)) for r, a in zip(responses, task.test.answers, strict=True)]
    assert 0 < sum(expected) < len(expected)
    assert scores == {"sums": pytest.approx(100 * np.mean(expected))}


def test_a_registered_host_metric_is_scored_on_the_host_in_the_search(register, world):
    model, tokenizer = world
    register(LENGTH_MATCH)
    task = math_task(tokenizer, "answer_length_match")
    fitness = FitnessBatches([task], tokenizer, TokenTable.from_tokenizer(tokenizer, ()), minibatch=4)
    assert fitness.uses_host and fitness.new_tokens(task) == 4

    outputs = jitted_fitness(fitness, model)(fitness.validation)  # {task: generated ids [B, N]}
    responses = generate_texts(model, tokenizer, task.validation, 4)
    expected = np.mean([len(r) == len(a) for r, a in zip(responses, task.validation.answers, strict=True)])
    assert 0 < expected < 1
    assert fitness.host_fitness({"sums": np.asarray(outputs["sums"])[None]}, None).tolist() == \
        [pytest.approx(expected)]

    test_responses = generate_texts(model, tokenizer, task.test, 4)
    lengths_match = [len(r) == len(a) for r, a in zip(test_responses, task.test.answers, strict=True)]
    assert evaluate(model, tokenizer, [task])[0] == {"sums": pytest.approx(100 * np.mean(lengths_match))}


def test_a_registered_metric_is_a_test_metric_too(register, world):
    _, tokenizer = world
    register(LENGTH_MATCH)
    task = math_task(tokenizer, "exact", test_metrics=("answer_length_match",))
    responses = list(task.test.answers[:4]) + ["", "1", "12", "x"]
    lengths = [len(r) == len(a) for r, a in zip(responses, task.test.answers, strict=True)]
    exact = [r == a for r, a in zip(responses, task.test.answers, strict=True)]
    assert response_scores(task, task.test, responses, tokenizer) == {
        "sums_answer_length_match": pytest.approx(100 * np.mean(lengths)),
        "sums_exact": pytest.approx(100 * np.mean(exact))}


def test_a_name_registered_twice_is_refused_unless_replaced(register):
    with pytest.raises(ValueError, match=r"^metric 'exact' is already registered; pass replace=True to replace it"):
        register_metric(Metric("exact", GENERATION, host_scorer=answer_length_match))
    assert get_metric("exact").host_scorer is not answer_length_match
    register(LENGTH_MATCH)
    with pytest.raises(ValueError, match="already registered"):
        register_metric(LENGTH_MATCH)
    other = Metric("answer_length_match", GENERATION, host_scorer=starts_with_answer)
    assert register_metric(other, replace=True) is other and get_metric("answer_length_match") is other


def test_unknown_names_are_refused_listing_the_registered_ones(register):
    known = ", ".join(BUILT_IN)
    with pytest.raises(ValueError, match=rf"^unknown metric 'blue' \(known: {known}\)$"):
        get_metric("blue")
    register(LENGTH_MATCH)
    with pytest.raises(ValueError, match=rf"^task t: unknown metric 'blue' \(known: {known}, answer_length_match\)$"):
        TaskSpec("t", metric="blue", test=tw.task_data(2, 2, tw.english_math, False))
    with pytest.raises(ValueError, match=r"test_metrics are further generative metrics of a generative task "
                                         r"\(exact, number, rouge_l, answer_length_match\), got \['bleu'\]"):
        TaskSpec("t", test_metrics=("bleu",), test=tw.task_data(2, 2, tw.english_math, False))
    unregister_metric("answer_length_match")
    with pytest.raises(ValueError, match="unknown metric 'answer_length_match'"):
        TaskSpec("t", metric="answer_length_match", test=tw.task_data(2, 2, tw.english_math, False))


def test_lm_eval_metric_names_resolve_to_ours(register):
    assert [resolve_metric_name(n) for n in ("acc", "acc_norm", "exact_match", "rougeL", "acc,none", "loglik")] == [
        "multiple_choice", "multiple_choice_norm", "exact", "rouge_l", "multiple_choice", "loglik"]
    register(Metric("acc", GENERATION, host_scorer=answer_length_match))
    assert resolve_metric_name("acc") == "acc" and resolve_metric_name("acc_norm") == "multiple_choice_norm"


def test_a_task_named_with_lm_evals_metric_keeps_ours(tmp_path):
    """`metric: acc_norm` in a config (or TaskSpec(metric="acc")) is the task of our metric."""
    from jaxmerge.eval.tasks import TaskData
    from jaxmerge.pipeline import load_config

    choices = TaskData(("q",), ("a",), choices=(("a", "b"),), labels=(0,))
    assert TaskSpec("t", metric="acc", test=choices).metric == "multiple_choice"
    (tmp_path / "d.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    world = tw.world_dir(0)
    models = f"[{world / 'math'}, {world / 'japanese'}]"
    (tmp_path / "c.yml").write_text(f"genome: {{models: {models}, base_model: {world / 'base'}}}\n"
                                    "tasks: [{name: t, metric: acc_norm, fitness: d.jsonl}]\n")
    assert load_config(tmp_path / "c.yml").tasks[0].metric == "multiple_choice_norm"


def test_lm_eval_metric_names_without_ours_say_so():
    known = ", ".join(BUILT_IN)
    with pytest.raises(ValueError, match=rf"^unknown metric 'perplexity' \(known: {known}\); 'perplexity' is an "
                                         r"lm-eval metric jaxmerge does not compute: the nearest is 'loglik'"):
        resolve_metric_name("perplexity")
    with pytest.raises(ValueError, match=r"^unknown metric 'acc_mutual_info' .*the nearest are 'multiple_choice' "
                                         r"\(acc\) and 'multiple_choice_norm' \(acc_norm\)$"):
        resolve_metric_name("acc_mutual_info")
    with pytest.raises(ValueError, match=r"'bleu' is an lm-eval metric jaxmerge does not compute: score it with "
                                         r"metric: host"):
        resolve_metric_name("bleu")
    with pytest.raises(ValueError, match=r"'exact_match,flexible-extract' is lm-eval's 'exact_match' after its filter "
                                         r"'flexible-extract', which jaxmerge does not apply: write 'exact_match' "
                                         r"\(jaxmerge's 'exact'; 'number' scores a response's last number\)"):
        resolve_metric_name("exact_match,flexible-extract")
    with pytest.raises(ValueError, match=rf"^unknown metric 'acc' \(known: {known}\); 'acc' is lm-eval's name for "
                                         r"'multiple_choice': name that, or look the name up with resolve_metric_name"):
        get_metric("acc")  # the registry itself looks up registered names only
    with pytest.raises(ValueError, match=rf"^unknown metric 3 \(known: {known}\)$"):
        resolve_metric_name(3)


def test_a_metric_must_say_how_it_scores():
    with pytest.raises(ValueError, match=r"kind is 'generative', not one of generation, likelihood"):
        Metric("m", "generative", host_scorer=answer_length_match)
    with pytest.raises(ValueError, match=r"a generation metric needs a host_scorer"):
        Metric("m", GENERATION, token_scorer=starts_with_answer_tokens)
    with pytest.raises(ValueError, match=r"a likelihood metric has likelihood_arrays and a likelihood_scorer"):
        Metric("m", "likelihood", host_scorer=answer_length_match)
    with pytest.raises(TypeError, match="register_metric takes a Metric"):
        register_metric("answer_length_match")


@pytest.mark.parametrize("missing", ["fugashi", "unidic_lite", "neologdn", "emoji"])
def test_japanese_rouge_without_the_ja_extra_says_how_to_install_it(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what Python sees when a package is not installed
    install = r'pip install "jaxmerge\[ja\]"'
    with pytest.raises(ImportError, match=rf"^Japanese ROUGE-L \(MeCab words\) needs {missing}, not installed: "
                                          rf"{install}$"):
        TaskSpec("ja", metric="exact", test_metrics=("rouge_l",), language="japanese",
                 test=tw.task_data(2, 2, tw.japanese_qa, False))
    with pytest.raises(ImportError, match=install):
        normalize_japanese("テスト")
    TaskSpec("en", metric="rouge_l", language="english", test=tw.task_data(2, 2, tw.english_math, False))
