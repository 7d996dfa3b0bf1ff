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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxmerge
from jaxmerge.architectures import architecture_by_name, layer_path_architecture, text_architecture
from jaxmerge.checkpoint import check_output_dir, derived_origin, load_tokenizer, read_config, staged_output
from jaxmerge.eval.tasks import FitnessBatches, evaluate, prepare_task, trivial_rows
from jaxmerge.eval.token_metrics import TokenTable
from jaxmerge.merge import broadcast_params, flat_params, get_method, merge_params, prepare, stack_sources
from jaxmerge.merge.tree import select_sources, with_language_model, with_language_model_params, with_params
from jaxmerge.models.interfaces import CausalLM, VisionLanguageModel, language_model
from jaxmerge.models.layer_path import compact_path, layer_pool, path_model, split_hops, with_hops
from jaxmerge.parallel import Layout, is_primary
from jaxmerge.pipeline.config import EvolveConfig, is_vlm_config, validate
from jaxmerge.pipeline.results import write_results
from jaxmerge.pipeline.rundir import atomic_file, create_run_dir, discard_unstarted_run_dir, fingerprint_inputs, \
    plan_run_dir, run_lock, write_text_atomic
from jaxmerge.search import GenomeSpace, SearchConfig, default_population_size, run_search
from jaxmerge.search.evolution import strategy_name
from jaxmerge.search.export import recipe_yaml
from jaxmerge.search.path_genome import PathSpace
from jaxmerge.search.pool import SourcePool, source_axis, stack_in_host_memory

PATH_ROW_LABELS = {"dfs": "evolved DFS merge (layer path)", "ps_dfs": "evolved PS+DFS merge"}
MERGED_DIRS = {"ps": "merged", "dfs": "merged_dfs", "ps_dfs": "merged_ps_dfs"}


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
        renamed (`jaxmerge.checkpoint.staged_output`)."""
        out = Path(out_dir)
        check_output_dir(out, [self.run_dir], overwrite=False)
        with staged_output(out) as staging:
            shutil.copytree(self.checkpoint(name), staging, dirs_exist_ok=True)
        return out


@dataclasses.dataclass(eq=False)
class Sources:
    """The loaded models: the language models merged (a VLM's in its place), the base, the
    VLM hosting the merge if there is one, and the tokenizer."""
    models: list[CausalLM]
    base: CausalLM
    names: list[str]
    paths: list[str]
    host: VisionLanguageModel | None
    host_index: int | None
    tokenizer: object
    # A pool in host memory (`load_pool`): the stacked sources, and the models whose own
    # arrays were let go for their rows there ({index: {path: dtype}}; see `model`).
    stack: dict[str, np.ndarray] | None = None
    hollow: dict[int, dict] = dataclasses.field(default_factory=dict)

    def model(self, index: int) -> CausalLM:
        """Source `index`'s language model (one whose arrays went, rebuilt from its pool row)."""
        if index not in self.hollow:
            return self.models[index]
        dtypes = self.hollow[index]
        return with_params(self.models[index], {p: jnp.asarray(np.take(x, index, source_axis(p)), dtypes[p])
                                                for p, x in self.stack.items()})

    def with_language_params(self, flat: dict):
        """The merged model: the VLM with merged language model parameters, or the base with them."""
        if self.host is not None:
            return with_language_model_params(self.host, flat)
        return with_params(self.base, flat)

    def scored_as_source(self, index: int):
        """Source `index` as the table scores it: an LLM in the VLM's place when there is one."""
        if self.host is None or index == self.host_index:
            return self.host if index == self.host_index else self.model(index)
        return with_language_model_params(self.host, flat_params(self.model(index)))

    def partner(self) -> int:
        """PS+DFS's model B by default: the first source that is not the VLM."""
        return next(i for i in range(len(self.models)) if i != self.host_index)

    def recipe_sources(self) -> list[str]:
        return [f"{p} (language model)" if i == self.host_index else p for i, p in enumerate(self.paths)]


def default_layout(layout: str | None) -> Layout | None:
    """The configured layout, or every device on the population axis when there are several."""
    if layout is not None:
        return Layout.parse(layout)
    return Layout(jax.device_count(), 1) if jax.device_count() > 1 else None


def vlm_index(config: EvolveConfig) -> int | None:
    """Which source is a VLM (from its config.json), if one is."""
    return next((i for i, m in enumerate(config.genome.models) if is_vlm_config(read_config(Path(m)))), None)


def tokenizer_dir(config: EvolveConfig) -> str:
    """The tokenizer's checkpoint: tokenizer_source, else the VLM's (its image token), else the base's."""
    host = vlm_index(config)
    return config.genome.tokenizer_source or (config.genome.models[host] if host is not None
                                              else config.genome.base_model)


def in_host_memory() -> contextlib.AbstractContextManager:
    """Arrays made inside go to host memory (the CPU backend): a pool's sources."""
    return jax.default_device(jax.devices("cpu")[0])


def load_sources(config: EvolveConfig, load, tokenizer) -> Sources:
    genome = config.genome
    loaded = [load(p) for p in genome.models]
    hosts = [i for i, m in enumerate(loaded) if isinstance(m, VisionLanguageModel)]
    host_index = hosts[0] if hosts else None
    return Sources([language_model(m) for m in loaded], load(genome.base_model), list(genome.source_names()),
                   list(genome.models), loaded[host_index] if hosts else None, host_index, tokenizer)


def hollowed(model):
    """`model` without its parameters' arrays (their shapes and dtypes kept)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    hollow = nnx.merge(graphdef, abstract, rest)
    hollow.origin = model.origin
    return hollow


def load_pool(config: EvolveConfig, load, tokenizer) -> Sources:
    """`load_sources` for a pool in host memory (`search.sources_on_host`): the sources loaded
    one at a time (unsharded, the CPU backend) into one stack (`Sources.stack`), each source's
    own arrays let go once its row holds them (its vocabulary the base's; a VLM's language
    model stays in its VLM), so host memory holds the pool once."""
    genome = config.genome
    base = load(genome.base_model)
    base_flat = flat_params(base)
    models, hollow, host, host_index = [], {}, None, None

    def rows():
        nonlocal host, host_index
        for i, path in enumerate(genome.models):
            with in_host_memory():
                loaded = load(path, sharding=None)
            if isinstance(loaded, VisionLanguageModel) and host is None:
                host, host_index = loaded, i
            lm = language_model(loaded)
            flat = flat_params(lm)
            yield flat
            if i != host_index and set(flat) == set(base_flat) and all(flat[p].shape == base_flat[p].shape
                                                                          for p in base_flat):
                hollow[i] = {p: flat[p].dtype for p in base_flat}
                lm = hollowed(lm)
            models.append(lm)

    with in_host_memory():
        stack = stack_in_host_memory(base_flat, rows(), len(genome.models))
    return Sources(models, base, list(genome.source_names()), list(genome.models), host, host_index, tokenizer,
                   stack=stack, hollow=hollow)


def processor_for(config: EvolveConfig):
    """The VLM's transformers processor, where image rows are read from files."""
    from jaxmerge.eval.data import DataSource

    host = vlm_index(config)
    if host is None or not any(isinstance(getattr(t, s), DataSource) for t in config.tasks
                               for s in ("fitness", "validation", "test")):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(config.genome.models[host])


def genome_space(config: EvolveConfig, num_sources: int, num_layers: int) -> GenomeSpace:
    genome, evolved = config.genome, config.genome.evolved()
    groups = genome.layer_groups or (num_layers // genome.layer_granularity if genome.layer_granularity else 1)
    bounds = (("weight", -2.0, 2.0),) if genome.allow_negative_weights else ()
    return GenomeSpace(genome.merge_method, num_sources=num_sources, num_layers=num_layers, evolve=evolved,
                       layer_groups=groups, bounds=bounds, families=genome.filters, normalize=genome.normalize,
                       fixed=genome.fixed, gates=genome.gates, source_cost=genome.source_cost,
                       max_sources=genome.max_sources,
                       initial_values=tuple((n, v) for n, v in config.search.initial if n in evolved))


def search_summary(space, search: SearchConfig, result, seconds: float) -> dict:
    """What results.json says of a search, rates included (printed too)."""
    instance = not isinstance(search.strategy, (str, type))  # an evosax algorithm made by the caller
    population = search.strategy.population_size if instance else \
        search.population_size or default_population_size(space.num_dims)
    done, spent = len(result.history), sum(h["seconds"] for h in result.history)
    summary = {**space.summary(), "strategy": strategy_name(search.strategy), "generations": search.generations,
               "population": population, "best_validation": 100 * result.best_validation,
               "genome": space.describe(result.best_genome), "seconds": seconds,
               "generations_per_minute": 60 * done / spent, "candidates_per_second": done * population / spent}
    print(f"\nsearch: {done} generations x {population} candidates in {spent:.0f} s "
          f"({summary['generations_per_minute']:.1f} generations/min, {summary['candidates_per_second']:.1f} "
          f"candidates/s, first generation's compile included); evolved {json.dumps(summary['genome'])}")
    return summary


def text_model_type(model) -> str:
    """The layers' architecture as an HF model_type ("mistral", "qwen2", ...), for a layer path's modeling file."""
    if isinstance(model, VisionLanguageModel):
        return model.config.text_model_type
    return architecture_by_name(model.origin.architecture).model_type


def evolve(config: EvolveConfig | None = None, **values) -> EvolveResult:
    """Runs an evolutionary merge end to end (see the module docstring). `config`, or keyword
    arguments that build one (`EvolveConfig.build`): sections as dataclasses or dicts."""
    config = config if config is not None else EvolveConfig.build(**values)
    validate(config)
    if config.distributed:
        from jaxmerge import parallel
        parallel.initialize()
    started = time.perf_counter()
    # Everything that can fail on the user's input fails before a model loads or anything is
    # written: the run directory is checked (created once the models are loaded; never an
    # input, nor inside one), the data read, the prompts rendered and the answers checked.
    # The run directory is held by this process from its check to the end of the run.
    record, inputs = config.record(), config.input_paths()
    fingerprints = fingerprint_inputs(inputs)
    run_dir = plan_run_dir(config.out, config.name, record, fingerprints, inputs)
    with run_lock(run_dir) if is_primary() else contextlib.nullcontext():
        plan_run_dir(str(run_dir), config.name, record, fingerprints, inputs)  # again, now that it is ours
        new = not run_dir.exists()
        try:
            return _evolve_in(run_dir, config, record, fingerprints, started)
        except BaseException:
            if new and is_primary():  # a run that failed before its search began leaves nothing behind
                discard_unstarted_run_dir(run_dir)
            raise


def _evolve_in(run_dir: Path, config: EvolveConfig, record: dict, fingerprints: dict, started: float) -> EvolveResult:
    """`evolve` in its checked and held run directory."""
    tokenizer = load_tokenizer(tokenizer_dir(config))
    processor = processor_for(config)
    tasks = [prepare_task(spec, tokenizer, processor, config.search.validation_size, Path(config.base_dir or "."))
             for spec in config.tasks]
    layout = default_layout(config.layout)
    load = functools.partial(jaxmerge.load, dtype=config.genome.dtype, allow_non_finite=config.genome.allow_non_finite,
                             sharding=layout.mesh() if layout is not None and layout.model > 1 else None)
    sources = (load_pool if config.search.sources_on_host else load_sources)(config, load, tokenizer)
    create_run_dir(run_dir, config.name, record, fingerprints)
    print(f"run directory: {run_dir}")
    rows: list[dict] = []

    def add_row(name: str, kind: str, model) -> None:
        began = time.perf_counter()
        scores, samples = evaluate(model, tokenizer, tasks)
        rows.append({"model": name, "kind": kind, "scores": scores, "samples": samples})
        print(f"  {name:44} " + "  ".join(f"{t} {v:5.1f}" for t, v in scores.items())
              + f"   ({time.perf_counter() - began:.0f} s)")

    base = flat_params(sources.base)
    on_host = in_host_memory if config.search.sources_on_host else contextlib.nullcontext
    stacked = sources.stack if sources.stack is not None else \
        stack_sources(base, [flat_params(m) for m in sources.models])
    key = jax.random.key(config.search.seed)
    method = config.genome.merge_method

    def hand_set(name: str, **parameters):
        params = broadcast_params(name, base, len(sources.models), **parameters)
        with on_host():
            return sources.with_language_params(merge_params(name, base, stacked, params, key=key))

    print("scoring the sources and hand-set merges on the test sets:")
    for i, name in enumerate(sources.names):
        in_place = sources.host is not None and i != sources.host_index
        add_row(f"{name} in the VLM's place (its vision, projector)" if in_place else name, "source",
                sources.scored_as_source(i))
    if sources.host is None:
        add_row("base", "base", sources.base)
    rows += trivial_rows(tasks[0], tokenizer)
    if config.baselines:
        add_row("TIES (unoptimised: weight 1, density 0.5)", "merge", hand_set("ties", weight=1.0, density=0.5))
        add_row("DARE-TIES (hand-set: weight 1, density 0.5)", "merge", hand_set("dare_ties", weight=1.0, density=0.5))
        if method not in ("ties", "dare_ties") and "weight" in {p.name for p in get_method(method).parameters} \
                and all(p.default is not None or p.name == "weight" for p in get_method(method).parameters):
            add_row(f"{method} (hand-set: weight 1)", "merge", hand_set(method, weight=1.0))

    # ---- the PS search
    space = genome_space(config, len(sources.models), sources.base.config.num_layers)
    table = TokenTable.from_tokenizer(tokenizer, languages=tuple(sorted({t.spec.language for t in tasks
                                                                          if t.spec.language})))
    pareto = config.search.strategy == "nsga2"
    fitness = FitnessBatches(tasks, tokenizer, table, config.search.minibatch, vlm=sources.host, objectives=pareto,
                             guard_penalty=config.search.guard_penalty)
    search = SearchConfig(generations=config.search.generations, strategy=config.search.strategy,
                          population_size=config.search.population, sigma=config.search.sigma,
                          seed=config.search.seed, chunk_size=config.search.chunk_size, layout=layout,
                          objectives=len(fitness.tasks) if pareto else 1)
    guards = guard_floors(config, fitness, sources) if config.search.guards else {}
    fitness.floors = tuple((name, g["floor"]) for name, g in guards.items())
    with on_host():
        per_source = {"sources": stacked, "stats": prepare(method, base, stacked)}
    pool = None
    if config.search.sources_on_host:  # a few sources on the device at a time, each candidate's own
        pool = SourcePool.from_arrays(per_source, capacity=space.max_sources)
        print(f"the pool's {pool.num_sources} sources in host memory ({pool.nbytes() / 2**20:,.1f} MiB); on the device "
              f"{pool.capacity} at a time ({pool.nbytes(pool.capacity) / 2**20:,.1f} MiB)")
        data = {"base": base}
    else:
        data = {"base": base, **per_source}
    host_graph = None
    if sources.host is not None:  # the VLM's own parameters as data, never closed over
        host_graph, data["vlm"] = nnx.split(sources.host)

    def build_ps(params, data, key):
        if "slots" in data:  # from a pool: the candidate's sources in the device's slots
            params = select_sources(method, params, data["slots"])
        merged = merge_params(method, data["base"], data["sources"], params, stats=data["stats"], key=key,
                              options=space.options())
        if host_graph is not None:
            return with_language_model_params(nnx.merge(host_graph, data["vlm"]), merged)
        return with_params(sources.base, merged)

    def scorer(build):
        def score(params, data, batch, key):
            return fitness.score(build(params, data, key), batch)
        return score

    if config.search.fitness_items:
        fitness, summaries_irt = reduce_fitness(config, fitness, sources, space, build_ps, data, sorted(base), key,
                                                run_dir, pool)
    host_fitness = fitness.host_fitness if fitness.uses_host else None
    print(f"evolving {method} ({space.num_dims} numbers: {', '.join(space.keys)} per source and layer group) "
          f"with {strategy_name(search.strategy)}, {search.generations} generations; fitness {fitness.describe()}:")
    began = time.perf_counter()
    result = run_search(space, sorted(base), scorer(build_ps), data, fitness.batches, fitness.validation,
                        config=search, out_dir=run_dir / "search", host_fitness=host_fitness, pool=pool)
    summaries = {"search": search_summary(space, search, result, time.perf_counter() - began)}
    if config.search.fitness_items:
        summaries["search"]["fitness_items"] = summaries_irt
    if pool is not None:
        summaries["search"]["pool"] = {"sources": pool.num_sources, "on_device": pool.capacity,
                                       "pool_mib": pool.nbytes() / 2**20,
                                       "on_device_mib": pool.nbytes(pool.capacity) / 2**20,
                                       "sources_copied": pool.transfers}
    if guards:
        summaries["search"]["guards"] = guards
    genomes, validation = {"ps": np.asarray(result.best_genome)}, {"ps": result.best_validation}

    # The merged model: the genome's values rounded as in the recipe, merged, saved; the
    # checkpoint on disk is what gets scored.
    genome = jnp.asarray(np.round(np.asarray(result.best_genome, np.float64), 6), jnp.float32)
    recipe = recipe_yaml(space, genome, config.genome.base_model, sources.recipe_sources())

    def merge_genome(genome):
        """One candidate's merge: from the whole stack, or from its sources in the pool's slots."""
        params = space.decode(genome, sorted(base))
        if pool is None:
            return merge_params(method, base, stacked, params, key=key, options=space.options())
        resident = pool.resident_for(space.sources_used(genome))
        return merge_params(method, base, resident["sources"], select_sources(method, params, resident["slots"]),
                            stats=resident["stats"], key=key, options=space.options())

    merged = merge_genome(genome)
    merged_dir = run_dir / MERGED_DIRS["ps"]  # replaced whole if a resumed run had written it
    jaxmerge.save(sources.with_language_params(merged), merged_dir, overwrite=True,
                  inputs=[*config.genome.models, config.genome.base_model],
                  extra_files={"mergekit_config.yml": recipe})
    if is_primary():
        from jaxmerge.search.report import plot_genome, plot_history  # matplotlib: only where plots are drawn

        write_text_atomic(run_dir / "recipe.yml", recipe)
        with atomic_file(run_dir / "fitness.png") as path:
            plot_history(result.history, path, [t.name for t in fitness.tasks] if pareto else None)
        with atomic_file(run_dir / "genome.png") as path:
            plot_genome(space, result.best_genome, path, sources.names)
    add_row(f"evolved PS merge ({method}, {strategy_name(search.strategy)})", "evolved", load(merged_dir))
    if result.front is not None:
        summaries["front"] = score_front(result, space, fitness, sources, run_dir, config, add_row, merge_genome)

    # ---- DFS and PS+DFS: layer paths on the same fitness
    modes = {"off": (), "dfs": ("dfs",), "ps+dfs": ("ps_dfs",), "both": ("dfs", "ps_dfs")}[config.dfs.mode]
    if modes:
        ps_model = load(merged_dir)
        partner = config.dfs.partner if config.dfs.partner is not None else sources.partner()
        pools = {"dfs": ([sources.model(0), sources.model(1)], sources.names[:2],
                         sources.host if sources.host is not None else None),
                 "ps_dfs": ([language_model(ps_model), sources.model(partner)], ["PS merge", sources.names[partner]],
                            ps_model if sources.host is not None else None)}
        path_tokenizer = tokenizer_dir(config)
        for name in modes:
            models, names, host = pools[name]
            out, summaries[f"search_{name}"], best = evolve_path(
                config, search, name, models, names, scorer, fitness, run_dir, host, host_fitness,
                text_model_type(host if host is not None else models[0]), path_tokenizer)
            genomes[name], validation[name] = best.best_genome, best.best_validation
            path_lm = load(out)
            add_row(PATH_ROW_LABELS[name], "evolved", with_language_model(host, path_lm) if host is not None
                    else path_lm)

    best_name = max(validation, key=lambda n: validation[n])
    print(f"best on validation: {best_name} ({100 * validation[best_name]:.1f}; "
          + ", ".join(f"{n} {100 * v:.1f}" for n, v in validation.items()) + ")")
    results = {
        "experiment": config.name, "seed": config.search.seed,
        "models": {"base": config.genome.base_model, **dict(zip(sources.names, config.genome.models))},
        "splits": {t.name: {split: len(getattr(t, split)) for split in ("fitness", "validation", "test")
                            if getattr(t, split) is not None} for t in tasks},
        "metrics": {t.name: t.spec.metric + (f" ({t.spec.language})" if t.spec.language else "") for t in tasks},
        "fitness": fitness.describe(),
        "rows": rows,
        **summaries,
        "best": {"name": best_name, "checkpoint": MERGED_DIRS[best_name],
                 "validation": {n: 100 * v for n, v in validation.items()}},
        "seconds": time.perf_counter() - started,
    }
    print(f"total {results['seconds']:.0f} s")
    markdown = write_results(run_dir, results, list(rows[0]["scores"]))
    print("\n" + markdown + f"\n\nwrote {run_dir}")
    return EvolveResult(run_dir, genomes, rows, results, best_name)


def reduce_fitness(config: EvolveConfig, fitness: FitnessBatches, sources: Sources, space: GenomeSpace, build,
                   data, paths, key, run_dir: Path, pool: SourcePool | None = None) -> tuple[FitnessBatches, dict]:
    """The fitness on `search.fitness_items` rows per task, chosen once (jaxmerge.eval.irt):
    every fitness row the batches cover is scored for the sources and `search.calibration`
    candidates drawn as the search's first generation is (initial + sigma x N(0, 1)); a 2PL
    fitted per task to those scores picks anchor rows spread over its difficulties, and
    scores the search's candidates there as estimates of the whole split's mean. Returns it
    and what results.json records (rows, calibration models, seconds, and the estimate's
    error on the calibration models themselves); the calibration scores go to
    run_dir/fitness_items.npz."""
    from jaxmerge.eval import irt

    began = time.perf_counter()
    covered = fitness.covered_rows()
    k = config.search.fitness_items
    print(f"choosing {k} fitness rows per task by item response theory: scoring "
          + ", ".join(f"{n} {c} rows" for n, c in covered.items())
          + f" for {len(sources.models)} sources and {config.search.calibration} random candidates")
    sigma = config.search.sigma
    genomes = space.initial()[None] + sigma * jax.random.normal(jax.random.fold_in(key, 7),
                                                                (config.search.calibration, space.num_dims))

    @jax.jit
    def candidate_rows(genome, data, batch, key):
        model = build(space.decode(genome, paths), data, key)
        return {t.name: fitness.row_scores(t, model, batch[t.name]) for t in fitness.tasks}

    responses = {t.name: [] for t in fitness.tasks}  # per model: [covered rows]
    for i in range(len(sources.models)):
        model = sources.scored_as_source(i)
        rows = [{t.name: fitness.row_scores(t, model, b[t.name]) for t in fitness.tasks} for b in fitness.batches]
        for name in responses:
            responses[name].append(np.concatenate([np.asarray(r[name]) for r in rows]))
    for j, genome in enumerate(genomes):
        own = data if pool is None else {**data, **pool.resident_for(space.sources_used(genome))}
        rows = [candidate_rows(genome, own, b, jax.random.fold_in(key, j)) for b in fitness.batches]
        for name in responses:
            responses[name].append(np.concatenate([np.asarray(r[name]) for r in rows]))
    chosen, summary = {}, {}
    if is_primary():  # what the choice was made from, for a later look
        with atomic_file(run_dir / "fitness_items.npz") as path:
            np.savez(path, **{name: np.stack(r) for name, r in responses.items()})
    for name, scores in responses.items():
        scores = np.clip(np.stack(scores).astype(np.float32), 0.0, 1.0)  # [M, rows]
        abilities, items = irt.fit(scores)
        prior = irt.candidate_prior(abilities[len(sources.models):] if config.search.calibration else abilities)
        rows = irt.select_items(items, min(k, scores.shape[1]))
        estimates = jax.vmap(irt.full_set_estimate, in_axes=(0, None, None, None, None))(
            jnp.asarray(scores[:, rows]), jnp.asarray(rows), items, *prior)
        chosen[name] = (rows, items, prior)
        summary[name] = {"rows": len(rows), "of": scores.shape[1], "calibration_models": scores.shape[0],
                         "estimate_error": float(np.mean(np.abs(np.asarray(estimates) - scores.mean(1))))}
        print(f"  {name}: {len(rows)} of {scores.shape[1]} rows; on the calibration models the estimate is off by "
              f"{summary[name]['estimate_error']:.3f} on average")
    reduced = fitness.reduced(chosen)
    seconds = time.perf_counter() - began
    print(f"  ({seconds:.0f} s)")
    return reduced, {"tasks": summary, "seconds": seconds}


def guard_floors(config: EvolveConfig, fitness: FitnessBatches, sources: Sources) -> dict:
    """{guard task: {fraction, best source, its validation score, floor}}: each guard's least
    score, a fraction of the best source's on the task's validation split (never the test)."""
    print("scoring the sources on the guards' validation splits:")
    scores = [fitness.validation_scores(sources.scored_as_source(i)) for i in range(len(sources.models))]
    guards = {}
    for name, fraction in config.search.guards:
        best = max(range(len(scores)), key=lambda i: scores[i][name])
        guards[name] = {"fraction": fraction, "source": sources.names[best], "source_validation": scores[best][name],
                        "floor": fraction * scores[best][name]}
        print(f"  {name}: at least {fraction:g} x {scores[best][name]:.3f} ({sources.names[best]}) = "
              f"{guards[name]['floor']:.3f}")
    return guards


def score_front(result, space, fitness: FitnessBatches, sources: Sources, run_dir: Path, config: EvolveConfig,
                add_row, merge) -> list[dict]:
    """A Pareto search's front: each member (its genome rounded as in its recipe) scored on
    the test sets (a table row each), its recipe written to front/<k>/recipe.yml (`jaxmerge
    merge` or mergekit makes its checkpoint), and the front plotted (front.png)."""
    names = [t.name for t in fitness.tasks]
    members = []
    for k, raw in enumerate(result.front):
        genome = jnp.asarray(np.round(np.asarray(raw, np.float64), 6), jnp.float32)
        recipe = recipe_yaml(space, genome, config.genome.base_model, sources.recipe_sources())
        path = Path("front") / str(k) / "recipe.yml"
        if is_primary():
            (run_dir / path).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / path, recipe)
        scores = dict(zip(names, (100 * result.front_validation[k]).round(2).tolist()))
        add_row(f"front member {k} (validation " + ", ".join(f"{n} {v:.1f}" for n, v in scores.items()) + ")",
                "front", sources.with_language_params(merge(genome)))
        members.append({"member": k, "validation": scores, "genome": space.describe(genome), "recipe": str(path)})
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


def evolve_path(config: EvolveConfig, ps_search: SearchConfig, name: str, models: list, names: list[str], scorer,
                fitness: FitnessBatches, run_dir: Path, host, host_fitness, model_type: str, tokenizer_dir):
    """A layer path through models[0]'s (A: embeddings, head, the path's ends) and
    models[1]'s layers, evolved on the run's fitness (inside `host`, the VLM, when there is
    one), saved to run_dir/merged_<name> with its modeling file and plotted. Returns (the
    saved directory, the search summary, the search result)."""
    dfs = config.dfs
    space = PathSpace(tuple(m.config.num_layers for m in models), repeats=dfs.repeats, scales=dfs.scales,
                      off_init=dfs.off_init)
    search = dataclasses.replace(ps_search, generations=dfs.generations, population_size=dfs.population,
                                 chunk_size=dfs.chunk_size)
    model = path_model(models[0], layer_pool(models), space.num_hops, model_type)
    _, state, rebuild = split_hops(with_language_model(host, model) if host is not None else model)

    def build(params, data, key):
        return rebuild(data["path_model"], params["layer"], params["scale"], params["valid"])

    print(f"evolving a layer path through {' and '.join(names)} ({space.num_dims} numbers: {space.num_slots} "
          f"slot indicators, {space.scales} scales) with {strategy_name(search.strategy)}, {search.generations} "
          "generations:")
    began = time.perf_counter()
    result = run_search(space, (), scorer(build), {"path_model": state}, fitness.batches, fitness.validation,
                        config=search, out_dir=run_dir / f"search_{name}", host_fitness=host_fitness)
    summary = search_summary(space, search, result, time.perf_counter() - began)
    summary["path_names"] = [space.layer_name(i) for i, _ in summary["genome"]["path"]]
    hops = space.decode(jnp.asarray(result.best_genome))
    out = run_dir / MERGED_DIRS[name]  # replaced whole if a resumed run had written it
    exported = compact_path(with_hops(model, hops["layer"], hops["scale"], hops["valid"]))
    architecture = layer_path_architecture(text_architecture(model_type))
    exported.origin = derived_origin(models[0], architecture)  # model A's token ids
    jaxmerge.save(exported, out, overwrite=True, architecture=architecture, tokenizer_dir=tokenizer_dir)
    if is_primary():
        from jaxmerge.search.report import plot_history, plot_path

        with atomic_file(run_dir / f"fitness_{name}.png") as path:
            plot_history(result.history, path)
        with atomic_file(run_dir / f"path_{name}.png") as path:
            plot_path(space, result.best_genome, path, names)
    return out, summary, result

