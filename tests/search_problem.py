"""A small search problem with a known answer, importable by tests and runnable as a job:
find the task-arithmetic weights that reproduce a target merge of tiny random models.

    python tests/search_problem.py OUT_DIR GENERATIONS
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.merge import merge_params, stack_sources
from jaxmerge.search import GenomeSpace, SearchConfig, run_search

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
    merged = merge_params("task_arithmetic", data["base"], data["sources"], params)
    errors = [jnp.sum(jnp.where(batch[p], (merged[p] - data["target"][p]) ** 2, 0.0)) / jnp.sum(batch[p])
              for p in merged]
    return -sum(errors)


def search(out_dir, generations, **config):
    data, masks, validation = make_problem()
    return run_search(SPACE, sorted(data["base"]), score, data, masks, validation,
                      config=SearchConfig(generations=generations, population_size=8, seed=3, **config),
                      out_dir=out_dir, progress=False)


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
