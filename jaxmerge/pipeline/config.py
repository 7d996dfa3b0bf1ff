"""The configuration of an evolutionary merge: frozen dataclasses, read from YAML or built in Python.

    genome:   what is merged and which numbers evolve (mergekit-evolve's keys as they are)
    tasks:    what the merge is scored on (`jaxmerge.eval.tasks.TaskSpec`)
    search:   the evolution strategy
    dfs:      data-flow-space (layer path) searches after the PS one
    layout:   devices

Every error in a file names the file, line and key, and `validate` checks what can be
checked without loading a model (files, columns, template fields, methods, metrics)
before anything is loaded or written.

(Over 500 lines: the schema, its reading from YAML and its validation share one error
locator (`_Where`: file, line, key), and each key is read and checked beside its neighbours.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

from jaxmerge import yaml_input
from jaxmerge.eval.data import DataSource, check_columns
from jaxmerge.eval.metric_registry import LIKELIHOOD, metric_names, resolve_metric_name
from jaxmerge.eval.prompts import PromptSpec, template_fields
from jaxmerge.eval.tasks import TaskData, TaskSpec
from jaxmerge.hub import parse_reference, resolve_model, short_name
from jaxmerge.merge.methods import MergeMethod, get_method, method_names
from jaxmerge.search.strategies import NATURAL_NICHES, PARETO, strategy_names
from jaxmerge.search.tracking import missing_package

DFS_MODES = ("off", "dfs", "ps+dfs", "both")
# mergekit-evolve's top-level keys that jaxmerge expresses elsewhere (its limit, num_fewshot,
# apply_chat_template, fewshot_as_multiturn and shuffle apply to lm-eval tasks as there).
MERGEKIT_EVOLVE_KEYS = {
    "random_init": "set search.initial",
}
# A task entry naming an lm-eval task takes these keys (jaxmerge.harness.tasks.LmEvalTask).
LM_EVAL_TASK_KEYS = ("name", "metric", "weight", "include_path", "num_fewshot", "apply_chat_template",
                     "fewshot_as_multiturn", "fitness_size", "test_size")


class ConfigError(ValueError):
    """A bad configuration: the message names the file, line and key."""


@dataclasses.dataclass(frozen=True)
class GenomeConfig:
    """The merge and its genes. mergekit-evolve's keys: models, base_model, merge_method,
    layer_granularity (layers per gene group; 0: one group), normalize, allow_negative_weights,
    filters (tensor families with genes of their own, e.g. self_attn, mlp), tokenizer_source.
    One of the models may be a LLaVA VLM: its language model merges with the others, its
    vision tower and projector pass through (EvoVLM-JP)."""
    models: tuple[str, ...]
    base_model: str | None = None  # required except by search.strategy natural_niches
    merge_method: str = "dare_ties"
    layer_granularity: int = 0
    layer_groups: int | None = None  # instead of layer_granularity: the number of gene groups
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: tuple[str, ...] = ()
    smooth: bool = False  # mergekit-evolve's; not supported
    evolve: tuple[str, ...] | None = None  # default: weight and density, where the method has them
    fixed: tuple[tuple[str, float], ...] = ()
    tokenizer_source: str | None = None  # default: the VLM's, else the first model's
    names: tuple[str, ...] | None = None  # the sources' names in tables (default: directory names)
    dtype: str | None = None  # load dtype (default: as stored)
    allow_non_finite: bool = False  # load tensors holding NaN or Inf (refused by default)
    gates: bool = False  # a gate gene per source: the search chooses which models enter the merge
    source_cost: float = 0.0  # with gates: fitness each source in the merge costs (fewer sources at equal fitness)
    max_sources: int | None = None  # with gates: at most this many sources in a merge (the highest gates)
    # (checkpoint directory, the Hub reference it was given as) for each model named by a Hub
    # reference: set where references resolve (`resolve_models`), never in a config file.
    references: tuple[tuple[str, str], ...] = ()

    def evolved(self) -> tuple[str, ...]:
        if self.evolve is not None:
            return self.evolve
        names = {p.name for p in get_method(self.merge_method).parameters}
        return tuple(p for p in ("weight", "density", "t") if p in names)

    def source_names(self) -> tuple[str, ...]:
        """`names`, else each model's directory name (a Hub model's: its reference, `jaxmerge.hub.short_name`)."""
        written = dict(self.references)
        return self.names or tuple(short_name(written[m]) if m in written else Path(m).name for m in self.models)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The evolution strategy. "nsga2" is a Pareto search: every optimised task is an objective
    of its own (weights unused) and the run reports the whole front. `guards` ({task: fraction})
    make a single-objective search constrained: the target (the first task) as high as
    possible while each guard task scores at least `fraction` of the best source's score on
    its validation split; each point short costs `guard_penalty` points of target."""
    strategy: str | Any = "cma_es"  # a name (jaxmerge.search.strategies), or (from Python) an evosax algorithm
    generations: int = 40
    population: int | None = None  # default: 4 + floor(3 ln n)
    sigma: float = 1 / 6
    initial: tuple[tuple[str, float], ...] = (("weight", 0.5),)  # starting values (others: 0.5)
    seed: int = 0
    minibatch: int = 64  # fitness rows per task per generation
    validation_size: int = 100  # rows cut off each fitness split's end, where no validation split is given
    chunk_size: int | None = None  # candidates evaluated at once (default: 1 on CPU, all on GPU/TPU)
    guards: tuple[tuple[str, float], ...] = ()  # {task: fraction of the best source's validation score}
    guard_penalty: float = 10.0
    # A reduced fitness set: each task scored on this many of its fitness rows, chosen once by
    # item response theory (fitted on the sources' and `calibration` random candidates'
    # per-row scores over the whole fitness split), as an estimate of the whole split's score.
    fitness_items: int | None = None
    calibration: int = 16
    # The sources in host memory, each candidate's (at most genome.max_sources) on the device
    # when it is scored: a pool larger than the accelerator's memory (jaxmerge.search.pool).
    sources_on_host: bool = False
    # Each generation's fitness, sigma and best genome to an experiment tracker
    # (jaxmerge.search.tracking): none | wandb | tensorboard.
    tracking: str = "none"
    tracking_dir: str | None = None  # default: each search's directory in the run directory
    tracking_project: str | None = None  # W&B's project (default "jaxmerge")
    tracking_run: str | None = None  # the run's name in the tracker (default: the run directory's name)


@dataclasses.dataclass(frozen=True)
class NicheSettings:
    """`search.strategy: natural_niches` (M2N2, `jaxmerge.search.niche_search`): an archive of
    `archive_size` models seeded by the genome's models (and its base with include_base),
    `search.population` children per generation (default 4), each fusing two members with a
    mixing value and a split point; resource sharing's exponent `alpha`; parent B by
    attraction (`matchmaker`); `interpolation` slerp (the paper's) or linear; with `task_vectors`
    (a base given), task-arithmetic children: the parents' task vectors fused, the base added."""
    archive_size: int = 8
    alpha: float = 1.0
    matchmaker: bool = True
    splitpoint: bool = True
    interpolation: str = "slerp"
    include_base: bool = False
    task_vectors: bool = False  # task-arithmetic children: the parents' task vectors (less the base) fused


@dataclasses.dataclass(frozen=True)
class DfsSettings:
    """Layer-path searches after the PS one: "dfs" (a path through the first two sources'
    layers), "ps+dfs" (through the PS merge's and `partner`'s), "both", or "off"."""
    mode: str = "off"
    generations: int = 100
    population: int | None = 128
    repeats: int = 3
    scales: str = "matrix"  # matrix | network | none
    off_init: float = 0.0
    partner: int | None = None  # PS+DFS's model B (a source index; default: the first language model)
    chunk_size: int = 1


@dataclasses.dataclass(frozen=True)
class EvolveConfig:
    genome: GenomeConfig
    tasks: tuple[TaskSpec, ...]
    search: SearchSettings = SearchSettings()
    dfs: DfsSettings = DfsSettings()
    niches: NicheSettings = NicheSettings()
    layout: str | None = None  # POPULATIONxMODEL devices (default: every device on the population axis)
    distributed: bool = False  # join a multi-host run first
    out: str | None = None  # run directory (default: a fresh runs/<name>-<time>)
    name: str = "evolve"
    baselines: bool = True  # score the hand-set TIES / DARE-TIES / the method at weight 1
    dedupe: bool = False  # drop test rows whose prompt is also in the task's fitness or validation split
    base_dir: str | None = None  # where relative paths in the config are read from (its file's directory)
    # lm-eval tasks (a task entry without data names one), with mergekit-evolve's keys as defaults:
    task_search_path: str | None = None  # custom lm-eval task YAMLs (mergekit-evolve's --task-search-path)
    limit: int | None = None  # an lm-eval task's fitness documents (the rest are its test set)
    num_fewshot: int | None = None
    apply_chat_template: bool | None = None  # None: where the tokenizer has a chat template
    fewshot_as_multiturn: bool | None = None  # None: as apply_chat_template
    shuffle: bool = False  # an lm-eval task's documents shuffled (by search.seed) before they are split
    lm_eval_tasks: tuple = ()  # set when the config is read: each lm-eval task prepared (PreparedLmEvalTask)

    @classmethod
    def build(cls, **values) -> EvolveConfig:
        """From keyword arguments, sections as dataclasses or plain dicts (as YAML gives them)."""
        return _build(cls, values, "", {}, "keyword arguments")

    def record(self) -> dict:
        """The configuration as plain data (run.json): data built in Python by its fingerprint.
        How a run is tracked (search.tracking*) is left out: turning tracking on or off does not
        change the search, so a resume may do either."""
        record = _plain(dataclasses.replace(self, out=None))
        for key in ("tracking", "tracking_dir", "tracking_project", "tracking_run"):
            record["search"].pop(key, None)
        return record

    @property
    def target(self) -> TaskSpec:
        return self.tasks[0]

    def input_paths(self) -> list[Path]:
        """Every local path the run reads: the checkpoints, the tokenizer source, the task data
        and host-metric files. The run directory may not be or touch any of them, and a resume
        checks that none has changed."""
        genome = self.genome
        paths = [*genome.models, *([genome.base_model] if genome.base_model else []),
                 *([genome.tokenizer_source] if genome.tokenizer_source else [])]
        base_dir = Path(self.base_dir or ".")
        for task in self.tasks:
            paths += [s.path for split in ("fitness", "validation", "test", "few_shot_examples")
                      if isinstance(s := getattr(task, split), DataSource) and s.format != "hub"]
            if isinstance(task.host_metric, str) and task.host_metric.rpartition(":")[0].endswith(".py"):
                paths.append(str(base_dir / task.host_metric.rpartition(":")[0]))
        return list(dict.fromkeys(Path(p) for p in paths))


# ----------------------------------------------------------------------------- building from data


def _plain(value):
    if isinstance(value, TaskData):
        return {"rows": len(value), "sha256": value.fingerprint()}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', repr(value))}"
    return value


class _Where:
    """Names a key for error messages: `file:line: key`."""

    def __init__(self, source: str, lines: dict):
        self.source, self.lines = source, lines

    def __call__(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.source}:{line}: {key}" if line else f"{self.source}: {key}"


def _error(where, key, message) -> ConfigError:
    return ConfigError(f"{where(key)}: {message}")


def _coerce(value, annotation: str, key: str, where) -> Any:
    """A YAML value as the field's type (by its annotation's text, as dataclass fields keep it)."""
    if value is None:
        if "None" in annotation:
            return None
        raise _error(where, key, "must not be empty")
    if annotation.startswith("tuple["):
        return _coerce_tuple(value, annotation, key, where)
    return _coerce_scalar(value, annotation, key, where)


def _coerce_tuple(value, annotation: str, key: str, where) -> Any:
    """Mappings as (name, value) pairs, a list (or one text) as a tuple of texts."""
    if annotation.startswith("tuple[tuple[str, float]"):
        if not isinstance(value, dict):
            raise _error(where, key, f"expected a mapping of names to numbers, got {value!r}")
        return tuple((str(k), _number(v, f"{key}.{k}", where)) for k, v in value.items())
    if annotation.startswith("tuple[tuple[str, str]"):
        if not isinstance(value, dict):
            raise _error(where, key, f"expected a mapping, got {value!r}")
        return tuple((str(k), str(v)) for k, v in value.items())
    if annotation.startswith("tuple[str"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise _error(where, key, f"expected a list, got {value!r}")
        return tuple(_model_path(v, f"{key}[{i}]", where) for i, v in enumerate(value))
    return value


def _coerce_scalar(value, annotation: str, key: str, where) -> Any:
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise _error(where, key, f"expected true or false, got {value!r}")
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(where, key, f"expected an integer, got {value!r}")
        return value
    if annotation.startswith("float"):
        return _number(value, key, where)
    if annotation.startswith("str"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise _error(where, key, f"expected text, got {value!r}")
        return str(value)
    return value


def _number(value, key, where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(where, key, f"expected a finite number, got {value!r}")
    return float(value)


def _model_path(value, key, where) -> str:
    if isinstance(value, dict) and set(value) == {"model"}:  # mergekit's `- model: path`
        value = value["model"]
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise _error(where, key, f"expected text, got {value!r}")
    return str(value)


def _fields(cls, values: dict, prefix: str, where) -> dict:
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            hint = MERGEKIT_EVOLVE_KEYS.get(name) if not prefix else None
            raise _error(where, key, f"unknown key ({hint})" if hint else
                         f"unknown key (known: {', '.join(known)})")
        plain = isinstance(value, (str, int, float, bool, list, dict, type(None)))  # as YAML gives it
        out[name] = _coerce(value, str(known[name].type), key, where) if plain else value
    missing = [n for n, f in known.items() if n not in out and f.default is dataclasses.MISSING]
    if missing:
        raise _error(where, prefix.rstrip(".") or "(top level)", f"missing {', '.join(missing)}")
    return out


def _source(value, key, where, base_dir: Path) -> DataSource | TaskData | None:
    if value is None or isinstance(value, (DataSource, TaskData)):
        return value
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise _error(where, key, f"expected a file path or {{path, format, split}}, got {value!r}")
    fields = _fields(DataSource, value, f"{key}.", where)
    path = fields["path"]
    if fields.get("format") != "hub" and not Path(path).is_absolute():
        path = str(base_dir / path)
    return DataSource(**{**fields, "path": path})


def _lm_eval_task(value, key: str, where, values: dict, base_dir: Path, tokenizer):
    """A task entry naming an lm-eval task, prepared by lm-eval (its fitness documents rendered)."""
    try:
        from jaxmerge.harness.tasks import LmEvalTask, prepare
    except ImportError as e:
        raise _error(where, key, f"names an lm-eval task, and lm-eval is not installed ({e}): "
                     "pip install 'jaxmerge[lm-eval]'") from None
    entry = {"name": value} if isinstance(value, str) else dict(value)
    unknown = sorted(set(entry) - set(LM_EVAL_TASK_KEYS))
    if unknown:
        raise _error(where, f"{key}.{unknown[0]}", "unknown key for an lm-eval task (a task with local data gives "
                     f"fitness: and/or test:; an lm-eval task takes {', '.join(LM_EVAL_TASK_KEYS)})")
    search_path = entry.pop("include_path", None) or values.get("task_search_path")
    if search_path is not None and not Path(search_path).is_absolute():
        search_path = str(base_dir / search_path)
    defaults = {"num_fewshot": values.get("num_fewshot"), "apply_chat_template": values.get("apply_chat_template"),
                "fewshot_as_multiturn": values.get("fewshot_as_multiturn"), "fitness_size": values.get("limit")}
    fields = _fields(LmEvalTask, {**{k: v for k, v in defaults.items() if v is not None}, **entry}, f"{key}.", where)
    search = values.get("search")
    seed = search.seed if isinstance(search, SearchSettings) else SearchSettings().seed
    task = LmEvalTask(**fields, include_path=search_path, shuffle_seed=seed if values.get("shuffle") else None)
    try:
        return prepare(task, tokenizer())
    except ValueError as e:
        raise _error(where, key, str(e)) from None


def _task_of_lm_eval(prepared) -> TaskSpec:
    """The jaxmerge task that searches on an lm-eval task's fitness documents (its test score comes from lm-eval)."""
    return TaskSpec(name=prepared.task.name, metric=prepared.jaxmerge_metric, fitness=prepared.fitness,
                    weight=prepared.task.weight, delimiter="", max_new_tokens=prepared.max_new_tokens or 16,
                    host_metric=prepared.host_metric)


def _names_lm_eval_task(value) -> bool:
    return isinstance(value, str) or (isinstance(value, dict) and not {"fitness", "test"} & set(value))


def _task(value, index: int, where, base_dir: Path) -> TaskSpec:
    key = f"tasks[{index}]"
    if isinstance(value, TaskSpec):
        return value
    if not isinstance(value, dict):
        raise _error(where, key, f"expected a mapping, got {value!r}")
    values = dict(value)
    if "prompt" in values:
        prompt = values["prompt"]
        values["prompt"] = PromptSpec(template=prompt) if isinstance(prompt, str) else \
            PromptSpec(**_fields(PromptSpec, prompt, f"{key}.prompt.", where)) if isinstance(prompt, dict) else prompt
    for split in ("fitness", "validation", "test", "few_shot_examples"):
        if split in values:
            values[split] = _source(values[split], f"{key}.{split}", where, base_dir)
    if values.get("metric") == "lm_eval" or "lm_eval" in values:
        raise _error(where, key, "lm-eval tasks are not run by jaxmerge: point fitness:/test: at local data")
    if values.get("metric") is not None:
        try:
            values["metric"] = resolve_metric_name(values["metric"])  # lm-eval's names too: acc, acc_norm, ...
        except ValueError as e:
            raise _error(where, f"{key}.metric", str(e)) from None
    fields = _fields(TaskSpec, values, f"{key}.", where)
    try:
        return TaskSpec(**fields)
    except ValueError as e:
        raise _error(where, key, str(e)) from None


def _build(cls, values: dict, prefix: str, lines: dict, source: str, base_dir: Path | None = None) -> EvolveConfig:
    where = _Where(source, lines)
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (genome, tasks, search, dfs), got {values!r}")
    base_dir = Path(values.get("base_dir") or base_dir or ".")
    values = dict(values)
    sections = {"genome": GenomeConfig, "search": SearchSettings, "dfs": DfsSettings, "niches": NicheSettings}
    for name, section in sections.items():
        if name in values and isinstance(values[name], dict):
            fields = _fields(section, values[name], f"{name}.", where)
            if name == "genome":
                if fields.get("tokenizer_source") == "base":  # mergekit's word for the base model's
                    fields["tokenizer_source"] = fields.get("base_model")
                elif fields.get("tokenizer_source") == "union":
                    raise _error(where, "genome.tokenizer_source", "a vocabulary union is for `jaxmerge merge` "
                                 "recipes; an evolved merge keeps one model's vocabulary: give base or a model's path")
                if "references" in fields:
                    raise _error(where, "genome.references", "set by jaxmerge where Hub references resolve: name "
                                 "the models by reference in genome.models / base_model instead")
            values[name] = section(**fields)
            if name == "genome":  # relative paths from the config's directory
                values[name] = resolve_models(values[name], base_dir)
        elif name == "genome" and isinstance(values.get(name), GenomeConfig):  # built in Python: paths as given
            values[name] = resolve_models(values[name])
    tasks = values.get("tasks")
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise _error(where, "tasks", "give a list of one or more tasks")
    tokenizer = functools.cache(lambda: _config_tokenizer(values.get("genome")))
    lm_eval_tasks = {i: _lm_eval_task(t, f"tasks[{i}]", where, values, base_dir, tokenizer)
                     for i, t in enumerate(tasks) if _names_lm_eval_task(t)}
    if lm_eval_tasks:
        values["lm_eval_tasks"] = tuple(lm_eval_tasks.values())
    values["tasks"] = tuple(_task_of_lm_eval(lm_eval_tasks[i]) if i in lm_eval_tasks else _task(t, i, where, base_dir)
                            for i, t in enumerate(tasks))
    values.setdefault("base_dir", str(base_dir))
    config = cls(**_fields(cls, values, "", where))
    validate(config, where)
    return config


def _config_tokenizer(genome):
    """The tokenizer the run will use (the tokenizer source's, else the base model's): lm-eval tasks
    render their prompts with its chat template when the config is read."""
    if not isinstance(genome, GenomeConfig):
        raise ConfigError("genome: an lm-eval task needs the genome's models to read the tokenizer from")
    from jaxmerge.checkpoint import load_tokenizer

    return load_tokenizer(genome.tokenizer_source or genome.base_model or genome.models[0])


def _resolve(path: str, base_dir: Path | None) -> tuple[str, str | None]:
    """A checkpoint's directory: a relative path from `base_dir` (None: as it is); where none
    exists, the snapshot of the Hub reference the path spells (`jaxmerge.hub`), whose
    directory name is the commit it resolved to. With the reference, where it was one."""
    local = path if base_dir is None or Path(path).is_absolute() else str(base_dir / path)
    if not Path(local).exists() and parse_reference(path) is not None:
        return str(resolve_model(path)), path
    return local, None


def resolve_models(genome: GenomeConfig, base_dir: Path | None = None) -> GenomeConfig:
    """The genome's models, base_model and tokenizer_source as checkpoint directories
    (relative paths from `base_dir`, None: as they are), each Hub reference resolved once to
    its snapshot and kept, as written, in `references` (run.json, results.json and the recipe
    then name it by reference and commit). `load_config` and `EvolveConfig.build` call it,
    and `evolve` for a config built in Python; a resolved genome comes back as it is."""
    references = dict(genome.references)

    def directory(path: str) -> str:
        resolved, reference = _resolve(path, base_dir)
        if reference is not None:
            references[resolved] = reference
        return resolved

    models = tuple(directory(p) for p in genome.models)
    base_model = directory(genome.base_model) if genome.base_model is not None else None
    tokenizer_source = genome.tokenizer_source
    tokenizer_source = directory(tokenizer_source) if tokenizer_source is not None else None
    return dataclasses.replace(genome, models=models, base_model=base_model, tokenizer_source=tokenizer_source,
                               references=tuple(references.items()))


def resolve_config(config: EvolveConfig) -> EvolveConfig:
    """`config` with its genome's Hub references resolved (`resolve_models`): what `evolve`
    does first, for a config built in Python as `EvolveConfig(...)`."""
    genome = resolve_models(config.genome)
    return config if genome == config.genome else dataclasses.replace(config, genome=genome)


# ----------------------------------------------------------------------------- YAML with line numbers


def _compose(text: str, source: str) -> tuple[Any, dict]:
    """The YAML document as plain data, and {"genome.models[1]": line} for error messages."""
    lines: dict[str, int] = {}
    try:
        node = yaml_input.compose(text, source)
        return (yaml_input.to_plain(node, source, lines) if node is not None else None), lines
    except yaml_input.YamlInputError as e:
        raise ConfigError(str(e)) from None


def apply_override(values: dict, assignment: str) -> None:
    """`search.generations=3`, `tasks[0].weight=2`: the value read as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected KEY=VALUE, e.g. search.generations=3")
    parts = [p for chunk in key.split(".") for p in chunk.replace("]", "").split("[")]
    target = values
    for i, part in enumerate(parts[:-1]):
        part = int(part) if part.isdigit() else part
        if isinstance(target, dict):
            target = target.setdefault(part, {})
        elif isinstance(target, list) and isinstance(part, int) and part < len(target):
            target = target[part]
        else:
            raise ConfigError(f"override {assignment!r}: no {'.'.join(parts[:i + 1])} in the config")
    last = parts[-1]
    try:
        value = yaml_input.safe_load(text, f"override {assignment!r}")
    except yaml_input.YamlInputError as e:
        raise ConfigError(str(e)) from None
    target[int(last) if last.isdigit() and isinstance(target, list) else last] = value


def load_config(path, overrides: list[str] = ()) -> EvolveConfig:
    """An `EvolveConfig` from a YAML file (relative paths from its directory), with
    KEY=VALUE overrides; validated before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    values, lines = _compose(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (genome, tasks, search, dfs)")
    for assignment in overrides:
        apply_override(values, assignment)
    return _build(EvolveConfig, values, "", lines, str(path), path.parent.resolve())


# ----------------------------------------------------------------------------- validation


def _checkpoint_layers(path: str, key: str, where) -> tuple[dict, int]:
    """The checkpoint's config.json and its language model's layer count, or a clear error."""
    from jaxmerge.architectures import architecture_of

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise _error(where, key, f"{path}: not a checkpoint directory (no config.json)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise _error(where, key, f"{config_file}: not JSON ({e.msg})") from None
    try:
        architecture_of(hf, str(config_file))
    except (ValueError, KeyError) as e:
        raise _error(where, key, str(e)) from None
    text = hf.get("text_config", hf)
    return hf, int(text.get("num_hidden_layers", 0))


def context_length(path: str) -> int | None:
    """The base's language model context in tokens (max_position_embeddings, or what its RoPE
    scaling stretches it to; None where nothing bounds it)."""
    from jaxmerge.checkpoint import model_config
    from jaxmerge.generation import language_config

    return language_config(model_config(path)).context_length


def is_vlm_config(hf: dict) -> bool:
    return "vision_config" in hf


def validate(config: EvolveConfig, where=None) -> None:
    """Everything that can be checked without loading a model, section by section."""
    where = where or _Where("config", {})
    _validate_niches(config, where)
    vlm = _validate_genome(config.genome, where)
    _validate_numbers(config, where)
    _validate_strategy(config, where)
    _validate_tracking(config, where)
    _validate_objectives(config, where)
    _validate_dfs(config, where)
    _validate_layout(config, where)
    _validate_tasks(config, where, vlm)


def _validate_genome(genome: GenomeConfig, where) -> bool:
    """The genome's method, genes, gates and models; whether one of the models is a VLM."""
    method = _validate_merge_method(genome, where)
    _validate_gates(genome, where)
    if genome.smooth:
        raise _error(where, "genome.smooth", "not supported: use layer_granularity or layer_groups")
    if len(genome.models) < 2:
        raise _error(where, "genome.models", "give two or more source models")
    if genome.names is not None and len(genome.names) != len(genome.models):
        raise _error(where, "genome.names", f"{len(genome.names)} names for {len(genome.models)} models")
    if len(genome.models) > (method.max_sources or len(genome.models)):
        raise _error(where, "genome.merge_method", f"{method.name} merges the base with at most {method.max_sources} "
                     f"model(s), and a genome merges {len(genome.models)}: choose a method for several models "
                     "(task_arithmetic, ties, dare_ties, linear, ...)")
    if genome.layer_granularity < 0:
        raise _error(where, "genome.layer_granularity", f"layers per gene group, >= 0 (0: one group for the whole "
                     f"model), got {genome.layer_granularity}")
    return _validate_checkpoints(genome, where)


def _validate_merge_method(genome: GenomeConfig, where) -> MergeMethod:
    """A registered method (looked up now: a method registered after import counts), and the
    evolved genes among its parameters."""
    names = method_names()
    if genome.merge_method not in names:
        raise _error(where, "genome.merge_method", f"unknown merge method {genome.merge_method!r} "
                     f"(supported: {', '.join(names)})")
    method = get_method(genome.merge_method)
    for name in genome.evolved():
        if name not in {p.name for p in method.parameters}:
            raise _error(where, "genome.evolve", f"{genome.merge_method} has no parameter {name!r} "
                         f"(it has {', '.join(p.name for p in method.parameters)})")
    return method


def _validate_gates(genome: GenomeConfig, where) -> None:
    """Gates, max_sources and source_cost: the search choosing which sources enter the merge."""
    if genome.gates and "weight" not in genome.evolved():
        raise _error(where, "genome.gates", f"gates switch sources off through their weights: evolve "
                     f"{genome.merge_method}'s weight (evolved: {', '.join(genome.evolved()) or 'nothing'})")
    if genome.max_sources is not None and not (genome.gates and 1 <= genome.max_sources <= len(genome.models)):
        raise _error(where, "genome.max_sources", f"caps the sources gates let in: set genome.gates: true and a "
                     f"number in [1, {len(genome.models)}] (got {genome.max_sources}, gates {genome.gates})")
    if genome.source_cost and not genome.gates:
        raise _error(where, "genome.source_cost", "prices the sources a gate lets in: set genome.gates: true")
    if not (math.isfinite(genome.source_cost) and genome.source_cost >= 0):
        raise _error(where, "genome.source_cost", f"must be a finite number >= 0, got {genome.source_cost}")


def _validate_checkpoints(genome: GenomeConfig, where) -> bool:
    """The models' and the base's config.json: one architecture, at most one VLM, layers that
    the gene groups divide. Whether one of the models is a VLM."""
    layers, vlms = [], 0
    for i, path in enumerate(genome.models):
        hf, count = _checkpoint_layers(path, f"genome.models[{i}]", where)
        layers.append(count)
        vlms += is_vlm_config(hf)
    base_layers = layers[0] if genome.base_model is None else \
        _checkpoint_layers(genome.base_model, "genome.base_model", where)[1]
    if vlms > 1:
        raise _error(where, "genome.models", "at most one VLM: its language model merges with the others")
    if len(set(layers + [base_layers])) > 1:
        raise _error(where, "genome.models", f"the models' layer counts differ ({layers}, base {base_layers}): "
                     "parameter-space merging needs one architecture")
    if genome.layer_granularity and base_layers % genome.layer_granularity:
        raise _error(where, "genome.layer_granularity", f"{base_layers} layers are not a multiple of "
                     f"{genome.layer_granularity}")
    if genome.layer_groups is not None and not 1 <= genome.layer_groups <= base_layers:
        raise _error(where, "genome.layer_groups", f"must be in [1, {base_layers}]")
    return vlms > 0


def _validate_strategy(config: EvolveConfig, where) -> None:
    """A registered strategy or evosax's (`jaxmerge.search.strategies`, read now). A multi-host
    run's name is checked when its search starts: listing evosax's imports evosax, which
    starts JAX's backend, and this runs before `jax.distributed.initialize()`."""
    strategy = config.search.strategy
    if not isinstance(strategy, str) or config.distributed or strategy == NATURAL_NICHES:
        return
    names = strategy_names()
    if strategy not in names:
        raise _error(where, "search.strategy", f"unknown strategy {strategy!r} (known: {', '.join(names)}; and "
                     f"{NATURAL_NICHES}, an archive of fused models)")


def _validate_niche_tasks(config: EvolveConfig, where) -> None:
    """Every optimised task's metric bounded: resource sharing divides each item's score among the members."""
    for i, task in enumerate(config.tasks):
        if task.optimised and task.metric in metric_names() and not task.scoring.bounded:
            raise _error(where, f"tasks[{i}].metric", f"{NATURAL_NICHES} shares each item's score among the archive's "
                         f"members, which needs scores in [0, 1]; {task.metric} is unbounded: choose a bounded metric")


def _validate_niches(config: EvolveConfig, where) -> None:
    """natural_niches' settings; a base model, required by every other search."""
    niches, genome = config.niches, config.genome
    if config.search.strategy != NATURAL_NICHES:
        if genome.base_model is None:
            raise _error(where, "genome.base_model", "required: the merge's base (only search.strategy "
                         f"{NATURAL_NICHES} fuses models without one)")
        return
    for key, value in (("include_base", niches.include_base), ("task_vectors", niches.task_vectors)):
        if value and genome.base_model is None:
            raise _error(where, f"niches.{key}", "needs genome.base_model: give one")
    if not (isinstance(niches.archive_size, int) and niches.archive_size >= 2):
        raise _error(where, "niches.archive_size", f"an integer >= 2, got {niches.archive_size!r}")
    if not (math.isfinite(niches.alpha) and niches.alpha >= 0):
        raise _error(where, "niches.alpha", f"a finite number >= 0, got {niches.alpha}")
    if niches.interpolation not in ("slerp", "linear"):
        raise _error(where, "niches.interpolation", f"slerp or linear, got {niches.interpolation!r}")
    if config.dfs.mode != "off":
        raise _error(where, "dfs.mode", f"layer-path searches follow a PS merge; with {NATURAL_NICHES} set it off")
    _validate_niche_tasks(config, where)
    unsupported = {"guards": bool(config.search.guards),
                   "fitness_items": bool(config.search.fitness_items),
                   "sources_on_host": config.search.sources_on_host, "genome.gates": genome.gates}
    for name, used in unsupported.items():
        if used:
            raise _error(where, f"search.{name}" if not name.startswith("genome") else name,
                         f"not available with search.strategy {NATURAL_NICHES}")


def _validate_tracking(config: EvolveConfig, where) -> None:
    """A known tracker whose package is installed: found missing now, not after the models load."""
    problem = missing_package(config.search.tracking)
    if problem:
        raise _error(where, "search.tracking", problem)


def _validate_objectives(config: EvolveConfig, where) -> None:
    """A Pareto search needs two optimised tasks and no layer-path search after it; guards
    name optimised tasks other than the target, which must be optimised itself."""
    search = config.search
    if search.strategy == PARETO:
        _validate_pareto(config, where)
    if search.guards:
        _validate_guards(config, where)
    if search.fitness_items is not None:
        _validate_fitness_items(config, where)
    if search.sources_on_host and config.genome.max_sources is None:
        raise _error(where, "search.sources_on_host", "the device holds one candidate's sources at a time: cap them "
                     "with genome.max_sources (and genome.gates: true)")
    if search.guard_penalty <= 0 or not math.isfinite(search.guard_penalty):
        raise _error(where, "search.guard_penalty", f"must be a finite number > 0, got {search.guard_penalty}")


def _validate_pareto(config: EvolveConfig, where) -> None:
    optimised = [t.name for t in config.tasks if t.optimised]
    if len(optimised) < 2:
        raise _error(where, "search.strategy", f"nsga2 (a Pareto search) needs two or more optimised tasks as "
                     f"objectives; optimised: {optimised}")
    if config.dfs.mode != "off":
        raise _error(where, "dfs.mode", "layer-path searches are single-objective: set dfs.mode off with nsga2")
    if config.search.guards:
        raise _error(where, "search.guards", "guards constrain a single-objective search; with nsga2 every "
                     "task is already an objective")


def _validate_guards(config: EvolveConfig, where) -> None:
    optimised = [t.name for t in config.tasks if t.optimised]
    if not config.target.optimised:
        raise _error(where, "search.guards", f"the target ({config.target.name}, the first task) must have a "
                     "fitness split and a positive weight")
    for name, fraction in config.search.guards:
        if name not in optimised or name == config.target.name:
            raise _error(where, f"search.guards.{name}", f"not an optimised task other than the target "
                         f"(those: {', '.join(n for n in optimised if n != config.target.name) or 'none'})")
        if not 0 < fraction <= 10:
            raise _error(where, f"search.guards.{name}", f"a fraction of the best source's score, in (0, 10], "
                         f"got {fraction}")
    host = [t.name for t in config.tasks if t.scoring.scored_on_host and t.name in dict(config.search.guards)]
    if host:
        raise _error(where, "search.guards", f"host-metric tasks cannot be guards: {', '.join(host)}")


def _validate_fitness_items(config: EvolveConfig, where) -> None:
    search = config.search
    if search.fitness_items < 2:
        raise _error(where, "search.fitness_items", f"at least 2 rows per task, got {search.fitness_items}")
    unfit = [t.name for t in config.tasks if t.optimised and (not t.scoring.bounded or t.scoring.scored_on_host)]
    if unfit:
        raise _error(where, "search.fitness_items", "item response theory needs per-row scores in [0, 1]: not "
                     f"{', '.join(unfit)} (loglik or host metrics)")
    if search.calibration < 0:
        raise _error(where, "search.calibration", f"must be >= 0, got {search.calibration}")


def _validate_dfs(config: EvolveConfig, where) -> None:
    if config.dfs.mode not in DFS_MODES:
        raise _error(where, "dfs.mode", f"unknown mode {config.dfs.mode!r} (known: {', '.join(DFS_MODES)})")
    if config.dfs.partner is not None and not 0 <= config.dfs.partner < len(config.genome.models):
        raise _error(where, "dfs.partner", f"not a source index (0-{len(config.genome.models) - 1})")


def _validate_layout(config: EvolveConfig, where) -> None:
    if config.layout is not None:
        from jaxmerge.parallel import Layout
        try:
            Layout.parse(config.layout)
        except ValueError as e:
            raise _error(where, "layout", str(e)) from None


def _validate_tasks(config: EvolveConfig, where, vlm: bool) -> None:
    names = [t.name for t in config.tasks]
    if len(set(names)) != len(names):
        raise _error(where, "tasks", f"task names must differ: {names}")
    if not any(t.optimised for t in config.tasks):
        raise _error(where, "tasks", "no task has a fitness split and a positive weight: nothing to optimise")
    context = context_length(config.genome.base_model or config.genome.models[0])
    for i, task in enumerate(config.tasks):
        _validate_task(task, f"tasks[{i}]", where, vlm=vlm, context=context)


MAX_POPULATION = 100_000  # beyond, the population's genomes and scores alone outgrow a host's memory


def _at_least(where, key: str, value, least: int, meaning: str, most: int | None = None) -> None:
    if value is not None and not (least <= value and (most is None or value <= most)):
        bound = f"in [{least}, {most:,}]" if most is not None else f">= {least}"
        raise _error(where, key, f"{meaning}: must be {bound}, got {value}")


def _validate_numbers(config: EvolveConfig, where) -> None:
    """Every numeric search and layer-path key within the domain the search can use (a
    population of 1 or a sigma of 0 made CMA-ES's genomes NaN)."""
    search, dfs = config.search, config.dfs
    _at_least(where, "search.generations", search.generations, 1, "generations of the search")
    _at_least(where, "search.population", search.population, 2, "candidates per generation (an evolution strategy "
              "ranks two or more)", MAX_POPULATION)
    if not 0 < search.sigma <= 10:
        raise _error(where, "search.sigma", f"the initial step size of the search: must be in (0, 10] (genes live "
                     f"in about [0, 1]), got {search.sigma}")
    _at_least(where, "search.seed", search.seed, 0, "the random seed", 2**32 - 1)
    _at_least(where, "search.minibatch", search.minibatch, 1, "fitness rows per task per generation")
    _at_least(where, "search.validation_size", search.validation_size, 1, "validation rows cut off each fitness "
              "split without a validation split")
    _at_least(where, "search.chunk_size", search.chunk_size, 1, "candidates evaluated at once")
    if config.dfs.mode != "off":
        _at_least(where, "dfs.generations", dfs.generations, 1, "generations of the layer-path search")
        _at_least(where, "dfs.population", dfs.population, 2, "candidates per generation", MAX_POPULATION)
        _at_least(where, "dfs.repeats", dfs.repeats, 1, "times the layers may repeat in a path")
        _at_least(where, "dfs.chunk_size", dfs.chunk_size, 1, "candidates evaluated at once")
        if dfs.scales not in ("matrix", "network", "none"):
            raise _error(where, "dfs.scales", f"one of matrix, network, none, got {dfs.scales!r}")


def _validate_task(task: TaskSpec, key: str, where, vlm: bool, context: int | None = None) -> None:
    if task.weight < 0 or not math.isfinite(task.weight):
        raise _error(where, f"{key}.weight", f"must be a finite number >= 0, got {task.weight}")
    _at_least(where, f"{key}.max_new_tokens", task.max_new_tokens, 1, "tokens generated per response" + (
        f", within the base model's context of {context} tokens" if context else ""), context)
    _at_least(where, f"{key}.minibatch", task.minibatch, 1, "fitness rows per generation")
    if task.scoring.kind == LIKELIHOOD and vlm:
        raise _error(where, f"{key}.metric", "log-likelihood metrics are for language models; a VLM merge is scored "
                     "by generation (exact, number, rouge_l, host)")
    columns = dict(task.columns)
    required = task.required_fields() + (("image",) if vlm else ())
    for split in ("fitness", "validation", "test", "few_shot_examples"):
        source = getattr(task, split)
        if not isinstance(source, DataSource):
            continue
        try:
            available = check_columns(source, columns, required)
        except (ValueError, FileNotFoundError) as e:
            raise _error(where, f"{key}.{split}", str(e)) from None
        if task.prompt.template is not None:
            fields = set(available) | set(columns) | set(required)
            missing = sorted(template_fields(task.prompt.template) - fields)
            if missing:
                raise _error(where, f"{key}.prompt", f"the template's field(s) {', '.join(missing)} are not in "
                             f"{source.path} (its columns: {', '.join(available)})")
