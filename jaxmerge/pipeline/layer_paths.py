"""The data-flow-space (DFS) stage: a layer path through two models' layers, evolved on the
run's fitness, saved as a checkpoint with its modeling file and plotted."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax.numpy as jnp

from jaxmerge.architectures import layer_path_architecture, text_architecture
from jaxmerge.checkpoint import derived_origin
from jaxmerge.eval.tasks import FitnessBatches
from jaxmerge.merge.tree import with_language_model
from jaxmerge.models.layer_path import compact_path, layer_pool, path_model, split_hops, with_hops
from jaxmerge.parallel import is_primary
from jaxmerge.pipeline.config import DfsSettings
from jaxmerge.pipeline.results import search_summary
from jaxmerge.pipeline.rundir import atomic_file
from jaxmerge.saving import save
from jaxmerge.search import SearchConfig, SearchResult, run_search
from jaxmerge.search.evolution import strategy_name
from jaxmerge.search.path_genome import PathSpace

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PathSearch:
    """One layer-path search: model A (embeddings, head, the path's ends) and model B, named
    for the logs and plots, inside `host` (the VLM) when there is one."""
    name: str  # "dfs" or "ps_dfs": the run directory's search_<name>, merged_<name>
    models: tuple
    names: tuple[str, ...]
    host: object | None
    model_type: str  # the layers' HF model_type, for the exported modeling file
    tokenizer_dir: str


def evolve_path(job: PathSearch, dfs: DfsSettings, ps_search: SearchConfig, fitness: FitnessBatches,
                out: Path, run_dir: Path) -> tuple[dict, SearchResult]:
    """Evolves `job`'s layer path with the PS search's strategy and seed (its own
    generations, population and chunk size), saves the best to `out` (replaced whole if a
    resumed run had written it) and plots it. Returns (the search summary, the result)."""
    space = PathSpace(tuple(m.config.num_layers for m in job.models), repeats=dfs.repeats, scales=dfs.scales,
                      off_init=dfs.off_init)
    search = dataclasses.replace(ps_search, generations=dfs.generations, population_size=dfs.population,
                                 chunk_size=dfs.chunk_size,  # the tracker's metrics under dfs/..., ps_dfs/...
                                 tracking=dataclasses.replace(ps_search.tracking, stage=job.name))
    model = path_model(job.models[0], layer_pool(list(job.models)), space.num_hops, job.model_type)
    _, state, rebuild = split_hops(with_language_model(job.host, model) if job.host is not None else model)

    def score(params, data, batch, key):
        return fitness.score(rebuild(data["path_model"], params["layer"], params["scale"], params["valid"]), batch)

    log.info("evolving a layer path through %s (%d numbers: %d slot indicators, %s scales) with %s, %d generations:",
             " and ".join(job.names), space.num_dims, space.num_slots, space.scales, strategy_name(search.strategy),
             search.generations)
    began = time.perf_counter()
    result = run_search(space, (), score, {"path_model": state}, fitness.batches, fitness.validation,
                        config=search, out_dir=run_dir / f"search_{job.name}",
                        host_fitness=fitness.host_fitness if fitness.uses_host else None)
    summary = search_summary(space, search, result, time.perf_counter() - began)
    summary["path_names"] = [space.layer_name(i) for i, _ in summary["genome"]["path"]]
    hops = space.decode(jnp.asarray(result.best_genome))
    exported = compact_path(with_hops(model, hops["layer"], hops["scale"], hops["valid"]))
    architecture = layer_path_architecture(text_architecture(job.model_type))
    exported.origin = derived_origin(job.models[0], architecture)  # model A's token ids
    save(exported, out, overwrite=True, architecture=architecture, tokenizer_dir=job.tokenizer_dir)
    if is_primary():
        from jaxmerge.search.report import plot_history, plot_path

        with atomic_file(run_dir / f"fitness_{job.name}.png") as path:
            plot_history(result.history, path)
        with atomic_file(run_dir / f"path_{job.name}.png") as path:
            plot_path(space, result.best_genome, path, list(job.names))
    return summary, result
