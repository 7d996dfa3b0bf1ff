"""`MergeProblem`: the one way a genome becomes a merged model, in the search and outside it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from jaxmerge.checkpoint import load_tokenizer
from jaxmerge.experiments import ja_math
from jaxmerge.merge import flat_params
from jaxmerge.merge.recipe import merge_from_yaml
from jaxmerge.pipeline.problem import MergeProblem, fitness_batches, prepare_tasks
from jaxmerge.pipeline.sources import load_sources, tokenizer_dir


@pytest.fixture(scope="module")
def toy():
    """The toy ja_math problem (shipped checkpoints), TIES per layer group (deterministic: its recipe
    rebuilds the same merge)."""
    config = ja_math.config_from_args(ja_math.parse_args(["--method", "ties", "--layer-groups", "2", "--no-dfs",
                                                          "--test-size", "4"]))
    tokenizer = load_tokenizer(tokenizer_dir(config))
    tasks = prepare_tasks(config, tokenizer)
    problem = MergeProblem.from_config(config, load_sources(config, jaxmerge.load, tokenizer))
    return config, problem, fitness_batches(config, tasks, tokenizer)


def genomes(problem: MergeProblem, count: int) -> jax.Array:
    return problem.space.initial()[None] + 0.3 * jax.random.normal(jax.random.key(1), (count, problem.space.num_dims))


def test_the_search_scores_the_merge_that_is_exported(toy):
    """A candidate as the search builds it (jitted, from `data`) is the model `merge` gives."""
    _, problem, _ = toy
    genome = genomes(problem, 1)[0]
    built = jax.jit(lambda g, data: flat_params(problem.build(problem.space.decode(g, problem.paths), data,
                                                              problem.key)))(genome, problem.data)
    merged = problem.merge(genome)
    for path, value in merged.items():
        np.testing.assert_allclose(np.asarray(built[path]), np.asarray(value), rtol=0, atol=1e-6, err_msg=path)


def test_candidates_are_data_one_compilation(toy):
    _, problem, fitness = toy
    score = jax.jit(problem.score_fn(fitness))
    batch = fitness.batches[0]
    for genome in genomes(problem, 3):
        score(problem.space.decode(genome, problem.paths), problem.data, batch, problem.key)
    assert score._cache_size() == 1


def test_export_writes_what_its_recipe_rebuilds(toy, tmp_path):
    """The exported checkpoint (values rounded as in the recipe) equals `jaxmerge merge` of
    its recipe, and both are `merge` of the rounded genome."""
    _, problem, _ = toy
    genome = genomes(problem, 1)[0]
    recipe = problem.export(genome, tmp_path / "merged", inputs=[*problem.sources.paths, problem.sources.base_path])
    assert (tmp_path / "merged" / "mergekit_config.yml").read_text() == recipe
    (tmp_path / "recipe.yml").write_text(recipe)
    merge_from_yaml(tmp_path / "recipe.yml", tmp_path / "rebuilt")
    saved, rebuilt = flat_params(jaxmerge.load(tmp_path / "merged")), flat_params(jaxmerge.load(tmp_path / "rebuilt"))
    expected = problem.merge(problem.space.rounded(genome))
    for path in expected:
        np.testing.assert_array_equal(np.asarray(saved[path]), np.asarray(expected[path]), err_msg=path)
        np.testing.assert_allclose(np.asarray(rebuilt[path]), np.asarray(saved[path]), rtol=0, atol=2e-6,
                                   err_msg=path)


def test_hand_set_merges_every_source_alike(toy):
    """A hand-set merge is the genome-free merge: weight 1, density 1 task arithmetic is the
    base plus every source's task vector."""
    _, problem, _ = toy
    merged = flat_params(problem.hand_set("task_arithmetic", weight=1.0))
    base, sources = problem.base, problem.stacked
    path = "layers.mlp.up_proj.kernel" if "layers.mlp.up_proj.kernel" in base else sorted(base)[0]
    axis = 1 if path.startswith("layers.") else 0
    expected = base[path] + jnp.sum(sources[path] - jnp.expand_dims(base[path], axis), axis=axis)
    np.testing.assert_allclose(np.asarray(merged[path]), np.asarray(expected), rtol=0, atol=1e-5)
