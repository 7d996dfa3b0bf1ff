"""The parameter-space merge a run searches, as one object.

`MergeProblem` owns what every candidate's merge needs: the base, the stacked sources and
the method's statistics of them (or a `SourcePool` of them in host memory), the VLM that
hosts the merge if there is one, the genome space, the method and the merge key. It is the
one place where a genome becomes a merged model:

    problem = MergeProblem.create(sources, space, method, key)
    score = problem.score_fn(fitness)       # (params, data, batch, key) -> score, for run_search
    run_search(problem.space, problem.paths, score, problem.data, ...)
    flat = problem.merge(genome)            # the same merge, outside the search
    recipe = problem.export(genome, out_dir, inputs=...)  # rounded as its recipe, saved

`evolve` (pipeline/runner.py), the benchmarks and the tests all build the same object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx

from jaxmerge.eval.tasks import FitnessBatches, Task, prepare_task
from jaxmerge.eval.token_metrics import TokenTable
from jaxmerge.merge import broadcast_params, flat_params, merge_params, merge_plan, prepare, stack_sources
from jaxmerge.merge.tree import select_sources, with_language_model_params, with_params
from jaxmerge.parallel import Layout
from jaxmerge.pipeline.checks import drop_overlap
from jaxmerge.pipeline.config import EvolveConfig
from jaxmerge.pipeline.sources import Sources, in_host_memory
from jaxmerge.saving import save
from jaxmerge.search import GenomeSpace, SearchConfig
from jaxmerge.search.export import genome_recipe
from jaxmerge.search.pool import SourcePool
from jaxmerge.search.strategies import NATURAL_NICHES
from jaxmerge.search.tracking import TrackingConfig

Flat = dict[str, jax.Array]


# The merges outside the search (hand-set baselines, the export, a front's members) as one
# program each: run eagerly, every operation of every tensor compiled on its own (hundreds of
# compilations) and its result held whole, where a program fuses them and bounds its temporaries.
@functools.partial(jax.jit, static_argnames="method")
def merged_params(method: str, base: Flat, sources: Flat, params: dict, key: jax.Array) -> Flat:
    """`merge_params` of a one-off merge (its statistics prepared inside), as one program."""
    return merge_params(method, base, sources, params, key=key)


@jax.jit
def merged_plan(plan, base: Flat, sources: Flat, stats, slots, key: jax.Array) -> Flat:
    """`merge_plan` of a deterministic plan as one program; with `slots` (a pool's), from the
    sources held in them."""
    if slots is not None:
        plan = dataclasses.replace(plan, params=select_sources(plan.method, plan.params, slots))
    return merge_plan(plan, base, sources, stats=stats, key=key)


def genome_space(config: EvolveConfig, num_sources: int, num_layers: int) -> GenomeSpace:
    """The configured genome: which parameters evolve per source and layer group."""
    genome, evolved = config.genome, config.genome.evolved()
    groups = genome.layer_groups or (num_layers // genome.layer_granularity if genome.layer_granularity else 1)
    bounds = (("weight", -2.0, 2.0),) if genome.allow_negative_weights else ()
    return GenomeSpace(genome.merge_method, num_sources=num_sources, num_layers=num_layers, evolve=evolved,
                       layer_groups=groups, bounds=bounds, families=genome.filters, normalize=genome.normalize,
                       fixed=genome.fixed, gates=genome.gates, source_cost=genome.source_cost,
                       max_sources=genome.max_sources,
                       initial_values=tuple((n, v) for n, v in config.search.initial if n in evolved))


def search_config(config: EvolveConfig, layout: Layout | None, objectives: int = 1,
                  run_dir: Path | None = None, objective_names: tuple[str, ...] = ()) -> SearchConfig:
    """The search engine's settings from the run's `search:` section: the PS search's (stage
    "ps"), its tracker's run named for the run directory unless `search.tracking_run` is set."""
    settings = config.search
    tracking = TrackingConfig(settings.tracking, directory=settings.tracking_dir, project=settings.tracking_project,
                              run_name=settings.tracking_run or (run_dir.name if run_dir is not None else config.name),
                              stage="ps")
    return SearchConfig(generations=settings.generations, strategy=settings.strategy,
                        population_size=settings.population, sigma=settings.sigma, seed=settings.seed,
                        chunk_size=settings.chunk_size, layout=layout, objectives=objectives,
                        objective_names=objective_names, tracking=tracking)


def prepare_tasks(config: EvolveConfig, tokenizer, processor=None, *, dedupe: bool | None = None) -> list[Task]:
    """Every task read, rendered and checked (before any model loads); with `dedupe` (default:
    the config's), the test rows also in a task's fitness or validation split dropped
    (`jaxmerge.pipeline.checks`)."""
    tasks = [prepare_task(spec, tokenizer, processor, config.search.validation_size, Path(config.base_dir or "."))
             for spec in config.tasks]
    return [drop_overlap(task) for task in tasks] if (config.dedupe if dedupe is None else dedupe) else tasks


def fitness_batches(config: EvolveConfig, tasks: list[Task], tokenizer, vlm=None) -> FitnessBatches:
    """The search's fitness: minibatches of the tasks' fitness splits, one objective per task
    for a Pareto search, per-item scores for natural niches."""
    languages = tuple(sorted({t.spec.language for t in tasks if t.spec.language}))
    return FitnessBatches(tasks, tokenizer, TokenTable.from_tokenizer(tokenizer, languages=languages),
                          config.search.minibatch, vlm=vlm, objectives=config.search.strategy == "nsga2",
                          guard_penalty=config.search.guard_penalty, items=config.search.strategy == NATURAL_NICHES)


@dataclasses.dataclass(eq=False)
class MergeProblem:
    """A parameter-space merge of `sources` into their base, searched over `space`.

    `data` is what the search passes to each candidate's merge as an argument (never closed
    over, so XLA neither copies it into the program nor recompiles): the base, the stacked
    sources and their statistics (unless a `pool` holds those in host memory and supplies a
    group's own per call), and the host VLM's own parameters."""
    sources: Sources
    space: GenomeSpace
    method: str
    key: jax.Array
    base: Flat
    stacked: Flat
    stats: dict
    data: dict[str, Any]
    pool: SourcePool | None = None
    host_graph: Any = None  # the VLM's graph, its parameters in data["vlm"]
    seed: int | None = None  # `key` is jax.random.key(seed): written into a random method's recipes

    @classmethod
    def create(cls, sources: Sources, space: GenomeSpace, method: str, key: jax.Array, *,
               sources_on_host: bool = False, seed: int | None = None) -> MergeProblem:
        """The sources stacked (or a pool's stack taken as it is) and their statistics
        prepared once; with `sources_on_host` both stay in host memory, a pool moving a few
        sources at a time to the device (`space.max_sources`). `seed`: the one `key` was made
        from, written into a random method's recipes (`jaxmerge merge` redraws its masks)."""
        on_host = in_host_memory if sources_on_host else contextlib.nullcontext
        base = flat_params(sources.base)
        stacked = sources.stack if sources.stack is not None else \
            stack_sources(base, [flat_params(m) for m in sources.models])
        with on_host():
            stats = prepare(method, base, stacked)
        pool, data = None, {"base": base}
        if sources_on_host:
            pool = SourcePool.from_arrays({"sources": stacked, "stats": stats}, capacity=space.max_sources)
        else:
            data.update(sources=stacked, stats=stats)
        host_graph = None
        if sources.host is not None:
            host_graph, data["vlm"] = nnx.split(sources.host)
        return cls(sources, space, method, key, base, stacked, stats, data, pool, host_graph, seed)

    @classmethod
    def from_config(cls, config: EvolveConfig, sources: Sources) -> MergeProblem:
        space = genome_space(config, len(sources.models), sources.base.config.num_layers)
        seed = config.search.seed  # the merges' masks (DARE, DELLA) and the recipes that redraw them
        return cls.create(sources, space, config.genome.merge_method, jax.random.key(seed),
                          sources_on_host=config.search.sources_on_host, seed=seed)

    @property
    def paths(self) -> list[str]:
        """The parameters' paths, in the order the genome decodes them."""
        return sorted(self.base)

    def model(self, flat: Flat, vlm_state=None):
        """The merged model: the host VLM with these language-model parameters, or the base with them."""
        if self.host_graph is not None:
            host = nnx.merge(self.host_graph, vlm_state) if vlm_state is not None else self.sources.host
            return with_language_model_params(host, flat)
        return with_params(self.sources.base, flat)

    def build(self, params: dict, data: dict, key: jax.Array):
        """A candidate's merged model from its decoded parameters, inside jit: from the
        whole stack, or from the group's sources in the pool's device slots."""
        if "slots" in data:
            params = select_sources(self.method, params, data["slots"])
        merged = merge_params(self.method, data["base"], data["sources"], params, stats=data["stats"], key=key,
                              options=self.space.options())
        return self.model(merged, data.get("vlm"))

    def score_fn(self, fitness: FitnessBatches) -> Callable:
        """score_fn(params, data, batch, key) for `run_search`: build, then score on the batch."""
        def score(params, data, batch, key):
            return fitness.score(self.build(params, data, key), batch)
        return score

    def candidate_data(self, genome) -> dict:
        """`data` for one candidate: with a pool, its own sources' arrays on the device."""
        if self.pool is None:
            return self.data
        return {**self.data, **self.pool.resident_for(self.space.sources_used(genome))}

    def merge(self, genome) -> Flat:
        """One genome's merged language-model parameters, outside the search: its plan, run
        (a deterministic one as one program; a random one as `merge_plan` runs it, eagerly, so
        that its recipe rebuilds it bit for bit)."""
        plan = self.space.plan(genome, self.paths)
        random = plan.merge_method.random
        if self.pool is None:
            if random:
                return merge_plan(plan, self.base, self.stacked, key=self.key)
            return merged_plan(plan, self.base, self.stacked, None, None, self.key)
        resident = self.pool.resident_for(self.space.sources_used(genome))
        if random:
            plan = dataclasses.replace(plan, params=select_sources(self.method, plan.params, resident["slots"]))
            return merge_plan(plan, self.base, resident["sources"], stats=resident["stats"], key=self.key)
        return merged_plan(plan, self.base, resident["sources"], resident["stats"], resident["slots"], self.key)

    def hand_set(self, method: str, **values):
        """The merged model of a hand-set merge (the same values for every source and layer):
        as one program from the stack on the device; eagerly, tensor by tensor, from a pool
        in host memory (one program would take a copy of the whole pool)."""
        params = broadcast_params(method, self.base, len(self.sources.models), **values)
        if self.pool is None:
            return self.model(merged_params(method, self.base, self.stacked, params, self.key))
        with in_host_memory():
            return self.model(merge_params(method, self.base, self.stacked, params, key=self.key))

    def recipe(self, genome) -> str:
        """The genome as a mergekit recipe (its values rounded as `GenomeSpace.rounded` does)."""
        return genome_recipe(self.space, self.space.rounded(genome), self.sources.base_path,
                             self.sources.recipe_sources(), self.paths, seed=self.seed)

    def export(self, genome, out_dir: Path, *, inputs: list[str]) -> str:
        """The genome's merge, its values rounded as in its recipe, saved to `out_dir`
        (replaced whole if ours) with the recipe beside the weights as mergekit_config.yml,
        so that the checkpoint on disk is exactly what the recipe rebuilds. Returns the recipe."""
        recipe = self.recipe(genome)
        merged = self.merge(self.space.rounded(genome))
        save(self.model(merged), out_dir, overwrite=True, inputs=inputs, extra_files={"mergekit_config.yml": recipe})
        return recipe

    def describe_pool(self) -> dict:
        """What results.json says of a pool."""
        pool = self.pool
        return {"sources": pool.num_sources, "on_device": pool.capacity, "pool_mib": pool.nbytes() / 2**20,
                "on_device_mib": pool.nbytes(pool.capacity) / 2**20, "sources_copied": pool.transfers}

