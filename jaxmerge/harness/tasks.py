"""lm-eval tasks as jaxmerge tasks: the search's fitness from lm-eval's own requests, the test
scores from lm-eval itself (through the `jaxmerge` backend), so they are the numbers a user
would publish.

A task's documents are lm-eval's evaluation documents (its test split, else its validation
split), optionally shuffled, then sliced: the first `fitness_size` feed the search (the search's
validation rows are the last of them, as for any task), the rest, up to `test_size`, are the test
set. The fitness split is rendered by lm-eval (`doc_to_text`, few-shot examples, the chat template)
into prompts and continuations, and scored as jaxmerge scores any task: multiple choice by
log-likelihood in jit (acc or acc_norm), log-likelihood tasks by the mean log-likelihood in jit,
generation by the task's own stop sequences, filters and metric on the host (`TaskMetric`). The
test set is scored by `lm_eval.simple_evaluate` on exactly those documents.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
from lm_eval import simple_evaluate
from lm_eval.filters import build_filter_ensemble
from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text
from lm_eval.tasks import TaskManager, get_task_dict

from jaxmerge.eval.tasks import TaskData
from jaxmerge.harness.backend import JaxmergeLM

logger = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
PERCENT_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc")  # reported x100, as jaxmerge's tables are


@dataclasses.dataclass(frozen=True)
class LmEvalTask:
    """An lm-eval task in an evolve run. `metric` is lm-eval's key ("acc,none": metric, filter),
    as mergekit-evolve's task entries name it."""

    name: str
    metric: str = "acc,none"
    weight: float = 1.0
    include_path: str | None = None  # custom task YAMLs (lm-eval's --include_path)
    num_fewshot: int | None = None
    apply_chat_template: bool | None = None  # None: where the tokenizer has a chat template
    fewshot_as_multiturn: bool | None = None  # None: as apply_chat_template
    fitness_size: int | None = None  # None: half the documents, at most 256
    test_size: int | None = None  # None: every document after the fitness split
    shuffle_seed: int | None = None  # documents shuffled before slicing (mergekit-evolve's shuffle)


@dataclasses.dataclass(frozen=True)
class PreparedLmEvalTask:
    """A task's fitness split as jaxmerge data, and which documents its test score reads."""

    task: LmEvalTask
    output_type: str
    fitness: TaskData
    test_ids: tuple[int, ...]
    jaxmerge_metric: str  # what scores the fitness split in jit
    max_new_tokens: int
    apply_chat_template: bool
    fewshot_as_multiturn: bool
    host_metric: TaskMetric | None = None  # a generate_until task's own metric, on the search's responses

    @property
    def metric(self) -> str:
        return self.task.metric.partition(",")[0]


@functools.cache
def task_manager(include_path: str | None, name: str) -> TaskManager:
    """lm-eval's task index: of `include_path` alone where it holds the task (instant), else with
    lm-eval's own thousands of tasks (seconds to index, so kept)."""
    if include_path is not None:
        custom = TaskManager(include_path=include_path, include_defaults=False)
        if name in custom.all_tasks:
            return custom
    return _full_task_manager(include_path)


@functools.cache
def _full_task_manager(include_path: str | None) -> TaskManager:
    return TaskManager(include_path=include_path)


def load_task(task: LmEvalTask):
    """lm-eval's task object; a one-line error naming the task if lm-eval does not know it."""
    manager = task_manager(task.include_path, task.name)
    if task.name not in manager.all_tasks:
        where = f" (nor in include_path {task.include_path})" if task.include_path else " (give include_path for " \
            "a custom task YAML)"
        raise ValueError(f"lm-eval task {task.name!r} is not one lm-eval knows{where}")
    found = get_task_dict([task.name], manager)
    if len(found) != 1 or not hasattr(next(iter(found.values())), "build_all_requests"):
        raise ValueError(f"lm-eval task {task.name!r} is a group of tasks: name each of its tasks instead")
    return next(iter(found.values()))


def prepare(task: LmEvalTask, tokenizer) -> PreparedLmEvalTask:
    """The fitness split rendered by lm-eval, and the test documents."""
    lm_task = load_task(task)
    if task.num_fewshot is not None:
        lm_task.set_config(key="num_fewshot", value=task.num_fewshot)
    lm_task.set_fewshot_seed(seed=FEWSHOT_SEED)
    documents = len(lm_task.eval_docs)
    order = np.arange(documents)
    if task.shuffle_seed is not None:
        order = np.random.default_rng(task.shuffle_seed).permutation(documents)
    fitness_size = task.fitness_size if task.fitness_size is not None else min(256, documents // 2)
    if not 0 < fitness_size < documents:
        raise ValueError(f"lm-eval task {task.name!r}: fitness_size {fitness_size} of its {documents} documents "
                         "leaves no fitness or no test documents")
    test = order[fitness_size:] if task.test_size is None else order[fitness_size:fitness_size + task.test_size]
    chat = bool(getattr(tokenizer, "chat_template", None)) if task.apply_chat_template is None \
        else task.apply_chat_template
    multiturn = chat if task.fewshot_as_multiturn is None else task.fewshot_as_multiturn
    lm_task.build_all_requests(samples=[int(i) for i in order[:fitness_size]], apply_chat_template=chat,
                               fewshot_as_multiturn=multiturn, chat_template=_chat_template(tokenizer),
                               tokenizer_name=str(getattr(tokenizer, "name_or_path", "")))
    output_type = lm_task.OUTPUT_TYPE
    fitness, metric, max_new_tokens = _as_task_data(task, lm_task, output_type)
    host_metric = TaskMetric(task, lm_task, lm_task.instances) if metric == "host" else None
    return PreparedLmEvalTask(task, output_type, fitness, tuple(int(i) for i in test), metric, max_new_tokens,
                              chat, multiturn, host_metric)


def _chat_template(tokenizer):
    def apply(chat_history, add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt)
    return apply


def _as_task_data(task: LmEvalTask, lm_task, output_type: str) -> tuple[TaskData, str, int]:
    """(fitness data, jaxmerge metric, max new tokens) from the task's built requests."""
    by_doc: dict[int, list] = {}
    for instance in lm_task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    docs = [sorted(by_doc[d], key=lambda i: i.idx) for d in by_doc]
    metric = task.metric.partition(",")[0]
    if output_type == "multiple_choice":
        if metric not in ("acc", "acc_norm"):
            raise ValueError(f"lm-eval task {task.name!r}: metric {task.metric!r} of a multiple_choice task; jaxmerge "
                             "searches on acc or acc_norm (acc,none / acc_norm,none)")
        prompts = tuple(group[0].args[0] for group in docs)
        choices = tuple(tuple(i.args[1] for i in group) for group in docs)
        labels = tuple(_label(lm_task, group[0].doc, task) for group in docs)
        answers = tuple(c[label] for c, label in zip(choices, labels, strict=True))
        name = "multiple_choice" if metric == "acc" else "multiple_choice_norm"
        return TaskData(prompts, answers, choices, labels), name, 0
    if output_type == "generate_until":
        prompts = tuple(group[0].args[0] for group in docs)
        answers = tuple(str(lm_task.doc_to_target(group[0].doc)) for group in docs)
        settings = docs[0][0].args[1]
        return TaskData(prompts, answers), "host", int(settings.get("max_gen_toks", 256))
    if output_type in ("loglikelihood", "loglikelihood_rolling"):
        prompts = tuple(group[0].args[0] if output_type == "loglikelihood" else "" for group in docs)
        answers = tuple(group[0].args[-1] if output_type == "loglikelihood" else group[0].args[0] for group in docs)
        return TaskData(prompts, answers), "loglik", 0
    raise ValueError(f"lm-eval task {task.name!r}: output type {output_type!r} is not one jaxmerge searches on")


class TaskMetric:
    """A generate_until task's own metric as a jaxmerge host metric, `(prompt, response, reference)
    -> float`: the response cut at the task's stop sequences, through the task's filters (those
    of the metric's filter key), scored by the task's `process_results`, as lm-eval scores it."""

    def __init__(self, task: LmEvalTask, lm_task, instances):
        self.name, self.metric = task.name, task.metric
        metric, _, filter_name = task.metric.partition(",")
        self.metric_name = metric
        self.lm_task = lm_task
        self.docs = {instance.args[0]: instance.doc for instance in instances}
        self.until = list(handle_stop_sequences(instances[0].args[1].get("until"), eos=None))
        pipelines = lm_task.config.filter_list or [{"name": "none", "filter": [{"function": "take_first"}]}]
        found = [p for p in pipelines if p["name"] == (filter_name or "none")]
        if not found:
            raise ValueError(f"lm-eval task {task.name!r} has no filter {filter_name!r} (metric {task.metric!r}; "
                             f"its filters: {', '.join(p['name'] for p in pipelines)})")
        self.filters = build_filter_ensemble(found[0]["name"], [
            [f["function"], {k: v for k, v in f.items() if k != "function"}] for f in found[0]["filter"]]).filters

    def __repr__(self) -> str:  # what run.json records of it
        return f"lm-eval {self.name} {self.metric}"

    def __call__(self, prompt: str, response: str, reference: str) -> float:
        doc = self.docs[prompt]
        responses = [[postprocess_generated_text(response, self.until, None)]]
        for make in self.filters:
            responses = make().apply(responses, [doc])
        scores = self.lm_task.process_results(doc, [list(responses)[0]])
        if self.metric_name not in scores:
            raise ValueError(f"lm-eval task {self.name!r} reports no metric {self.metric_name!r} per document "
                             f"(it reports {', '.join(scores)})")
        return float(scores[self.metric_name])


def _label(lm_task, doc, task: LmEvalTask) -> int:
    target = lm_task.doc_to_target(doc)
    if isinstance(target, (int, np.integer)):
        return int(target)
    choices = lm_task.doc_to_choice(doc)
    if target in choices:
        return choices.index(target)
    raise ValueError(f"lm-eval task {task.name!r}: target {target!r} is not one of its choices {choices}")


def lm_eval_scores(model, tokenizer, tasks: list[PreparedLmEvalTask], batch_size: int = 16) -> dict[str, float]:
    """{task name: its metric on its test documents}, from lm-eval through the jaxmerge backend;
    acc-like metrics in percent."""
    if not tasks:
        return {}
    lm = JaxmergeLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    scores = {}
    for prepared in tasks:
        task = prepared.task
        results = simple_evaluate(model=lm, tasks=[task.name], task_manager=task_manager(task.include_path, task.name),
                                  samples={task.name: list(prepared.test_ids)}, num_fewshot=task.num_fewshot,
                                  apply_chat_template=prepared.apply_chat_template,
                                  fewshot_as_multiturn=prepared.fewshot_as_multiturn, bootstrap_iters=0,
                                  log_samples=False, fewshot_random_seed=FEWSHOT_SEED)
        value = results["results"][task.name].get(task.metric)
        if value is None:
            raise ValueError(f"lm-eval task {task.name!r} reports no metric {task.metric!r} (it reports "
                             f"{', '.join(k for k in results['results'][task.name] if ',' in k)})")
        scores[task.name] = 100.0 * value if prepared.metric in PERCENT_METRICS else float(value)
    return scores
