"""`evolve(config)`: the whole evolutionary merge, for any checkpoints and any tasks.

Load base and sources (LLMs, or one LLaVA VLM whose language model merges with LLMs),
score the sources, trivial answers and hand-set merges on the test sets, evolve the
parameter-space (PS) merge, optionally a layer path (DFS) and one through the PS merge
(PS+DFS), choose the best evolved model on the validation split, score every evolved
model on the test sets once, and write the run directory:

    run.json                      the configuration (a rerun with the same one resumes)
    search*/generations.jsonl     the searches' logs, with orbax checkpoints beside them
    results.json, results.md      the table, as data and as Markdown
    fitness*.png, genome.png, path_*.png
    recipe.yml                    the PS merge as a mergekit recipe
    merged/, merged_dfs/, merged_ps_dfs/   checkpoints transformers opens

A model given as a Hub reference (`org/name[@revision]`) is named by it in results.json,
with the commit it resolved to (`hub_models`, also in run.json: a resume on another commit
is refused), and the recipes name it pinned to that commit (`org/name@<commit>`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxmerge.architectures import architecture_by_name
from jaxmerge.checkpoint import load_tokenizer
from jaxmerge.eval.tasks import FitnessBatches, Task, evaluate_with_checks, table_checks, trivial_rows
from jaxmerge.hub import hub_models
from jaxmerge.merge import get_method
from jaxmerge.merge.tree import with_language_model
from jaxmerge.models.interfaces import VisionLanguageModel, language_model
from jaxmerge.outputs import check_output_dir, staged_output
from jaxmerge.parallel import Layout, is_primary
from jaxmerge.pipeline import niches
from jaxmerge.pipeline.checks import (
    describe_long_references,
    describe_overlap,
    drop_overlap,
    long_references,
    split_overlap,
)
from jaxmerge.pipeline.config import EvolveConfig, resolve_config, validate
from jaxmerge.pipeline.fitness_items import reduce_fitness
from jaxmerge.pipeline.layer_paths import PathSearch, evolve_path
from jaxmerge.pipeline.problem import MergeProblem, fitness_batches, prepare_tasks, search_config
from jaxmerge.pipeline.results import scored_columns, search_summary, write_results
from jaxmerge.pipeline.rundir import (
    atomic_file,
    create_run_dir,
    discard_unstarted_run_dir,
    fingerprint_inputs,
    json_safe,
    plan_run_dir,
    planned_extension,
    run_lock,
    write_text_atomic,
)
from jaxmerge.pipeline.sources import Sources, default_layout, load_models, loader, processor_for, tokenizer_dir
from jaxmerge.search import SearchConfig, SearchResult, get_strategy, run_search
from jaxmerge.search.evolution import strategy_name
from jaxmerge.search.strategies import NATURAL_NICHES

log = logging.getLogger(__name__)

PATH_ROW_LABELS = {"dfs": "evolved DFS merge (layer path)", "ps_dfs": "evolved PS+DFS merge"}
MERGED_DIRS = {"ps": "merged", "dfs": "merged_dfs", "ps_dfs": "merged_ps_dfs", "niches": "merged"}
BASELINES_FILE = "baselines.jsonl"  # the reference rows as scored, read again by a resumed run
# What an extended run (more search.generations) must not keep: outputs of the PS search's result
# that later stages do not simply overwrite (merged/, recipe.yml, the plots and merged_* are). PS+DFS
# searched through the old PS merge, and its checkpoint would resume that search; a smaller front
# would leave old members behind; results.md is the old table until the new one is written.
STALE_WHEN_EXTENDED = ("search_ps_dfs", "front", "results.md")


@dataclasses.dataclass
class EvolveResult:
    """What a run found: the evolved genomes ("ps", "dfs", "ps_dfs"), the table's rows, the
    whole results.json, and which evolved model was best on the validation split."""
    run_dir: Path
    genomes: dict[str, np.ndarray]
    rows: list[dict]
    results: dict
    best: str

    def checkpoint(self, name: str | None = None) -> Path:
        """The saved checkpoint of an evolved model (default: the best on validation)."""
        return self.run_dir / MERGED_DIRS[name or self.best]

    def save(self, out_dir, name: str | None = None) -> Path:
        """Copies an evolved checkpoint (default: the best) to `out_dir`, which must not exist
        or be empty, and must not be or hold the run directory: written beside it, then
        renamed (`jaxmerge.outputs.staged_output`)."""
        out = Path(out_dir)
        check_output_dir(out, [self.run_dir], overwrite=False)
        with staged_output(out) as staging:
            shutil.copytree(self.checkpoint(name), staging, dirs_exist_ok=True)
        return out


@dataclasses.dataclass
class ScoreTable:
    """The results table: each model scored on every task's test split, as it is added. The
    reference rows (sources, base, hand-set merges), which depend on the configuration alone,
    are kept in `saved` (baselines.jsonl in the run directory) as they are scored: a resumed or
    extended run reads them instead of scoring them again."""
    tokenizer: object
    tasks: list[Task]
    lm_eval_tasks: tuple = ()  # scored by lm-eval through the jaxmerge backend (jaxmerge.harness.tasks)
    rows: list[dict] = dataclasses.field(default_factory=list)
    saved: Path | None = None

    def add(self, name: str, kind: str, model) -> None:
        began = time.perf_counter()
        scores, samples, language_checks = evaluate_with_checks(model, self.tokenizer, self.tasks)
        if self.lm_eval_tasks:
            from jaxmerge.harness.tasks import lm_eval_scores

            scores.update(lm_eval_scores(model, self.tokenizer, list(self.lm_eval_tasks)))
        self.rows.append({"model": name, "kind": kind, "scores": scores, "samples": samples,
                          **({"language_checks": language_checks} if language_checks else {})})
        log.info("  %-44s %s   (%.0f s)", name, "  ".join(f"{t} {v:5.1f}" for t, v in scores.items()),
                 time.perf_counter() - began)

    def add_reference(self, name: str, kind: str, build: Callable[[], Any]) -> None:
        """A reference row: read from `saved` if an earlier session of the run scored it, else
        the model `build()` makes scored and the row appended to `saved`."""
        earlier = self._saved_rows().get(name)
        if earlier is not None:
            self.rows.append(earlier)
            log.info("  %-44s %s   (scored earlier in this run)", name,
                     "  ".join(f"{t} {v:5.1f}" for t, v in earlier["scores"].items()))
            return
        self.add(name, kind, build())
        if self.saved is not None and is_primary():
            with self.saved.open("a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(self.rows[-1]), ensure_ascii=False) + "\n")

    def _saved_rows(self) -> dict[str, dict]:
        """{row name: row} of `saved`'s whole lines (a line cut short by a kill is scored again)."""
        if self.saved is None or not self.saved.exists():
            return {}
        rows = {}
        for line in self.saved.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and "model" in row:
                    rows[row["model"]] = row
        return rows


@dataclasses.dataclass
class PsSearch:
    """The parameter-space search as it ran: its fitness, settings, result and summary."""
    fitness: FitnessBatches
    search: SearchConfig
    result: SearchResult
    summary: dict


def evolve(config: EvolveConfig | None = None, **values) -> EvolveResult:
    """Runs an evolutionary merge end to end (see the module docstring). `config`, or keyword
    arguments that build one (`EvolveConfig.build`): sections as dataclasses or dicts."""
    # Hub references resolved once, here for a config built in Python (load_config and build did it already).
    config = resolve_config(config if config is not None else EvolveConfig.build(**values))
    validate(config)
    if config.distributed:
        from jaxmerge import parallel
        parallel.initialize()
        if isinstance(config.search.strategy, str):  # not checked by `validate` before JAX's initialisation
            get_strategy(config.search.strategy)
    started = time.perf_counter()
    # Everything that can fail on the user's input fails before a model loads or anything is
    # written: the run directory is checked (created once the models are loaded; never an
    # input, nor inside one), the data read, the prompts rendered and the answers checked.
    # The run directory is held by this process from its check to the end of the run.
    # run.json also names the commit each Hub reference resolved to: a resume on other weights is refused.
    record, inputs, hub = config.record(), config.input_paths(), hub_models(config.genome.references)
    fingerprints = fingerprint_inputs(inputs)
    run_dir = plan_run_dir(config.out, config.name, record, fingerprints, inputs, hub_models=hub)
    with run_lock(run_dir) if is_primary() else contextlib.nullcontext():
        plan_run_dir(str(run_dir), config.name, record, fingerprints, inputs, hub_models=hub)  # again, now ours
        if (extension := planned_extension(run_dir, record)) is not None:
            log.info("%s", extension)
        new = not run_dir.exists()
        try:
            return _evolve_in(run_dir, config, record, fingerprints, started)
        except BaseException:
            if new and is_primary():  # a run that failed before its search began leaves nothing behind
                discard_unstarted_run_dir(run_dir)
            raise


def _evolve_in(run_dir: Path, config: EvolveConfig, record: dict, fingerprints: dict, started: float) -> EvolveResult:
    """`evolve` in its checked and held run directory: the stages in order."""
    tokenizer = load_tokenizer(tokenizer_dir(config))
    tasks = prepare_tasks(config, tokenizer, processor_for(config), dedupe=False)
    checks = check_tasks(tasks, tokenizer, config.dedupe)
    tasks = [drop_overlap(task) for task in tasks] if config.dedupe else tasks
    layout = default_layout(config.layout)
    if config.search.strategy == NATURAL_NICHES:
        return _evolve_niches_in(run_dir, config, record, fingerprints, started, tokenizer, tasks, checks, layout)
    sources = load_models(config, layout, tokenizer)
    create_run_dir(run_dir, config.name, record, fingerprints, hub_models=hub_models(config.genome.references),
                   stale_when_extended=STALE_WHEN_EXTENDED)
    log.info("run directory: %s", run_dir)
    table = ScoreTable(tokenizer, tasks, config.lm_eval_tasks, saved=run_dir / BASELINES_FILE)
    problem = MergeProblem.from_config(config, sources)

    score_baselines(config, problem, table, checks["overlap"])
    checks["scores"] = table_checks(table.rows)  # language checks that reject most answers, tasks every source fails
    for message in checks["scores"]:
        log.warning("%s", message)
    ps = search_ps(config, problem, layout, run_dir, table)
    summaries = {"search": ps.summary}
    genomes, validation = {"ps": np.asarray(ps.result.best_genome)}, {"ps": ps.result.best_validation}
    ps_model = save_ps_merge(config, problem, ps, run_dir, table, layout)
    if ps.result.front is not None:
        summaries["front"] = score_front(problem, ps, run_dir, table)
    paths = search_layer_paths(config, problem, ps, ps_model, run_dir, table, layout)
    for name, (summary, result) in paths.items():
        summaries[f"search_{name}"] = summary
        genomes[name], validation[name] = result.best_genome, result.best_validation
    return report(config, run_dir, table, ps.fitness, summaries, genomes, validation, started, checks)


def _evolve_niches_in(run_dir: Path, config: EvolveConfig, record: dict, fingerprints: dict, started: float,
                      tokenizer, tasks: list[Task], checks: dict, layout: Layout | None) -> EvolveResult:
    """`evolve` with search.strategy natural_niches (`jaxmerge.pipeline.niches`): the archive's
    seeds scored on the test sets, the search, its best member saved as merged/ and scored."""
    load = loader(config, layout)
    seeds = niches.source_models(config, load)
    create_run_dir(run_dir, config.name, record, fingerprints, hub_models=hub_models(config.genome.references),
                   stale_when_extended=STALE_WHEN_EXTENDED)
    log.info("run directory: %s", run_dir)
    table = ScoreTable(tokenizer, tasks, config.lm_eval_tasks, saved=run_dir / BASELINES_FILE)
    log.info("scoring the archive's seeds on the test sets:")
    for i in range(len(seeds.names)):
        name, model = seeds.reference(i)
        table.add_reference(name, "source", lambda model=model: model)
    table.rows.extend(trivial_rows(table.tasks[0], table.tokenizer))
    checks["scores"] = table_checks(table.rows)
    for message in checks["scores"]:
        log.warning("%s", message)
    fitness = fitness_batches(config, table.tasks, table.tokenizer, seeds.host)
    base_path = config.genome.base_model if config.niches.task_vectors else None
    base = None if base_path is None else language_model(load(base_path))
    result, summary = niches.search_niches(config, fitness, seeds, layout, run_dir, base)
    settings = niches.niche_config(config, layout)
    inputs = seeds.paths + ([base_path] if base_path else [])
    niches.save_best(result, seeds, run_dir / MERGED_DIRS["niches"], inputs=inputs)
    if is_primary():
        write_text_atomic(run_dir / "provenance.json", json.dumps(
            niches.provenance(result, seeds.names, seeds.paths, settings, base_path), indent=1) + "\n")
        niches.write_plots(result, run_dir)
    table.add(f"natural niches: the archive's best on validation (member {result.best_id})", "evolved",
              load(run_dir / MERGED_DIRS["niches"]))
    return report(config, run_dir, table, fitness, {"search": summary},
                  {"niches": np.asarray([result.best_id])}, {"niches": result.best_validation}, started, checks)


def check_tasks(tasks: list[Task], tokenizer, dedupe: bool) -> dict[str, dict]:
    """What results.json's `checks` says of the tasks before any model is scored
    (`jaxmerge.pipeline.checks`), each finding logged as a warning: {"overlap": {task:
    `split_overlap` and whether the rows are dropped}, "long_references": {task:
    `long_references`}}. (`_evolve_in` adds "scores": `table_checks` of the reference rows.)"""
    overlaps, long = {}, {}
    for task in tasks:
        overlap = split_overlap(task)
        if overlap is not None:
            overlaps[task.name] = {**overlap, "dropped": dedupe and overlap["in_either"] > 0}
            if overlap["in_either"]:
                log.warning("task %s: %s: %s", task.name, describe_overlap(overlap),
                            "dropped from the test split (dedupe: true)" if dedupe else
                            "their scores measure recall of the fitness set; dedupe: true drops them")
        found = long_references(drop_overlap(task) if dedupe else task, tokenizer)  # the rows the run scores
        if found is not None:
            long[task.name] = found
            if found["longer"]:
                log.warning("task %s: %s", task.name, describe_long_references(found))
    return {"overlap": overlaps, "long_references": long}


LOOKUP_ROW = "commonest fitness answer to each question"


def score_baselines(config: EvolveConfig, problem: MergeProblem, table: ScoreTable,
                    overlap: dict[str, dict] | None = None) -> None:
    """The table's reference rows: the sources, the base, answers that need no model, and
    hand-set merges (unless `baselines: false`). The fitness-answer lookup's row says how many
    of the test questions it can look up (`overlap`: `report_overlap`)."""
    sources, method = problem.sources, problem.method
    log.info("scoring the sources and hand-set merges on the test sets:")
    for i, name in enumerate(sources.names):
        in_place = sources.host is not None and i != sources.host_index
        table.add_reference(f"{name} in the VLM's place (its vision, projector)" if in_place else name, "source",
                            functools.partial(sources.scored_as_source, i))
    if sources.host is None:
        table.add_reference("base", "base", lambda: sources.base)
    target = table.tasks[0]
    for row in trivial_rows(target, table.tokenizer):
        seen = (overlap or {}).get(target.name)
        if row["model"] == LOOKUP_ROW and seen is not None:
            shared = 0 if seen["dropped"] else seen["in_fitness"]
            row["model"] = f"{LOOKUP_ROW} (a lookup: {shared} of {len(target.test)} test questions in the fitness set)"
        table.rows.append(row)
    if not config.baselines:
        return
    table.add_reference("TIES (unoptimised: weight 1, density 0.5)", "merge",
                        lambda: problem.hand_set("ties", weight=1.0, density=0.5))
    table.add_reference("DARE-TIES (hand-set: weight 1, density 0.5)", "merge",
                        lambda: problem.hand_set("dare_ties", weight=1.0, density=0.5))
    parameters = get_method(method).parameters
    if method not in ("ties", "dare_ties") and "weight" in {p.name for p in parameters} \
            and all(p.default is not None or p.name == "weight" for p in parameters):
        table.add_reference(f"{method} (hand-set: weight 1)", "merge", lambda: problem.hand_set(method, weight=1.0))


def search_ps(config: EvolveConfig, problem: MergeProblem, layout: Layout | None, run_dir: Path,
              table: ScoreTable) -> PsSearch:
    """The parameter-space search on the tasks' fitness splits (guards' floors set, and the
    fitness reduced to `search.fitness_items` rows per task, first where configured)."""
    pareto = config.search.strategy == "nsga2"
    fitness = fitness_batches(config, table.tasks, table.tokenizer, problem.sources.host)
    search = search_config(config, layout, len(fitness.tasks) if pareto else 1, run_dir,
                           tuple(t.name for t in fitness.tasks) if pareto else ())
    guards = guard_floors(config, fitness, problem.sources) if config.search.guards else {}
    fitness.floors = tuple((name, g["floor"]) for name, g in guards.items())
    if problem.pool is not None:
        pool = problem.describe_pool()
        log.info(f"the pool's {pool['sources']} sources in host memory ({pool['pool_mib']:,.1f} MiB); on the device "
                 f"{pool['on_device']} at a time ({pool['on_device_mib']:,.1f} MiB)")
    fitness_items = None
    if config.search.fitness_items:
        fitness, fitness_items = reduce_fitness(config, fitness, problem, run_dir)
    space = problem.space
    log.info("evolving %s (%d numbers: %s per source and layer group) with %s, %d generations; fitness %s:",
             problem.method, space.num_dims, ", ".join(space.keys), strategy_name(search.strategy),
             search.generations, fitness.describe())
    began = time.perf_counter()
    result = run_search(space, problem.paths, problem.score_fn(fitness), problem.data, fitness.batches,
                        fitness.validation, config=search, out_dir=run_dir / "search",
                        host_fitness=fitness.host_fitness if fitness.uses_host else None, pool=problem.pool)
    summary = search_summary(space, search, result, time.perf_counter() - began)
    if fitness_items is not None:
        summary["fitness_items"] = fitness_items
    if problem.pool is not None:
        summary["pool"] = problem.describe_pool()
    if guards:
        summary["guards"] = guards
    return PsSearch(fitness, search, result, summary)


def guard_floors(config: EvolveConfig, fitness: FitnessBatches, sources: Sources) -> dict:
    """{guard task: {fraction, best source, its validation score, floor}}: each guard's least
    score, a fraction of the best source's on the task's validation split (never the test)."""
    log.info("scoring the sources on the guards' validation splits:")
    scores = [fitness.validation_scores(sources.scored_as_source(i)) for i in range(len(sources.models))]
    guards = {}
    for name, fraction in config.search.guards:
        best = max(range(len(scores)), key=lambda i: scores[i][name])
        guards[name] = {"fraction": fraction, "source": sources.names[best], "source_validation": scores[best][name],
                        "floor": fraction * scores[best][name]}
        log.info("  %s: at least %g x %.3f (%s) = %.3f", name, fraction, scores[best][name], sources.names[best],
                 guards[name]["floor"])
    return guards


def save_ps_merge(config: EvolveConfig, problem: MergeProblem, ps: PsSearch, run_dir: Path, table: ScoreTable,
                  layout: Layout | None):
    """The evolved PS merge saved (its values rounded as in its recipe) with recipe.yml and
    plots; the checkpoint on disk is what gets scored, and returned (PS+DFS starts from it)."""
    merged_dir = run_dir / MERGED_DIRS["ps"]
    recipe = problem.export(ps.result.best_genome, merged_dir, inputs=[*config.genome.models, config.genome.base_model])
    genome_table = problem.space.table(problem.space.rounded(ps.result.best_genome), list(problem.sources.names))
    ps.summary["genome_table"] = genome_table
    log.info("the evolved genome (%s):\n%s", problem.method, genome_table)
    if is_primary():
        from jaxmerge.search.report import plot_genome, plot_history  # matplotlib: only where plots are drawn

        write_text_atomic(run_dir / "recipe.yml", recipe)  # equal to merged/mergekit_config.yml
        with atomic_file(run_dir / "fitness.png") as path:
            pareto = config.search.strategy == "nsga2"
            plot_history(ps.result.history, path, [t.name for t in ps.fitness.tasks] if pareto else None)
        with atomic_file(run_dir / "genome.png") as path:
            plot_genome(problem.space, ps.result.best_genome, path, problem.sources.names)
    merged = loader(config, layout)(merged_dir)
    table.add(f"evolved PS merge ({problem.method}, {strategy_name(ps.search.strategy)})", "evolved", merged)
    return merged


def score_front(problem: MergeProblem, ps: PsSearch, run_dir: Path, table: ScoreTable) -> list[dict]:
    """A Pareto search's front: each member (its genome rounded as in its recipe) scored on
    the test sets (a table row each), its recipe written to front/<k>/recipe.yml (`jaxmerge
    merge` or mergekit makes its checkpoint), and the front plotted (front.png)."""
    result, fitness, sources = ps.result, ps.fitness, problem.sources
    names = [t.name for t in fitness.tasks]
    members = []
    for k, raw in enumerate(result.front):
        genome = problem.space.rounded(raw)
        path = Path("front") / str(k) / "recipe.yml"
        if is_primary():
            (run_dir / path).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / path, problem.recipe(genome))
        scores = dict(zip(names, (100 * result.front_validation[k]).round(2).tolist(), strict=True))
        table.add(f"front member {k} (validation " + ", ".join(f"{n} {v:.1f}" for n, v in scores.items()) + ")",
                  "front", problem.model(problem.merge(genome)))
        members.append({"member": k, "validation": scores, "genome": problem.space.describe(genome),
                        "recipe": str(path)})
    if is_primary():
        from jaxmerge.search.report import plot_front

        reference = {}  # the sources where they sit on the same validation splits
        if not fitness.uses_host:
            for i, name in enumerate(sources.names):
                scores = fitness.validation_scores(sources.scored_as_source(i))
                reference[name] = np.array([scores[n] for n in names])
        with atomic_file(run_dir / "front.png") as path:
            plot_front(result.population_validation, result.front_validation, names, path, reference)
    return members


def text_model_type(model) -> str:
    """The layers' architecture as an HF model_type ("mistral", "qwen2", ...), for a layer path's modeling file."""
    if isinstance(model, VisionLanguageModel):
        return model.config.text_model_type
    return architecture_by_name(model.origin.architecture).model_type


def search_layer_paths(config: EvolveConfig, problem: MergeProblem, ps: PsSearch, ps_model, run_dir: Path,
                       table: ScoreTable, layout: Layout | None) -> dict[str, tuple[dict, SearchResult]]:
    """The data-flow-space searches `dfs.mode` asks for, on the PS search's fitness: DFS
    through the first two sources' layers, PS+DFS through the PS merge's and a partner's
    (by default the first source that is not the VLM); each saved, scored and plotted."""
    names = {"off": (), "dfs": ("dfs",), "ps+dfs": ("ps_dfs",), "both": ("dfs", "ps_dfs")}[config.dfs.mode]
    if not names:
        return {}
    sources, load = problem.sources, loader(config, layout)
    partner = config.dfs.partner if config.dfs.partner is not None else sources.partner()
    models = {"dfs": ((sources.model(0), sources.model(1)), tuple(sources.names[:2]), sources.host),
              "ps_dfs": ((language_model(ps_model), sources.model(partner)), ("PS merge", sources.names[partner]),
                         ps_model if sources.host is not None else None)}
    found = {}
    for name in names:
        pair, labels, host = models[name]
        job = PathSearch(name, pair, labels, host, text_model_type(host if host is not None else pair[0]),
                         tokenizer_dir(config))
        out = run_dir / MERGED_DIRS[name]
        found[name] = evolve_path(job, config.dfs, ps.search, ps.fitness, out, run_dir)
        path_lm = load(out)
        table.add(PATH_ROW_LABELS[name], "evolved", with_language_model(host, path_lm) if host is not None
                  else path_lm)
    return found


def report(config: EvolveConfig, run_dir: Path, table: ScoreTable, fitness: FitnessBatches, summaries: dict,
           genomes: dict, validation: dict, started: float, checks: dict | None = None) -> EvolveResult:
    """results.json and results.md (the table, the searches, the best on validation), logged."""
    best = max(validation, key=lambda n: validation[n])
    log.info("best on validation: %s (%.1f; %s)", best, 100 * validation[best],
             ", ".join(f"{n} {100 * v:.1f}" for n, v in validation.items()))
    tasks, genome = table.tasks, config.genome
    written = dict(genome.references)  # a Hub model as its reference, its commit in hub_models
    results = {
        "experiment": config.name, "seed": config.search.seed,
        "models": {"base": written.get(genome.base_model, genome.base_model),
                   **{name: written.get(m, m) for name, m in zip(genome.source_names(), genome.models, strict=True)}},
        "hub_models": hub_models(genome.references),
        "splits": {t.name: {split: len(getattr(t, split)) for split in ("fitness", "validation", "test")
                            if getattr(t, split) is not None} for t in tasks},
        "metrics": {t.name: t.spec.metric + (f" ({t.spec.language}{', strict' if t.spec.language_strict else ''})"
                                            if t.spec.language else "") for t in tasks},
        "fitness": fitness.describe(),
        "lm_eval": {t.task.name: {"metric": t.task.metric, "output_type": t.output_type,
                                  "fitness_documents": len(t.fitness), "test_documents": len(t.test_ids),
                                  "test_ids": list(t.test_ids), "apply_chat_template": t.apply_chat_template,
                                  "num_fewshot": t.task.num_fewshot} for t in config.lm_eval_tasks},
        "rows": table.rows,
        "checks": checks or {},
        **summaries,
        "best": {"name": best, "checkpoint": MERGED_DIRS[best],
                 "validation": {n: 100 * v for n, v in validation.items()}},
        "seconds": time.perf_counter() - started,
    }
    log.info("total %.0f s", results["seconds"])
    search = summaries.get("search", {})
    sections = {"The evolved genome (PS merge)": search["genome_table"]} if "genome_table" in search else {}
    if "archive_table" in search:
        sections["The archive (natural niches): fitness per task and validation"] = search["archive_table"]
    markdown = write_results(run_dir, results, scored_columns(table.rows), sections)
    log.info("\n%s\n\nwrote %s", markdown, run_dir)
    return EvolveResult(run_dir, genomes, table.rows, results, best)
