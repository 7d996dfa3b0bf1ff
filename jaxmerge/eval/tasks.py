"""Tasks: what a merge is scored on, during the search (in jit) and on the test sets (once).

A `TaskSpec` names its data splits (files, or `TaskData` built in Python), how a row
becomes a prompt, and its metric: the name of a `Metric` of `jaxmerge.eval.metric_registry`
(exact, number, rouge_l, host, multiple_choice, multiple_choice_norm, loglik, and any
registered with `register_metric`). A `host` metric's function is called once on the first
row when the task is prepared, before any model loads (`jaxmerge.eval.host_metric`).

`Task` is a spec with its splits prepared (prompts rendered, images preprocessed).
`FitnessBatches` numbers several tasks into one weighted fitness for the search;
`evaluate` scores a model on the test splits; `table_checks` says, before a search, where a
task's language check rejects most responses or every source scores 0.

(Over 500 lines: a task's three uses, preparing its splits, the fitness in jit and the
test-set evaluation, read the same prepared arrays, and the checks read the evaluation's
responses; the metrics themselves live in `metric_registry`.)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import numbers
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmerge.eval import irt
from jaxmerge.eval import metrics as text_metrics
from jaxmerge.eval.data import DataSource, choice_label, column_label, data_dir, load_image, read_located, read_rows
from jaxmerge.eval.encoding import answer_length, encode_ids, encode_prompts
from jaxmerge.eval.host_metric import HostMetric, check_host_metric, resolve_host_metric
from jaxmerge.eval.metric_registry import Metric, get_metric, metric_names, resolve_metric_name
from jaxmerge.eval.prompts import PromptSpec, render
from jaxmerge.eval.token_metrics import TokenTable
from jaxmerge.generation import generate
from jaxmerge.models.interfaces import VisionLanguageModel
from jaxmerge.models.llava import anyres_feature_index


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """One split, ready to score: rendered prompts (image tokens expanded for a VLM), answers
    as text, and for multiple choice the choices and the right one's index. pixel_values:
    one image per prompt [B, C, H, W], or LLaVA-NeXT's [B, P, C, H, W] with image_sizes [B, 2].
    locations: where each row was read ("data.jsonl:3"), for errors; None for data built in Python."""
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    choices: tuple[tuple[str, ...], ...] | None = None
    labels: tuple[int, ...] | None = None
    pixel_values: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    locations: tuple[str, ...] | None = None

    def __post_init__(self):
        if len(self.prompts) != len(self.answers) or not self.prompts:
            raise ValueError(f"a split needs as many answers as prompts (and some): {len(self.prompts)} prompts, "
                             f"{len(self.answers)} answers")
        if self.locations is not None and len(self.locations) != len(self.prompts):
            raise ValueError(f"a split needs a location per row: {len(self.prompts)} rows, {len(self.locations)} "
                             "locations")

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices) -> TaskData:
        """The rows at `indices`, in that order."""
        indices = [int(i) for i in indices]

        def part(a):
            if a is None:
                return None
            return a[np.asarray(indices)] if isinstance(a, np.ndarray) else tuple(a[i] for i in indices)
        return TaskData(part(self.prompts), part(self.answers), part(self.choices), part(self.labels),
                        part(self.pixel_values), part(self.image_sizes), part(self.locations))

    def rows(self, begin: int, end: int) -> TaskData:
        return self.take(range(begin, min(end, len(self))))

    def where(self, row: int, split: str) -> str:
        """Row `row` as errors name it: its file and line, else the split and index."""
        return f"{self.locations[row]} ({split} split)" if self.locations else f"{split} row {row}"

    def fingerprint(self) -> str:
        """SHA-256 of the split's content (not where it was read): what run.json records of
        data built in Python."""
        digest = hashlib.sha256()
        for part in (self.prompts, self.answers, self.choices, self.labels):
            digest.update(repr(part).encode())
        for array in (self.pixel_values, self.image_sizes):
            digest.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


Split = DataSource | TaskData


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task: its splits, prompt and metric. `fitness` feeds the search (its last
    `validation_size` rows are the validation split unless `validation` is given); `test`
    is scored once, at the end. A task without `fitness` (or with weight 0) is reported,
    not optimised. columns: our field names (question, answer, choices, image) -> the data's."""
    name: str
    metric: str = "exact"
    fitness: Split | None = None
    validation: Split | None = None
    test: Split | None = None
    columns: tuple[tuple[str, str], ...] = ()
    prompt: PromptSpec = PromptSpec()
    few_shot_examples: DataSource | None = None  # default: the first rows of `fitness`, then left out of it
    language: str | None = None  # the response must be in it (number, rouge_l)
    # true: a response without letters fails the language check (the paper's MGSM-ja rule:
    # the answer must be written in the language); false: "42" is in no script and passes.
    language_strict: bool = False
    weight: float = 1.0
    max_new_tokens: int = 16
    minibatch: int | None = None  # fitness rows per generation (default: the search's)
    delimiter: str = " "  # between prompt and choice / reference (log-likelihood metrics)
    test_metrics: tuple[str, ...] = ()  # further generative metrics reported on the test split
    host_metric: HostMetric | str | None = None  # a callable, or "module:function" / "file.py:function"

    def __post_init__(self):
        try:
            # lm-eval's names (acc, acc_norm, exact_match, ...) stand for ours; the spec keeps ours
            object.__setattr__(self, "metric", resolve_metric_name(self.metric))
            metric = get_metric(self.metric)
        except ValueError as e:
            raise ValueError(f"task {self.name}: {e}") from None
        if metric.uses_host_metric != (self.host_metric is not None):
            with_host = " or ".join(repr(n) for n in metric_names() if get_metric(n).uses_host_metric)
            raise ValueError(f"task {self.name}: metric {with_host} goes with host_metric, and only it")
        if self.language is not None:
            text_metrics.resolve_language(self.language)
        if self.language_strict and self.language is None:
            raise ValueError(f"task {self.name}: language_strict is a rule of the language check; give the "
                             "task a language (e.g. language: japanese) or drop language_strict")
        further = [n for n in metric_names() if get_metric(n).generative and not get_metric(n).uses_host_metric]
        unknown = [m for m in self.test_metrics if m not in further]
        if unknown or (self.test_metrics and not self.generative):
            raise ValueError(f"task {self.name}: test_metrics are further generative metrics of a generative task "
                             f"({', '.join(further)}), got {list(self.test_metrics)}")
        if self.fitness is None and self.test is None:
            raise ValueError(f"task {self.name}: give a fitness split, a test split or both")
        for name in (self.metric, *self.test_metrics):
            if get_metric(name).check_task is not None:
                get_metric(name).check_task(self)

    @property
    def optimised(self) -> bool:
        return self.fitness is not None and self.weight > 0

    @property
    def scoring(self) -> Metric:
        """The registered `Metric` that `metric` names (looked up now: registrations count)."""
        return get_metric(self.metric)

    @property
    def generative(self) -> bool:
        return self.scoring.generative

    def required_fields(self) -> tuple[str, ...]:
        return self.scoring.fields


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A spec with its splits prepared."""
    spec: TaskSpec
    fitness: TaskData | None
    validation: TaskData | None
    test: TaskData | None
    host: HostMetric | None = None

    @property
    def name(self) -> str:
        return self.spec.name


# ----------------------------------------------------------------------------- preparing splits


def prepare_split(spec: TaskSpec, split: Split, tokenizer, processor=None, examples: Sequence[dict] = ()) -> TaskData:
    """Rows read, prompts rendered (with few-shot `examples`) and, for a VLM (`processor`:
    its transformers processor), each row's image preprocessed and its image tokens expanded."""
    if isinstance(split, TaskData):
        return split
    columns = dict(spec.columns)
    located = read_located(split, columns, required=spec.required_fields() + (("image",) if processor else ()))
    locations, rows = tuple(where for where, _ in located), [row for _, row in located]
    prompts = render(spec.prompt, rows, tokenizer, examples)
    choices = labels = None
    metric = spec.scoring
    if "choices" in metric.fields:
        choices = tuple(tuple(str(c) for c in row["choices"]) for row in rows)
        labels = tuple(choice_label(row, where, columns) for where, row in located)
        answers = tuple(c[label] for c, label in zip(choices, labels, strict=True))
    else:
        answers = tuple(str(row["answer"]) for row in rows)
    if metric.check_answer is not None:
        for where, answer in zip(locations, answers, strict=True):
            problem = metric.check_answer(answer)
            if problem is not None:
                raise ValueError(f"{where}: {column_label('answer', columns)}: answer {answer!r} of task "
                                 f"{spec.name} (metric {spec.metric!r}) {problem}")
    pixel_values = image_sizes = None
    if processor is not None:
        base_dir = data_dir(split)
        expanded, pixels, sizes = [], [], []
        for prompt, (where, row) in zip(prompts, located, strict=True):
            image = load_image(row["image"], base_dir, f"{where}: {column_label('image', columns)}")
            out = processor(images=image, text=prompt, return_tensors="np")
            expanded.append(processor.tokenizer.decode(out["input_ids"][0], skip_special_tokens=False))
            pixels.append(out["pixel_values"][0])
            if "image_sizes" in out:  # LLaVA-NeXT: [tiles, C, H, W] per image, tile counts differ
                sizes.append(out["image_sizes"][0])
        if sizes:
            tiles = max(len(p) for p in pixels)
            pixels = [np.pad(p, ((0, tiles - len(p)),) + ((0, 0),) * 3) for p in pixels]
        prompts, pixel_values = expanded, np.stack(pixels)
        image_sizes = np.stack(sizes) if sizes else None
    return TaskData(tuple(prompts), answers, choices, labels, pixel_values, image_sizes, locations)


def prepare_task(spec: TaskSpec, tokenizer, processor=None, validation_size: int = 0,
                 base_dir: Path | None = None) -> Task:
    """Every split of a task, prepared; the validation split (the last `validation_size`
    rows) cut off the fitness split's end when not given; a host metric resolved and called
    once (`check_host_metric`)."""
    examples: list[dict] = []
    skip = 0
    if spec.prompt.few_shot:
        if spec.few_shot_examples is not None:
            examples = read_rows(spec.few_shot_examples, dict(spec.columns), required=("answer",))
        elif isinstance(spec.fitness, DataSource):
            examples, skip = read_rows(spec.fitness, dict(spec.columns), required=("answer",)), spec.prompt.few_shot
        else:
            raise ValueError(f"task {spec.name}: few_shot needs few_shot_examples (or a fitness file to take them "
                             "from)")
        examples = examples[:spec.prompt.few_shot]

    def prepared(split):
        return None if split is None else prepare_split(spec, split, tokenizer, processor, examples)

    fitness, validation, test = prepared(spec.fitness), prepared(spec.validation), prepared(spec.test)
    if fitness is not None:
        fitness = fitness.rows(skip, len(fitness))
        if validation is None:
            if isinstance(validation_size, bool) or not isinstance(validation_size, numbers.Integral) \
                    or validation_size < 1:
                raise ValueError(f"task {spec.name}: validation_size is {validation_size!r}: the validation split is "
                                 "cut off the fitness split's end, so it needs 1 or more rows (or give the task a "
                                 "validation split)")
            if len(fitness) <= validation_size:
                raise ValueError(f"task {spec.name}: {len(fitness)} fitness rows, not more than the validation size "
                                 f"{validation_size}")
            split = len(fitness) - validation_size
            fitness, validation = fitness.rows(0, split), fitness.rows(split, len(fitness))
    host = None if spec.host_metric is None else resolve_host_metric(spec.host_metric, base_dir, spec.name)
    task = Task(spec, fitness, validation, test, host)
    check_host_metric(task)
    return task


# ----------------------------------------------------------------------------- fitness in jit


def _image_inputs(vlm: VisionLanguageModel, data: TaskData, rows: slice, ids: np.ndarray) -> dict:
    if data.pixel_values is None:
        return {}
    sizes = None if data.image_sizes is None else data.image_sizes[rows]
    images = vlm.image_inputs(data.pixel_values[rows], sizes)
    vlm.check_image_tokens(ids, images)
    return images


def likelihood_arrays(spec: TaskSpec, data: TaskData, tokenizer) -> dict[str, np.ndarray]:
    """A log-likelihood task's whole split as arrays of one shape (every minibatch cut from
    them compiles once), each with the items on its leading axis: multiple choice ids, mask,
    targets [B, K, W], valid, lengths [B, K], label [B]; loglik ids, mask [B, T], targets [B, W]
    (W: the continuations and the column before them, `loglik.continuation_tail`)."""
    return spec.scoring.likelihood_arrays(spec, data, tokenizer)


def likelihood_batch(arrays: dict[str, np.ndarray], rows: slice) -> dict[str, jax.Array]:
    """Rows of `likelihood_arrays` as the jitted scorers take them (choices flattened)."""
    batch = {k: v[rows] for k, v in arrays.items()}
    for k in ("ids", "mask", "targets"):
        if batch[k].ndim == 3:
            batch[k] = batch[k].reshape(-1, batch[k].shape[-1])
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _task_batch(task: Task, data: TaskData, rows: slice, tokenizer, vlm, prompt_length: int,
                answer_tokens: int) -> dict:
    """One generative task's arrays for the jitted fitness."""
    spec, part = task.spec, data.rows(rows.start, rows.stop)
    ids, mask = encode_prompts(tokenizer, part.prompts, prompt_length)
    batch = {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask), **_image_inputs(vlm, data, rows, ids)}
    if spec.scoring.answer_arrays is not None:
        arrays = spec.scoring.answer_arrays(part.answers, tokenizer, answer_tokens)
        batch.update({k: jnp.asarray(v) for k, v in arrays.items()})
    return batch


# A reduced fitness set's batch carries its item model (jaxmerge.eval.irt) as data: the
# chosen rows' indices in the whole split [k], every row's discrimination and difficulty [N],
# and the ability prior (mean, sd) [2].
IRT_KEYS = ("irt_items", "irt_discrimination", "irt_difficulty", "irt_prior")


@dataclasses.dataclass(eq=False)
class FitnessBatches:
    """The search's fitness over several tasks: each generation's minibatch holds `minibatch`
    rows of every optimised task (all of one shape: one compilation), and a candidate's
    fitness is the weighted mean of its task scores (mergekit-evolve's `tasks:` weights).
    Tasks whose metric has no token scorer (host metrics) return their generated tokens
    from jit and are scored in `host_fitness`."""
    tasks: list[Task]
    tokenizer: Any
    table: TokenTable
    minibatch: int
    vlm: VisionLanguageModel | None = None
    objectives: bool = False  # every task a score of its own ([..., M] in task order): a Pareto search
    # Guards: (task, least score): the fitness is the first task's score less guard_penalty
    # times each guard's shortfall below its least score (a constrained search).
    floors: tuple[tuple[str, float], ...] = ()
    guard_penalty: float = 10.0
    # Per-item scores ([..., I]: every task's rows in task order, each in [0, 1]) instead of one
    # fitness: what natural niches' resource sharing divides among the archive's members.
    items: bool = False

    def __post_init__(self):
        self.tasks = [t for t in self.tasks if t.spec.optimised]
        if not self.tasks:
            raise ValueError("no task has a fitness split with a positive weight: nothing to optimise")
        unbounded = [t.name for t in self.tasks if not t.spec.scoring.bounded]
        if self.items and unbounded:
            raise ValueError(f"per-item scores must lie in [0, 1], and the metric of task(s) {', '.join(unbounded)} "
                             "is unbounded (a log-likelihood): choose a bounded metric for them")
        self.eos = self.tokenizer.eos_token_id
        self.total_weight = sum(t.spec.weight for t in self.tasks)
        self.answer_tokens = {t.name: min(t.spec.max_new_tokens, answer_length(self.tokenizer, t.fitness.answers
                                                                               + t.validation.answers))
                              for t in self.tasks}
        self._split: dict = {}
        self.sizes = sizes = {t.name: min(t.spec.minibatch or self.minibatch, len(t.fitness)) for t in self.tasks}
        count = max(1, min(len(t.fitness) // sizes[t.name] for t in self.tasks))
        self.batches = [{t.name: self._batch(t, t.fitness, slice(b * sizes[t.name], (b + 1) * sizes[t.name]))
                         for t in self.tasks} for b in range(count)]
        self.validation = {t.name: self._batch(t, t.validation, slice(0, len(t.validation))) for t in self.tasks}
        self.uses_host = any(t.spec.scoring.scored_on_host for t in self.tasks)
        self._pad_feature_layouts()

    def _batch(self, task: Task, data: TaskData, rows: slice) -> dict:
        """Rows of a split, in the shape of every other minibatch of it: what depends on the
        whole split (likelihood arrays, the longest prompt) is computed once per split."""
        key = (task.name, id(data))
        if key not in self._split:
            self._split[key] = (max(map(len, encode_ids(self.tokenizer, data.prompts))) if task.spec.generative
                                else likelihood_arrays(task.spec, data, self.tokenizer))
        if not task.spec.generative:
            return likelihood_batch(self._split[key], rows)
        return _task_batch(task, data, rows, self.tokenizer, self.vlm, self._split[key], self.answer_tokens[task.name])

    def _pad_feature_layouts(self):
        """LLaVA-NeXT: each minibatch's feature layout padded to one length (the rows past a
        batch's image tokens are never read), so every batch runs one program."""
        for task in self.tasks:
            layouts = [b[task.name] for b in self.batches if "feature_index" in b[task.name]]
            if layouts:
                longest = max(len(b["feature_index"]) for b in layouts)
                for b in layouts:
                    b["feature_index"] = jnp.pad(b["feature_index"], (0, longest - len(b["feature_index"])))

    def new_tokens(self, task: Task) -> int:
        return self.answer_tokens[task.name] if task.spec.scoring.stops_at_answer else task.spec.max_new_tokens

    def score_task(self, task: Task, model, batch: dict) -> jax.Array:
        """A task's mean score on its part of a minibatch (host tasks: the generated tokens);
        on a reduced fitness set (`IRT_KEYS` in the batch), the p-IRT estimate of the mean
        over the whole fitness split."""
        rows = self.row_scores(task, model, batch)
        if task.spec.scoring.scored_on_host:
            return rows
        if IRT_KEYS[0] in batch:
            items = irt.ItemParameters(batch["irt_discrimination"], batch["irt_difficulty"])
            prior = batch["irt_prior"]  # [2]: mean, sd
            return irt.full_set_estimate(rows, batch["irt_items"], items, prior[0], prior[1])
        return jnp.mean(rows)

    def row_scores(self, task: Task, model, batch: dict) -> jax.Array:
        """[B]: each row's score (tasks scored on the host: the generated tokens [B, N])."""
        spec, metric = task.spec, task.spec.scoring
        if not metric.generative:
            return metric.likelihood_scorer(model, batch)
        images = {k: batch[k] for k in ("pixel_values", "feature_index") if k in batch}
        out = generate(model, batch["ids"], self.new_tokens(task), eos_token_id=self.eos,
                       attention_mask=batch["mask"], **images)
        responses = out[:, batch["ids"].shape[1]:]  # [B, new tokens]
        if metric.scored_on_host:
            return responses  # scored in host_fitness
        return metric.token_scorer(responses, batch, spec, self.table, jnp.asarray([self.eos]))

    def score(self, model, batch: dict):
        """The weighted fitness (or, with host tasks, every task's output for `host_fitness`)."""
        if self.items:
            parts = {t.name: self.row_scores(t, model, batch[t.name]) for t in self.tasks}
            return parts if self.uses_host else jnp.concatenate([parts[t.name] for t in self.tasks], axis=-1)
        parts = {t.name: self.score_task(t, model, batch[t.name]) for t in self.tasks}
        if self.uses_host:
            return parts
        return self.combine(parts, jnp)

    def combine(self, parts: dict, xp=np):
        """The fitness from each task's scores (arrays of one shape, e.g. [P]; `xp`: numpy or
        jax.numpy): their weighted mean; every task's score stacked on a last axis
        (`objectives`); or the first task's less the guards' shortfalls (`floors`)."""
        if self.objectives:
            return xp.stack([parts[t.name] for t in self.tasks], axis=-1)
        if self.floors:
            shortfall = sum(xp.maximum(0.0, floor - parts[name]) for name, floor in self.floors)
            return parts[self.tasks[0].name] - self.guard_penalty * shortfall
        return sum(t.spec.weight * parts[t.name] for t in self.tasks) / self.total_weight

    def reduced(self, chosen: dict[str, tuple[np.ndarray, irt.ItemParameters, tuple[float, float]]]) -> FitnessBatches:
        """The same fitness on each task's chosen fitness rows only ({task: (indices into the
        rows the batches cover, the fitted items, the ability prior)}), all of them every
        generation, each task's score the p-IRT estimate of its mean over the covered rows;
        validation unchanged."""
        tasks = [Task(dataclasses.replace(t.spec, minibatch=len(chosen[t.name][0])), t.fitness.take(chosen[t.name][0]),
                      t.validation, t.test, t.host) for t in self.tasks]
        reduced = FitnessBatches(tasks, self.tokenizer, self.table, self.minibatch, self.vlm, self.objectives,
                                 self.floors, self.guard_penalty)
        for task in reduced.tasks:
            rows, items, prior = chosen[task.name]
            reduced.batches[0][task.name].update(zip(IRT_KEYS, (jnp.asarray(rows, jnp.int32), items.discrimination,
                                                                items.difficulty, jnp.asarray(prior, jnp.float32)),
                                                      strict=True))
        return reduced

    def covered_rows(self) -> dict[str, int]:
        """{task: how many of its fitness rows the batches cover} (their rows 0..n-1, in order)."""
        return {t.name: len(self.batches) * self.sizes[t.name] for t in self.tasks}

    def validation_scores(self, model) -> dict[str, float]:
        """{task: score on its validation split} of one model (not tasks scored on the host)."""
        return {t.name: float(self.score_task(t, model, self.validation[t.name])) for t in self.tasks
                if not t.spec.scoring.scored_on_host}

    def host_fitness(self, outputs: dict, batch_index: int | None) -> np.ndarray:
        """[P] fitness ([P, M] with `objectives`, [P, I] with `items`) from the population's
        outputs: metrics without a token scorer on decoded responses."""
        parts = {}
        for task in self.tasks:
            value = outputs[task.name]  # [P] scores ([P, B] with items), or [P, B, N] tokens
            metric = task.spec.scoring
            if metric.scored_on_host:
                split, data = ("validation", task.validation) if batch_index is None else ("fitness", task.fitness)
                begin = 0 if batch_index is None else batch_index * value.shape[1]
                rows = np.array([[metric.host_scorer(task, data, split, begin + i, response, self.tokenizer)
                                  for i, response in
                                  enumerate(decode_responses(self.tokenizer, tokens)[:len(data) - begin])]
                                 for tokens in value])  # [P, B]
                value = rows if self.items else rows.mean(axis=1)
            parts[task.name] = np.asarray(value, np.float64)
        if self.items:
            return np.concatenate([parts[t.name] for t in self.tasks], axis=-1).astype(np.float32)
        return np.asarray(self.combine(parts), np.float32)

    def describe(self) -> str:
        if self.objectives:
            return "objectives: " + ", ".join(f"{t.name} ({describe_metric(t.spec)})" for t in self.tasks)
        if self.floors:
            first = self.tasks[0]
            return (f"{first.name} ({describe_metric(first.spec)}) less {self.guard_penalty:g} x each shortfall of "
                    + ", ".join(f"{name} below {floor:.3f}" for name, floor in self.floors))
        return " + ".join(f"{t.spec.weight:g} x {t.name} ({describe_metric(t.spec)})" for t in self.tasks)


def describe_metric(spec: TaskSpec) -> str:
    return spec.scoring.description(spec)


# ----------------------------------------------------------------------------- scoring on the test sets


def decode_responses(tokenizer, rows) -> list[str]:
    """Generated ids [B, N] as text, cut at the first EOS, without special tokens."""
    texts = []
    for row in np.asarray(rows).tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def generate_texts(model, tokenizer, data: TaskData, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy responses to every prompt of a split (a VLM sees each prompt's image)."""
    responses = []
    ids, mask = encode_prompts(tokenizer, data.prompts)
    chunks = [slice(begin, begin + batch_size) for begin in range(0, len(data), batch_size)]
    layouts = [None] * len(chunks)
    if data.image_sizes is not None:  # LLaVA-NeXT: every chunk's feature layout padded to one length (one compile)
        layouts = [anyres_feature_index(model.config, data.image_sizes[c], data.pixel_values.shape[1]) for c in chunks]
        longest = max(len(f) for f in layouts)
        layouts = [np.pad(f, (0, longest - len(f))) for f in layouts]
    for chunk, layout in zip(chunks, layouts, strict=True):
        images = None if data.pixel_values is None else data.pixel_values[chunk]
        out = generate(model, ids[chunk], max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       attention_mask=mask[chunk], pad_token_id=tokenizer.pad_token_id or 0,
                       pixel_values=images, feature_index=layout)
        responses += decode_responses(tokenizer, out[:, ids.shape[1]:])
    return responses


@functools.partial(jax.jit, static_argnames=("graphdef", "scorer"))
def _likelihood_scores(graphdef, state, batch, scorer):
    return scorer(nnx.merge(graphdef, state), batch)


def likelihood_scores(model, tokenizer, spec: TaskSpec, data: TaskData, batch_size: int = 32) -> np.ndarray:
    """[N] per-row scores of a log-likelihood task (1/0 correct, or mean log-probability),
    in equal-sized chunks (the last one padded with the first rows): one compilation per task."""
    if isinstance(model, VisionLanguageModel):
        raise ValueError(f"task {spec.name}: log-likelihood metrics are for language models; score a VLM by generation")
    graphdef, state = nnx.split(model)
    size = min(batch_size, len(data))
    arrays = likelihood_arrays(spec, data, tokenizer)
    padded = -(-len(data) // size) * size
    arrays = {k: np.concatenate([v, v[:padded - len(data)]]) for k, v in arrays.items()}
    scorer = spec.scoring.likelihood_scorer
    scores = [np.asarray(_likelihood_scores(graphdef, state, likelihood_batch(arrays, slice(b, b + size)),
                                            scorer=scorer)) for b in range(0, padded, size)]
    return np.concatenate(scores)[:len(data)]


def response_scores(task: Task, data: TaskData, responses: list[str], tokenizer,
                    split: str = "test") -> dict[str, float]:
    """{score name: value} of decoded responses to `data` (the `split` split), x 100 (the
    metric's `scale`): the task's name for its one metric's one score, else `<name>_<score>`
    (test_metrics add metrics; ROUGE-L also reports exact match)."""
    spec = task.spec
    metrics = (*spec.test_metrics, spec.metric)
    scores: dict[str, float] = {}
    for metric in metrics:
        values = get_metric(metric).scores(task, data, split, responses, tokenizer)
        for name, value in values.items():
            scores.setdefault(spec.name if len(metrics) == 1 and len(values) == 1 else f"{spec.name}_{name}", value)
    return scores


def evaluate(model, tokenizer, tasks: Sequence[Task], batch_size: int = 64) -> tuple[dict, dict]:
    """({score name: score}, {task: first responses}) of one model on every test split."""
    scores, samples, _ = evaluate_with_checks(model, tokenizer, tasks, batch_size)
    return scores, samples


def evaluate_with_checks(model, tokenizer, tasks: Sequence[Task], batch_size: int = 64) -> tuple[dict, dict, dict]:
    """`evaluate`'s scores and samples, and {task: `language_rejections`} for every generative
    test split of a task with a language, from the same responses (nothing generated twice)."""
    scores, samples, checks = {}, {}, {}
    for task in tasks:
        if task.test is None:
            continue
        if task.spec.generative:
            responses = generate_texts(model, tokenizer, task.test, task.spec.max_new_tokens, batch_size)
            scores.update(response_scores(task, task.test, responses, tokenizer))
            samples[task.name] = responses[:5]
            rejections = language_rejections(task, task.test, responses, tokenizer)
            if rejections is not None:
                checks[task.name] = rejections
        else:
            values = likelihood_scores(model, tokenizer, task.spec, task.test)
            scores[task.name] = task.spec.scoring.scale * float(np.mean(values))
    return scores, samples, checks


def trivial_rows(task: Task, tokenizer) -> list[dict]:
    """Answers that need no model (the metric's `trivial_answers`: e.g. the commonest fitness
    answer to each question, and for number tasks the first / last number of the prompt),
    scored as a model's responses are, language check included (a bare number passes it),
    with their `language_rejections` as a model's row has them ("language_checks"). On a
    `language_strict` task too a bare guess passes: a copied "7" stands for 7 written in the
    language, so the rows stay what a model-free answer could reach (as the paper's toy tables
    count them), not 0 by construction."""
    metric = task.spec.scoring
    if task.fitness is None or task.test is None or metric.trivial_answers is None:
        return []
    if task.spec.language_strict:
        task = Task(dataclasses.replace(task.spec, language_strict=False), task.fitness, task.validation, task.test,
                    task.host)
    rows = []
    for name, values in metric.trivial_answers(task.fitness, task.test).items():
        rejections = language_rejections(task, task.test, values, tokenizer)
        rows.append({"model": name, "kind": "trivial", "scores": response_scores(task, task.test, values, tokenizer),
                     **({"language_checks": {task.name: rejections}} if rejections is not None else {})})
    return rows


# ----------------------------------------------------------------------------- checks before the search
# A task can be silently unscorable: a language check that rejects what the models answer, a
# metric every source scores 0 on. These say so, as plain data, for the runner to log and record.


def _row_scores(task: Task, data: TaskData, responses: Sequence[str], tokenizer, split: str) -> list[float]:
    """Each response's score by the task's metric (a metric without a per-row scorer: its
    report on that row alone, its own score name or else its first)."""
    metric = task.spec.scoring
    if metric.host_scorer is not None:
        return [float(metric.host_scorer(task, data, split, row, response, tokenizer))
                for row, response in enumerate(responses)]
    scores = []
    for row, response in enumerate(responses):
        values = metric.scores(task, data.take([row]), split, [response], tokenizer)
        scores.append(float(values.get(metric.name, next(iter(values.values())))))
    return scores


def language_rejections(task: Task, data: TaskData, responses: Sequence[str], tokenizer,
                        split: str = "test") -> dict | None:
    """What the task's language check did to a model's responses to `data` (one per row):
    {"language", "strict" (`language_strict`), "responses", "scorable": responses that score
    above 0 with the check dropped (a right number, a ROUGE-L overlap), "rejected": of those,
    the ones that fail the check (`metrics.is_language`: more than half their letters outside
    the script, or, strict, no letters at all) and, for a metric
    that scores rows one by one (`host_scorer`: number), lose points to it}. A metric scored
    as a whole (ROUGE-L's report) is not scored again row by row with the check (Japanese
    ROUGE-L's bootstrap would take a second a row or more): each scorable response that fails
    the check counts, also one ROUGE-L spares as its reference is not in the language either.
    None for a task without a language or that generates nothing."""
    spec = task.spec
    if spec.language is None or not spec.generative:
        return None
    if len(responses) != len(data):
        raise ValueError(f"task {spec.name}: {len(responses)} responses to {len(data)} {split} rows")
    unchecked = Task(dataclasses.replace(spec, language=None, language_strict=False), task.fitness, task.validation,
                     task.test, task.host)
    free = _row_scores(unchecked, data, responses, tokenizer, split)
    scorable = [row for row, score in enumerate(free) if score > 0]
    failing = [row for row in scorable
               if not text_metrics.is_language(responses[row], spec.language, strict=spec.language_strict)]
    if spec.scoring.host_scorer is not None:
        checked = _row_scores(task, data.take(failing), [responses[row] for row in failing], tokenizer, split) \
            if failing else []
        failing = [row for row, score in zip(failing, checked, strict=True) if score < free[row]]
    return {"language": spec.language, "strict": spec.language_strict, "responses": len(responses),
            "scorable": len(scorable), "rejected": len(failing)}


def language_check_warnings(model: str, rejections: dict[str, dict], most: float = 0.5) -> list[str]:
    """One message per task whose language check rejected more than `most` of `model`'s
    otherwise scoring responses ({task: `language_rejections`})."""
    messages = []
    for name, counts in rejections.items():
        if counts["scorable"] and counts["rejected"] > most * counts["scorable"]:
            strict = counts.get("strict", False)  # rows recorded before language_strict have no "strict"
            rule = "language_strict: one without letters fails" if strict else "one without letters passes"
            messages.append(
                f"task {name}: the language check ({counts['language']}{', strict' if strict else ''}) rejected "
                f"{100 * counts['rejected'] / counts['scorable']:.0f}% of {model}'s responses that would score "
                f"without it ({counts['rejected']} of {counts['scorable']}; {counts['responses']} responses): a "
                f"response passes when more than half its letters are in the language's script ({rule}); is the "
                "task's `language` what its answers are written in" + (", and are bare answers meant to fail?"
                                                                       if strict else "?"))
    return messages


def zero_score_tasks(rows: Sequence[dict], kinds: Sequence[str] = ("source",)) -> list[str]:
    """The score names (tasks) on which every row of `kinds` scored 0: table rows as
    {"model", "kind", "scores": {score name: value}}; none when no row is of those kinds."""
    chosen = [row for row in rows if row["kind"] in kinds]
    names = list(dict.fromkeys(name for row in chosen for name in row["scores"]))
    return [name for name in names if chosen and all(row["scores"].get(name) == 0 for row in chosen)]


def table_checks(rows: Sequence[dict], most: float = 0.5) -> list[str]:
    """The warnings a results table calls for before the search, as messages: each row's
    language checks ("language_checks": {task: `language_rejections`}) that rejected more
    than `most` of its scoring responses, and each score every source scored 0 on."""
    messages = [message for row in rows
                for message in language_check_warnings(row["model"], row.get("language_checks", {}), most)]
    sources = [row["model"] for row in rows if row["kind"] == "source"]
    messages += [f"task {name}: every source scored 0 ({', '.join(sources)}): the search starts on a flat landscape; "
                 "check the task's metric, language, prompt and answers" for name in zero_score_tasks(rows)]
    return messages
