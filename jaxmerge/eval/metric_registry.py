"""Metrics by name: what a task's `metric:` means, in the search (in jit) and on the test sets.

A `Metric` says how a task is scored. A *generation* metric scores the model's greedy
response to each prompt: on the host, one decoded response at a time (`host_scorer`; the
test splits are always scored so), and, when it has a `token_scorer`, inside the search's
jitted fitness on the generated token ids (otherwise the search returns the tokens from jit
and scores them on the host). A *likelihood* metric generates nothing: its
`likelihood_scorer` runs the model on given continuations, in jit.

Every metric, the built-in ones included, is registered by `register_metric`; a task names
it by `Metric.name`, and everything that lists metrics (task and config validation) reads
the registry when it runs, so a metric registered before a task is built is as good as a
built-in one:

    def answer_length_match(task, data, split, row, response, tokenizer):
        return float(len(response) == len(data.answers[row]))

    register_metric(Metric("answer_length_match", GENERATION, host_scorer=answer_length_match))
    TaskSpec("qa", metric="answer_length_match", fitness=..., test=...)

Built-in:

  exact                 the response equals the answer (whitespace and NFKC normalised)
  number                the response's last number equals the answer (MGSM), optionally
                        only when the response is in the task's `language`
  rouge_l               ROUGE-L F; in the search over answer tokens, on the test sets over
                        MeCab words for Japanese (the paper's metric) or tokens otherwise;
                        a response not in `language` scores 0 against a reference in it
  host                  the task's own `host_metric(prompt, response, reference) -> float`
                        (`jaxmerge.eval.host_metric`) on decoded responses
  multiple_choice       lm-eval's `multiple_choice` acc: the choice whose continuation has
                        the highest summed log-probability (no generation)
  multiple_choice_norm  the same, log-probability divided by the choice's length (acc_norm)
  loglik                mean log-probability per token of the reference answer

lm-eval's metric names stand for ours where they mean the same (`resolve_metric_name`,
`LM_EVAL_ALIASES`): acc -> multiple_choice, acc_norm -> multiple_choice_norm, exact_match
-> exact, rougeL -> rouge_l, also as lm-eval writes them with no filter ("acc,none"). A
registered name wins over an alias; lm-eval's other metrics (perplexity, bleu, mcc, ...)
are unknown metrics whose error says what comes nearest.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
from flax import nnx

from jaxmerge.eval import loglik
from jaxmerge.eval import metrics as text_metrics
from jaxmerge.eval.encoding import encode_references
from jaxmerge.eval.host_metric import host_score
from jaxmerge.eval.token_metrics import TokenTable, exact_match_scores, number_scores, rouge_l_scores

if TYPE_CHECKING:
    from jaxmerge.eval.tasks import Task, TaskData, TaskSpec

GENERATION = "generation"  # the model generates a response, scored against the answer
LIKELIHOOD = "likelihood"  # no generation: the model's log-probabilities of given continuations
KINDS = (GENERATION, LIKELIHOOD)

# (task, split's data, split name, row, decoded response, tokenizer) -> that row's score.
HostScorer = Callable[["Task", "TaskData", str, int, str, Any], float]
# (generated ids [B, N], the task's batch, spec, token table, end-of-sequence ids [E]) -> [B], in jit.
TokenScorer = Callable[[jax.Array, dict, "TaskSpec", TokenTable, jax.Array], jax.Array]
# (answers, tokenizer, the longest answer's length in tokens) -> arrays [B, ...] added to the batch.
AnswerArrays = Callable[[tuple[str, ...], Any, int], dict[str, np.ndarray]]
# (task, split's data, split name, decoded responses, tokenizer) -> {score name: value}.
Report = Callable[["Task", "TaskData", str, list[str], Any], dict[str, float]]
# (fitness split, test split) -> {baseline name: one answer per test row}.
TrivialAnswers = Callable[["TaskData", "TaskData"], dict[str, list[str]]]
# (spec, split's data, tokenizer) -> arrays, the split's items on the leading axis.
LikelihoodArrays = Callable[["TaskSpec", "TaskData", Any], dict[str, np.ndarray]]
# (model, rows of those arrays, choices flattened) -> [B], in jit.
LikelihoodScorer = Callable[[nnx.Module, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class Metric:
    """How a task is scored. name: what a task's `metric` names. kind: GENERATION or LIKELIHOOD.
    describe: the fitness line's words for it, given the task (default: the name).

    Generation: host_scorer scores one decoded response (the test splits; the search when
    there is no token_scorer); token_scorer scores generated ids in jit, reading the arrays
    answer_arrays adds to each batch. report: a split's scores from all its responses
    (default: {name: scale x mean host_scorer}). stops_at_answer: the search generates only
    as many tokens as the longest answer (the metric reads no further). trivial_answers:
    answers that need no model, reported as baselines (None: no baselines).

    Likelihood: likelihood_arrays encodes a split, likelihood_scorer scores rows of it in jit.

    Any kind: fields the data must have; check_answer: a problem with an answer (e.g. "is
    not a number") or None; check_task: raises for a task that cannot use the metric;
    uses_host_metric: the task's `host_metric` function is the metric; bounded: every row
    scores in [0, 1] (item response theory needs it); scale: reported score = scale x mean."""
    name: str
    kind: str
    describe: Callable[[TaskSpec], str] | None = None
    host_scorer: HostScorer | None = None
    token_scorer: TokenScorer | None = None
    answer_arrays: AnswerArrays | None = None
    report: Report | None = None
    stops_at_answer: bool = False
    trivial_answers: TrivialAnswers | None = None
    likelihood_arrays: LikelihoodArrays | None = None
    likelihood_scorer: LikelihoodScorer | None = None
    fields: tuple[str, ...] = ("answer",)
    check_answer: Callable[[str], str | None] | None = None
    check_task: Callable[[TaskSpec], None] | None = None
    uses_host_metric: bool = False
    bounded: bool = True
    scale: float = 100.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a metric's name is a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: kind is {self.kind!r}, not one of {', '.join(KINDS)}")
        generation = (self.host_scorer, self.token_scorer, self.answer_arrays, self.report, self.trivial_answers)
        likelihood = (self.likelihood_arrays, self.likelihood_scorer)
        if self.kind == GENERATION:
            if any(f is not None for f in likelihood):
                raise ValueError(f"metric {self.name}: a generation metric has no likelihood_arrays or "
                                 "likelihood_scorer")
            if self.host_scorer is None and (self.report is None or self.token_scorer is None):
                raise ValueError(f"metric {self.name}: a generation metric needs a host_scorer (the test splits are "
                                 "scored on decoded responses), or a report and a token_scorer")
        elif any(f is None for f in likelihood) or any(f is not None for f in generation):
            raise ValueError(f"metric {self.name}: a likelihood metric has likelihood_arrays and a likelihood_scorer, "
                             "and nothing of a generation metric")

    @property
    def generative(self) -> bool:
        return self.kind == GENERATION

    @property
    def scored_on_host(self) -> bool:
        """A generation metric without a token scorer: the search returns tokens from jit."""
        return self.generative and self.token_scorer is None

    def description(self, spec: TaskSpec) -> str:
        return self.name if self.describe is None else self.describe(spec)

    def scores(self, task: Task, data: TaskData, split: str, responses: list[str], tokenizer) -> dict[str, float]:
        """{score name: value} of decoded responses to every row of `data`."""
        if self.report is not None:
            return self.report(task, data, split, responses, tokenizer)
        rows = [self.host_scorer(task, data, split, row, response, tokenizer) for row, response in enumerate(responses)]
        return {self.name: self.scale * float(np.mean(rows))}


_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Makes `metric` what tasks naming `metric.name` are scored by. A name already
    registered is refused unless `replace`. Returns the metric."""
    if not isinstance(metric, Metric):
        raise TypeError(f"register_metric takes a Metric, got {type(metric).__name__}")
    if metric.name in _REGISTRY and not replace:
        raise ValueError(f"metric {metric.name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[metric.name] = metric
    return metric


def unregister_metric(name: str) -> Metric:
    """Removes a registered metric; returns it (to register again later)."""
    metric = get_metric(name)
    del _REGISTRY[name]
    return metric


def get_metric(name: str) -> Metric:
    """The metric registered as `name` (an lm-eval alias is not looked up: `resolve_metric_name`
    first); an unknown name is a ValueError listing the known ones, and saying what an lm-eval
    name stands for."""
    metric = _REGISTRY.get(name) if isinstance(name, str) else None
    if metric is None:
        raise ValueError(_unknown_metric(name))
    return metric


def metric_names() -> tuple[str, ...]:
    """The registered metrics' names, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


# lm-eval's metric name -> the registered metric that scores the same thing.
LM_EVAL_ALIASES: dict[str, str] = {
    "acc": "multiple_choice",  # lm-eval's multiple_choice acc: the highest summed log-probability
    "acc_norm": "multiple_choice_norm",  # the same, divided by the choice's length
    "exact_match": "exact",
    "rougeL": "rouge_l",  # ROUGE-L F (lm-eval's summarisation tasks, over words; ours over tokens or MeCab words)
}
# lm-eval's other metrics (its registry, 0.4), none of which jaxmerge computes -> what comes nearest.
_LM_EVAL_PERPLEXITY = "the nearest is 'loglik' (mean log-probability per token of the reference; higher is better)"
_LM_EVAL_CHOICE = "the nearest are 'multiple_choice' (acc) and 'multiple_choice_norm' (acc_norm)"
_LM_EVAL_OTHER = ("score it with metric: host and a host_metric function, or name the lm-eval task itself in "
                  "tasks (its own metric then scores it)")
LM_EVAL_UNMAPPED: dict[str, str] = {
    **dict.fromkeys(("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"), _LM_EVAL_PERPLEXITY),
    **dict.fromkeys(("acc_mutual_info", "acc_bytes", "acc_all", "likelihood", "brier_score", "mcc"), _LM_EVAL_CHOICE),
    **dict.fromkeys(("f1", "bleu", "chrf", "chrf++", "ter", "rouge1", "rouge2", "rougeLsum", "bypass"), _LM_EVAL_OTHER),
}


def resolve_metric_name(name: str) -> str:
    """The registered metric's name that `name` means: `name` itself when it is registered (a
    registered name wins over an alias), else the metric an lm-eval name stands for
    (`LM_EVAL_ALIASES`, e.g. "acc" -> "multiple_choice"), given bare or as lm-eval writes a
    metric with no filter ("acc,none"). Anything else is a ValueError: the unknown metric,
    the known ones, and for an lm-eval name what it stands for or what comes nearest."""
    if isinstance(name, str) and name in _REGISTRY:
        return name
    metric, filter_name = _lm_eval_parts(name)
    target = LM_EVAL_ALIASES.get(metric)
    if filter_name in (None, "none") and target in _REGISTRY:
        return target
    raise ValueError(_unknown_metric(name))


def _lm_eval_parts(name) -> tuple[str | None, str | None]:
    """("acc", "none") from lm-eval's "acc,none"; (name, None) without a filter; (None, None) for a non-string."""
    if not isinstance(name, str):
        return None, None
    metric, comma, filter_name = name.partition(",")
    return metric.strip(), filter_name.strip() if comma else None


def _unknown_metric(name) -> str:
    """The unknown-metric error: the known names, and what an lm-eval name means here."""
    known = f"unknown metric {name!r} (known: {', '.join(_REGISTRY)})"
    metric, filter_name = _lm_eval_parts(name)
    target = LM_EVAL_ALIASES.get(metric)
    if target is not None and filter_name not in (None, "none"):
        number = "; 'number' scores a response's last number" if target == "exact" else ""
        return (f"{known}; {name!r} is lm-eval's {metric!r} after its filter {filter_name!r}, which jaxmerge does "
                f"not apply: write {metric!r} (jaxmerge's {target!r}{number}), or name the lm-eval task itself in "
                "tasks")
    if target is not None and target not in _REGISTRY:
        return f"{known}; {name!r} is lm-eval's name for {target!r}, which is not registered"
    if target is not None:
        return (f"{known}; {name!r} is lm-eval's name for {target!r}: name that, or look the name up with "
                "resolve_metric_name first")
    if metric in LM_EVAL_UNMAPPED:
        return f"{known}; {metric!r} is an lm-eval metric jaxmerge does not compute: {LM_EVAL_UNMAPPED[metric]}"
    return known


# ----------------------------------------------------------------------------- helpers for metrics


def reference_arrays(answers: tuple[str, ...], tokenizer, length: int) -> dict[str, np.ndarray]:
    """{"references": [B, length]}: each answer's ids, then EOS, then padding (AnswerArrays)."""
    return {"references": encode_references(tokenizer, answers, length)}


def commonest_answers(fitness: TaskData, test: TaskData) -> dict[str, list[str]]:
    """The commonest fitness answer to each test question (the same prompt text; the
    commonest overall otherwise): a baseline that needs no model (TrivialAnswers)."""
    by_prompt: dict[str, list[str]] = {}
    for prompt, answer in zip(fitness.prompts, fitness.answers, strict=True):
        by_prompt.setdefault(prompt, []).append(answer)

    def commonest(options):
        return max(sorted(set(options)), key=options.count)

    overall = commonest(list(fitness.answers))
    return {"commonest fitness answer to each question": [commonest(by_prompt[p]) if p in by_prompt else overall
                                                          for p in test.prompts]}


def _language(spec: TaskSpec) -> str:
    return f", in {spec.language}{' (strict)' if spec.language_strict else ''}" if spec.language else ""


def _percent(values) -> float:
    return 100.0 * float(np.mean(values))


# ----------------------------------------------------------------------------- built-in metrics


def _exact_row(task, data, split, row, response, tokenizer) -> float:
    return float(text_metrics.exact_match(response, data.answers[row]))


def _exact_tokens(tokens, batch, spec, table, eos_ids):
    return exact_match_scores(tokens, batch["references"], eos_ids)


def _number_row(task, data, split, row, response, tokenizer) -> float:
    answer = float(text_metrics.extract_number(data.answers[row]))
    return float(text_metrics.number_correct(response, answer, task.spec.language, task.spec.language_strict))


def _number_tokens(tokens, batch, spec, table, eos_ids):
    return number_scores(tokens, batch["answers"], table, eos_ids, spec.language, spec.language_strict)


def _number_arrays(answers, tokenizer, length) -> dict[str, np.ndarray]:
    return {"answers": np.asarray([int(round(text_metrics.extract_number(a))) for a in answers], np.int32)}


def _number_problem(answer: str) -> str | None:
    return "is not a number" if text_metrics.extract_number(answer) is None else None


def _number_baselines(fitness, test) -> dict[str, list[str]]:
    def numbers(prompt):
        return text_metrics.NUMBER_PATTERN.findall(prompt) or [""]
    return {**commonest_answers(fitness, test), "copy the first number": [numbers(p)[0] for p in test.prompts],
            "copy the last number": [numbers(p)[-1] for p in test.prompts]}


def _japanese(spec: TaskSpec) -> bool:
    return spec.language is not None and text_metrics.resolve_language(spec.language) == "japanese"


def _rouge_l_tokens(tokens, batch, spec, table, eos_ids):
    return rouge_l_scores(tokens, batch["references"], eos_ids, table, spec.language, spec.language_strict)


def _rouge_l_report(task, data, split, responses, tokenizer) -> dict[str, float]:
    """ROUGE-L over MeCab words for Japanese (the paper's), over tokens otherwise; and exact match."""
    language, strict = task.spec.language, task.spec.language_strict
    exact = _percent([text_metrics.exact_match(r, a) for r, a in zip(responses, data.answers, strict=True)])
    if _japanese(task.spec):
        return {"rouge_l": text_metrics.rouge_l_ja(responses, list(data.answers), strict=strict), "exact": exact}

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    def one(response, answer):
        if language and text_metrics.is_language(answer, language, strict=strict) and \
                not text_metrics.is_language(response, language, strict=strict):
            return 0.0
        return text_metrics.rouge_l_tokens(ids(response), ids(answer))
    return {"rouge_l": _percent([one(r, a) for r, a in zip(responses, data.answers, strict=True)]), "exact": exact}


def _rouge_l_check(spec: TaskSpec) -> None:
    if _japanese(spec):
        text_metrics.check_japanese_packages()


def _host_row(task, data, split, row, response, tokenizer) -> float:
    return host_score(task, data, split, row, response)


def _choice_arrays(spec, data, tokenizer) -> dict[str, np.ndarray]:
    """ids, mask [B, K, T], targets [B, K, W] (`loglik.continuation_tail`), valid, lengths [B, K], label [B]."""
    arrays = loglik.multiple_choice_batch(tokenizer, list(data.prompts), [list(c) for c in data.choices],
                                          list(data.labels), spec.delimiter)
    B, K = arrays["valid"].shape
    arrays["targets"] = loglik.continuation_tail(arrays["targets"])  # the head only where logits are read
    return {k: v.reshape(B, K, -1) if k in ("ids", "mask", "targets") else v for k, v in arrays.items()}


def _choice_accuracy(model, batch):
    return loglik.multiple_choice_scores(model, batch, normalize=False)


def _normalized_choice_accuracy(model, batch):
    return loglik.multiple_choice_scores(model, batch, normalize=True)


def _reference_continuations(spec, data, tokenizer) -> dict[str, np.ndarray]:
    """ids, mask [B, T], targets [B, W] (`loglik.continuation_tail`): each prompt followed by the delimiter
    and its answer."""
    encoded = loglik.encode_continuations(tokenizer, list(data.prompts), [spec.delimiter + a for a in data.answers])
    return {"ids": encoded.ids, "mask": encoded.mask, "targets": loglik.continuation_tail(encoded.targets)}


register_metric(Metric(
    "exact", GENERATION, describe=lambda spec: "exact match of the answer tokens", host_scorer=_exact_row,
    token_scorer=_exact_tokens, answer_arrays=reference_arrays, stops_at_answer=True,
    trivial_answers=commonest_answers))
register_metric(Metric(
    "number", GENERATION, describe=lambda spec: f"last number{_language(spec)}", host_scorer=_number_row,
    token_scorer=_number_tokens, answer_arrays=_number_arrays, check_answer=_number_problem,
    trivial_answers=_number_baselines))
register_metric(Metric(
    "rouge_l", GENERATION, describe=lambda spec: f"token ROUGE-L F{_language(spec)}", token_scorer=_rouge_l_tokens,
    answer_arrays=reference_arrays, report=_rouge_l_report, stops_at_answer=True, trivial_answers=commonest_answers,
    check_task=_rouge_l_check))
register_metric(Metric(
    "host", GENERATION, describe=lambda spec: "host metric on decoded responses", host_scorer=_host_row,
    uses_host_metric=True, bounded=False))
register_metric(Metric(
    "multiple_choice", LIKELIHOOD, describe=lambda spec: "multiple choice by log-likelihood (acc)",
    likelihood_arrays=_choice_arrays, likelihood_scorer=_choice_accuracy, fields=("answer", "choices")))
register_metric(Metric(
    "multiple_choice_norm", LIKELIHOOD,
    describe=lambda spec: "multiple choice by length-normalised log-likelihood (acc_norm)",
    likelihood_arrays=_choice_arrays, likelihood_scorer=_normalized_choice_accuracy, fields=("answer", "choices")))
register_metric(Metric(
    "loglik", LIKELIHOOD, describe=lambda spec: "mean log-likelihood of the reference",
    likelihood_arrays=_reference_continuations, likelihood_scorer=loglik.reference_scores, bounded=False, scale=1.0))
