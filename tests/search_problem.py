"""A small search problem with a known answer, importable by tests and runnable as a job:
find the task-arithmetic weights that reproduce a target merge of tiny random models.

    python tests/search_problem.py OUT_DIR GENERATIONS
"""

import contextlib
import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.merge import merge_params, prepare, stack_sources
from jaxmerge.merge.tree import select_sources
from jaxmerge.search import GenomeSpace, SearchConfig, run_search
from jaxmerge.search.pool import SourcePool

TARGET_WEIGHTS = jnp.array([0.8, 0.3])
SPACE = GenomeSpace("task_arithmetic", num_sources=2, num_layers=4, evolve=("weight",), layer_groups=2)


def make_problem():
    key = jax.random.key(0)
    base = {"embed_tokens.weight": jax.random.normal(key, (16, 8)),
            "layers.mlp.up_proj.kernel": jax.random.normal(jax.random.fold_in(key, 1), (4, 8, 8))}
    sources = stack_sources(base, [{p: v + jax.random.normal(jax.random.fold_in(key, 10 + i), v.shape)
                                    for p, v in base.items()} for i in range(2)])
    params = {p: {"weight": TARGET_WEIGHTS} for p in base}
    target = merge_params("task_arithmetic", base, sources, params)
    data = {"base": base, "sources": sources, "target": target}
    # "Minibatches": subsets of the entries, so fitness is noisy but unbiased.
    masks = [{p: jax.random.bernoulli(jax.random.fold_in(key, 100 + b), 0.5, v.shape) for p, v in base.items()}
             for b in range(3)]
    validation = {p: jnp.ones(v.shape, bool) for p, v in base.items()}
    return data, masks, validation


def score(params, data, batch, key):
    return minus_error(merge_params("task_arithmetic", data["base"], data["sources"], params), data, batch)


def minus_error(merged, data, batch):
    """Minus the mean squared error to the target merge on the batch's entries."""
    errors = [jnp.sum(jnp.where(batch[p], (merged[p] - data["target"][p]) ** 2, 0.0)) / jnp.sum(batch[p])
              for p in merged]
    return -sum(errors)


def method_search(method: str, out_dir, generations: int, *, pool: bool = False, **config):
    """The problem searched with a `method` genome (TIES, DARE-TIES: weight and density per
    source and layer group) and a gate per source, its statistics prepared once as `evolve`
    prepares them; with `pool`, the sources and statistics in host memory (a `SourcePool`
    of one slot per source, moved to the device for each group of candidates). Returns the
    search's result and the pool (None without)."""
    data, masks, validation = make_problem()
    stats = prepare(method, data["base"], data["sources"])
    space = GenomeSpace(method, num_sources=2, num_layers=4, layer_groups=2, gates=True)

    def merge_score(params, data, batch, key):
        if "slots" in data:
            params = select_sources(method, params, data["slots"])
        merged = merge_params(method, data["base"], data["sources"], params, stats=data["stats"], key=key,
                              options=space.options())
        return minus_error(merged, data, batch)

    sources = None
    if pool:
        sources = SourcePool.from_arrays({"sources": data.pop("sources"), "stats": stats}, capacity=2)
    else:
        data["stats"] = stats
    result = run_search(space, sorted(data["base"]), merge_score, data, masks, validation,
                        config=SearchConfig(generations=generations, population_size=8, seed=3, **config),
                        out_dir=out_dir, progress=False, pool=sources)
    return result, sources


def search(out_dir, generations, **config):
    data, masks, validation = make_problem()
    return run_search(SPACE, sorted(data["base"]), score, data, masks, validation,
                      config=SearchConfig(generations=generations, population_size=8, seed=3, **config),
                      out_dir=out_dir, progress=False)


@contextlib.contextmanager
def compilations_by_generation(logger_name: str = "jaxmerge.search.evolution"):
    """A list of the backend compilations (XLA programs built) counted from entry to each
    generation's end, as the search (its module's logger) logs it: one number per generation."""
    compiled, counts = [0], []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled[0] += 1

    class Generations(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("generation "):
                counts.append(compiled[0])

    logger, handler = logging.getLogger(logger_name), Generations()
    level = logger.level
    logger.setLevel(logging.DEBUG)  # progress=False logs each generation at DEBUG
    logger.addHandler(handler)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
        logger.removeHandler(handler)
        logger.setLevel(level)


def strip_times(history):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def assert_same_run(result, whole) -> None:
    """A search `result` is the run `whole`: the same best genome, history and log (times aside)."""
    np.testing.assert_array_equal(result.best_genome, whole.best_genome)
    assert strip_times(result.history) == strip_times(whole.history)
    log = [json.loads(line) for line in (result.out_dir / "generations.jsonl").read_text().splitlines()]
    assert strip_times(log) == strip_times(whole.history)


if __name__ == "__main__":
    search(sys.argv[1], int(sys.argv[2]))
