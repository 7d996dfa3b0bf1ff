"""`search.fitness_items`: the search's fitness on a few informative rows per task, chosen
once by item response theory (jaxmerge.eval.irt) before the search starts."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.eval import irt
from jaxmerge.eval.tasks import FitnessBatches
from jaxmerge.parallel import is_primary
from jaxmerge.pipeline.config import EvolveConfig
from jaxmerge.pipeline.problem import MergeProblem
from jaxmerge.pipeline.rundir import atomic_file

log = logging.getLogger(__name__)


def calibration_scores(config: EvolveConfig, fitness: FitnessBatches, problem: MergeProblem) -> dict[str, list]:
    """{task: [per model: scores of every covered fitness row]} for the sources, then
    `search.calibration` candidates drawn as the search's first generation is (initial +
    sigma x N(0, 1))."""
    space, key = problem.space, problem.key
    genomes = space.initial()[None] + config.search.sigma * jax.random.normal(
        jax.random.fold_in(key, 7), (config.search.calibration, space.num_dims))

    @jax.jit
    def candidate_rows(genome, data, batch, key):
        model = problem.build(space.decode(genome, problem.paths), data, key)
        return {t.name: fitness.row_scores(t, model, batch[t.name]) for t in fitness.tasks}

    responses = {t.name: [] for t in fitness.tasks}

    def record(rows: list[dict]) -> None:
        for name in responses:
            responses[name].append(np.concatenate([np.asarray(r[name]) for r in rows]))

    for i in range(len(problem.sources.models)):
        model = problem.sources.scored_as_source(i)
        record([{t.name: fitness.row_scores(t, model, b[t.name]) for t in fitness.tasks} for b in fitness.batches])
    for j, genome in enumerate(genomes):
        own = problem.candidate_data(genome)
        record([candidate_rows(genome, own, b, jax.random.fold_in(key, j)) for b in fitness.batches])
    return responses


def reduce_fitness(config: EvolveConfig, fitness: FitnessBatches, problem: MergeProblem,
                   run_dir: Path) -> tuple[FitnessBatches, dict]:
    """The fitness on `search.fitness_items` rows per task: a 2PL fitted per task to the
    calibration scores picks anchor rows spread over its difficulties, and scores the
    search's candidates there as estimates of the whole split's mean. Returns it and what
    results.json records (rows, calibration models, seconds, and the estimate's error on the
    calibration models themselves); the calibration scores go to run_dir/fitness_items.npz."""
    began = time.perf_counter()
    k = config.search.fitness_items
    log.info("choosing %d fitness rows per task by item response theory: scoring %s for %d sources and %d random "
             "candidates", k, ", ".join(f"{n} {c} rows" for n, c in fitness.covered_rows().items()),
             len(problem.sources.models), config.search.calibration)
    responses = calibration_scores(config, fitness, problem)
    if is_primary():  # what the choice was made from, for a later look
        with atomic_file(run_dir / "fitness_items.npz") as path:
            np.savez(path, **{name: np.stack(r) for name, r in responses.items()})
    chosen, summary = {}, {}
    num_sources = len(problem.sources.models)
    for name, scores in responses.items():
        scores = np.clip(np.stack(scores).astype(np.float32), 0.0, 1.0)  # [M, rows]
        abilities, items = irt.fit(scores)
        prior = irt.candidate_prior(abilities[num_sources:] if config.search.calibration else abilities)
        rows = irt.select_items(items, min(k, scores.shape[1]))
        estimates = jax.vmap(irt.full_set_estimate, in_axes=(0, None, None, None, None))(
            jnp.asarray(scores[:, rows]), jnp.asarray(rows), items, *prior)
        chosen[name] = (rows, items, prior)
        summary[name] = {"rows": len(rows), "of": scores.shape[1], "calibration_models": scores.shape[0],
                         "estimate_error": float(np.mean(np.abs(np.asarray(estimates) - scores.mean(1))))}
        log.info("  %s: %d of %d rows; on the calibration models the estimate is off by %.3f on average",
                 name, len(rows), scores.shape[1], summary[name]["estimate_error"])
    seconds = time.perf_counter() - began
    log.info("  (%.0f s)", seconds)
    return fitness.reduced(chosen), {"tasks": summary, "seconds": seconds}
