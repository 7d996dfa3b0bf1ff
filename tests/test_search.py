"""The evolutionary search: genome decoding, convergence on a known answer, one
compilation, and resume (also after kill -9) ending exactly as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from search_problem import SPACE, TARGET_WEIGHTS, compilations_by_generation, method_search, search, strip_times

from jaxmerge.search import GenomeSpace, default_population_size, evaluate_population


def test_genome_space_per_model():
    space = GenomeSpace("ties", num_sources=3, num_layers=32)
    assert space.num_dims == 6 and default_population_size(6) == 9  # the paper's EvoLLM-JP space
    params = space.decode(space.initial(), ["embed_tokens.weight", "layers.mlp.up_proj.kernel"])
    np.testing.assert_allclose(params["layers.mlp.up_proj.kernel"]["weight"], np.full((3, 32), 0.5))
    np.testing.assert_allclose(params["embed_tokens.weight"]["density"], np.full(3, 0.5))
    assert float(params["embed_tokens.weight"]["lambda"]) == 1.0  # a default held fixed


def test_genome_space_per_layer_groups_and_bounds():
    space = GenomeSpace("dare_ties", num_sources=2, num_layers=6, layer_groups=3, transform="sigmoid",
                        bounds=(("weight", 0.0, 3.0),))
    assert space.num_groups == 4 and space.num_dims == 2 * 2 * 4
    np.testing.assert_array_equal(space.layer_group_index(), [0, 0, 1, 1, 2, 2])
    genome = jnp.arange(space.num_dims, dtype=jnp.float32) - 8.0
    values = space.values(genome)
    assert float(values["weight"].min()) > 0 and float(values["weight"].max()) < 3.0
    params = space.decode(genome, ["layers.x", "norm.weight"])
    np.testing.assert_allclose(params["layers.x"]["weight"][:, 2], values["weight"][:, 1])
    np.testing.assert_allclose(params["norm.weight"]["weight"], values["weight"][:, 3])  # emb/head group
    np.testing.assert_allclose(space.values(space.initial())["density"], 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="slerp needs t"):
        GenomeSpace("slerp", num_sources=1, num_layers=2, evolve=())
    with pytest.raises(KeyError, match="no parameter 'density'"):
        GenomeSpace("linear", num_sources=2, num_layers=2)


def test_gate_genes_decode_to_the_chosen_sources():
    """One gate per source after the other genes: at or above 1/2 the source is in; below, its
    weights are 0 in every group and family (its densities untouched)."""
    space = GenomeSpace("dare_ties", num_sources=4, num_layers=6, layer_groups=3, families=("mlp",), gates=True)
    assert space.num_dims == 2 * 2 * 4 * 4 + 4
    genome = np.asarray(space.initial()).copy()
    np.testing.assert_array_equal(space.values(genome)["present"][:, 0], [1, 1, 1, 1])  # all start in
    genome[-4:] = [0.7, 0.2, 0.5, 0.49]
    values = space.values(jnp.asarray(genome))
    np.testing.assert_array_equal(values["present"][:, 0], [1, 0, 1, 0])
    for key in ("weight", "weight[mlp]"):
        np.testing.assert_array_equal(np.asarray(values[key]) > 0, np.array([[1], [0], [1], [0]], bool).repeat(4, 1))
    np.testing.assert_allclose(values["density"], 0.5, rtol=1e-5)
    params = space.decode(jnp.asarray(genome), ["layers.mlp.up_proj.kernel", "layers.self_attn.q_proj.kernel",
                                                 "embed_tokens.weight"])
    for path, p in params.items():
        np.testing.assert_array_equal(np.asarray(p["weight"])[[1, 3]], 0.0)
        assert np.all(np.asarray(p["weight"])[[0, 2]] > 0), path
    assert space.describe(genome)["present"] == [[1.0], [0.0], [1.0], [0.0]]
    with pytest.raises(ValueError, match="gates switch sources off through their weights"):
        GenomeSpace("dare_ties", num_sources=2, num_layers=2, evolve=("density",), fixed=(("weight", 1.0),),
                    gates=True)


def test_search_finds_the_known_weights_and_compiles_once(tmp_path):
    evaluate_population.clear_cache()
    result = search(tmp_path / "run", 40)
    found = SPACE.values(jnp.asarray(result.best_genome))["weight"]
    np.testing.assert_allclose(found, np.broadcast_to(TARGET_WEIGHTS[:, None], found.shape), atol=0.05)
    assert result.history[-1]["best_validation"] > result.history[0]["validation"]
    # One program for the population, one for the single validation candidate; not one per generation.
    assert evaluate_population._cache_size() == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [e["generation"] for e in log] == list(range(40))


def test_resume_ends_as_an_uninterrupted_run(tmp_path):
    whole = search(tmp_path / "whole", 12)
    search(tmp_path / "parts", 5)  # stopped after generation 5 ...
    resumed = search(tmp_path / "parts", 12)  # ... and run again
    np.testing.assert_array_equal(resumed.best_genome, whole.best_genome)
    assert strip_times(resumed.history) == strip_times(whole.history)


def test_resumed_search_compiles_no_program_again(tmp_path):
    """The state restored from a checkpoint has the types and placement of a fresh one's: the
    population and validation programs, ask and tell each compile once in a session, and the
    session that resumes (here in the same process) compiles none of them again."""
    from evosax.algorithms import CMA_ES

    strategy = CMA_ES(population_size=8, solution=jnp.zeros(SPACE.num_dims))  # ask and tell compile per instance
    evaluate_population.clear_cache()
    asked, told = CMA_ES.ask._cache_size(), CMA_ES.tell._cache_size()

    def compiled():
        return [evaluate_population._cache_size(), CMA_ES.ask._cache_size() - asked, CMA_ES.tell._cache_size() - told]

    search(tmp_path / "run", 3, strategy=strategy)
    assert compiled() == [2, 1, 1]
    search(tmp_path / "run", 6, strategy=strategy)  # resumed at generation 4
    assert compiled() == [2, 1, 1]


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_generations_after_the_first_compile_nothing(tmp_path, method):
    """Issue #29: a search's first generation compiles its programs (the population's merges
    and scores, the leader's, ask and tell, the generation's keys and ranking), and no later
    generation compiles anything: no eager operation is left in the loop to compile per new
    shape or value. With every source on the device, and with a pool in host memory whose
    slots change from group to group (the gates choose each candidate's sources)."""
    for pooled in (False, True):
        with compilations_by_generation() as counts:
            _, pool = method_search(method, tmp_path / f"pool_{pooled}", 6, pool=pooled)
        assert len(counts) == 6 and counts[0] > 0
        assert [c - counts[0] for c in counts[1:]] == [0] * 5, f"compilations by generation {counts} (pool {pooled})"
        assert pool is None or pool.transfers > 2  # the slots' sources changed from group to group


def test_the_population_program_holds_one_merge_at_a_time():
    """Candidates one after another (chunk_size 1) take one merge's memory: what score_fn
    computes from the models alone (task arithmetic's task vectors) is not hoisted out of
    the loop over candidates, where XLA would hold it for all of them (the sources' size)."""
    from jaxmerge.merge import merge_params, stack_sources

    key = jax.random.key(0)
    base = {"embed_tokens.weight": jax.random.normal(key, (512, 256)),
            "layers.mlp.up_proj.kernel": jax.random.normal(key, (4, 256, 256))}
    sources = stack_sources(base, [{p: v + i for p, v in base.items()} for i in (1, 2, 3)])
    space = GenomeSpace("task_arithmetic", num_sources=3, num_layers=4, evolve=("weight",))

    def score(params, data, batch, key):
        merged = merge_params("task_arithmetic", data["base"], data["sources"], params)
        return -sum(jnp.mean(v ** 2) for v in merged.values())

    data, paths = {"base": base, "sources": sources}, tuple(sorted(base))
    population = evaluate_population.lower(space, paths, score, 1, jnp.stack([space.initial()] * 4), data, None,
                                           jax.random.split(key, 4)).compile()
    one = jax.jit(lambda genome, data: score(space.decode(genome, paths), data, None, key)).lower(
        space.initial(), data).compile()
    one_model = sum(v.nbytes for v in base.values())
    assert population.memory_analysis().temp_size_in_bytes < one.memory_analysis().temp_size_in_bytes + one_model / 4


def test_resume_after_kill_9(tmp_path):
    whole = search(tmp_path / "whole", 30)
    job = [sys.executable, str(Path(__file__).parent / "search_problem.py"), str(tmp_path / "killed"), "30"]
    process = subprocess.Popen(job, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.isdigit() and int(p.name) >= 3 for p in
                                              (checkpoints.iterdir() if checkpoints.exists() else [])):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log = (tmp_path / "killed" / "generations.jsonl").read_text().splitlines()
    assert 3 <= len(log) < 30, "the job was not stopped part-way"
    resumed = search(tmp_path / "killed", 30)
    np.testing.assert_array_equal(resumed.best_genome, whole.best_genome)
    assert strip_times(resumed.history) == strip_times(whole.history)


def test_strategy_by_class_or_instance_and_host_fitness(tmp_path):
    """An evosax algorithm class, or an instance made for the space, runs like its name; a
    host fitness scores what the jitted function returns."""
    from evosax.algorithms import SNES
    from search_problem import make_problem, score

    from jaxmerge.search import SearchConfig, run_search

    by_name = search(tmp_path / "name", 6, strategy="snes")
    by_class = search(tmp_path / "class", 6, strategy=SNES)
    instance = SNES(population_size=8, solution=jnp.zeros(SPACE.num_dims))
    by_instance = search(tmp_path / "instance", 6, strategy=instance)
    for other in (by_class, by_instance):
        np.testing.assert_array_equal(other.best_genome, by_name.best_genome)
    with pytest.raises(ValueError, match="searches 3 numbers"):
        search(tmp_path / "wrong", 1, strategy=SNES(population_size=8, solution=jnp.zeros(3)))

    data, masks, validation = make_problem()
    seen = []

    def host_fitness(outputs, batch_index):  # the jitted part returns the errors; the host negates them
        seen.append(batch_index)
        return -np.asarray(outputs)

    result = run_search(SPACE, sorted(data["base"]), lambda *a: -score(*a), data, masks, validation,
                        config=SearchConfig(generations=6, population_size=8, seed=3, strategy="snes"),
                        out_dir=tmp_path / "host", progress=False, host_fitness=host_fitness)
    np.testing.assert_allclose(result.best_genome, by_name.best_genome, rtol=1e-6)
    assert seen[:2] == [0, None]  # a minibatch, then the leader's validation


def test_source_cost_drops_a_source_that_does_not_help(tmp_path):
    """A sparsity prior on the gates: a third source whose task vector barely moves the merge
    costs the fitness nothing, so without a price its gate stays open; priced at 0.01 per
    source, the search closes it (and keeps the two that matter)."""
    from search_problem import make_problem, score

    from jaxmerge.merge import stack_sources
    from jaxmerge.search import SearchConfig, run_search

    data, masks, validation = make_problem()
    idle = {p: data["base"][p] + 1e-3 for p in data["base"]}  # a near-copy of the base
    sources = [{p: v[i] if not p.startswith("layers.") else v[:, i] for p, v in data["sources"].items()}
               for i in range(2)]
    data = {**data, "sources": stack_sources(data["base"], [*sources, idle])}

    def evolved(cost, out):
        space = GenomeSpace("task_arithmetic", num_sources=3, num_layers=4, evolve=("weight",), layer_groups=2,
                            gates=True, source_cost=cost)
        result = run_search(space, sorted(data["base"]), score, data, masks, validation,
                            config=SearchConfig(generations=40, population_size=12, seed=3), out_dir=tmp_path / out,
                            progress=False)
        return space.values(jnp.asarray(result.best_genome))["present"][:, 0].tolist(), result

    kept_free, _ = evolved(0.0, "free")
    kept_priced, priced = evolved(0.01, "priced")
    assert kept_free == [1, 1, 1] and kept_priced == [1, 1, 0]
    assert priced.history[-1]["best_validation"] > -0.05  # the two that matter still found
    space = GenomeSpace("task_arithmetic", num_sources=3, num_layers=4, evolve=("weight",), gates=True,
                        source_cost=0.01)
    genome = np.asarray(space.initial()).copy()
    assert float(space.cost(genome)) == pytest.approx(3 * 0.01 * 2 * 0.6)  # gates at 0.6: 1.2 x the price each
    genome[-3:] = [0.5, 1.0, 0.49]  # at the threshold the price, open twice it, closed nothing
    assert float(space.cost(genome)) == pytest.approx(0.01 + 0.02)
    with pytest.raises(ValueError, match="needs gates=True"):
        GenomeSpace("task_arithmetic", num_sources=3, num_layers=4, evolve=("weight",), source_cost=0.01)
