"""Pareto sorting, crowding distance and NSGA-II against plain-Python oracles."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.search.pareto import NSGA2, crowding_distances, pareto_ranks, selection_order


def brute_force_ranks(scores: np.ndarray) -> list[int]:
    """Fronts by definition: front k is what no remaining candidate dominates, after fronts < k."""
    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))

    ranks, remaining, front = [-1] * len(scores), set(range(len(scores))), 0
    while remaining:
        current = {i for i in remaining if not any(dominates(scores[j], scores[i]) for j in remaining if j != i)}
        for i in current:
            ranks[i] = front
        remaining -= current
        front += 1
    return ranks


def reference_crowding(scores: np.ndarray, ranks: list[int]) -> list[float]:
    """Deb et al.'s crowding distance, per front, with a stable sort (ties in index order)."""
    distance = [0.0] * len(scores)
    for front in set(ranks):
        members = [i for i in range(len(scores)) if ranks[i] == front]
        for m in range(scores.shape[1]):
            order = sorted(members, key=lambda i: scores[i, m])
            low, high = scores[order[0], m], scores[order[-1], m]
            distance[order[0]] = distance[order[-1]] = float("inf")
            for k in range(1, len(order) - 1):
                if high > low:
                    distance[order[k]] += (scores[order[k + 1], m] - scores[order[k - 1], m]) / (high - low)
    return distance


@pytest.mark.parametrize("objectives, size, integer", [(2, 40, False), (3, 30, False), (2, 50, True), (3, 25, True),
                                                       (1, 12, True)])
def test_ranks_and_crowding_match_the_oracles(objectives, size, integer):
    rng = np.random.default_rng(objectives * 100 + size)
    for _ in range(5):
        scores = rng.integers(0, 5, (size, objectives)) if integer else rng.normal(size=(size, objectives))
        scores = scores.astype(np.float32)  # integers: many ties and duplicate points
        ranks = np.asarray(pareto_ranks(jnp.asarray(scores)))
        expected = brute_force_ranks(scores)
        np.testing.assert_array_equal(ranks, expected)
        crowding = np.asarray(crowding_distances(jnp.asarray(scores), jnp.asarray(ranks)))
        np.testing.assert_allclose(crowding, reference_crowding(scores, expected), rtol=1e-5)


def test_nan_scores_rank_last_and_a_front_on_a_line():
    scores = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [jnp.nan, 2.0], [0.2, 0.2]])
    np.testing.assert_array_equal(pareto_ranks(scores), [0, 0, 0, 2, 1])
    # best first: the front's ends (infinite crowding), its middle, then the rest
    order = np.asarray(selection_order(scores)).tolist()
    assert set(order[:2]) == {0, 1} and order[2:] == [2, 4, 3]


def test_selection_keeps_the_union_front_whole():
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(60, 2)), jnp.float32)
    front = set(np.flatnonzero(np.asarray(pareto_ranks(scores)) == 0).tolist())
    kept = set(np.asarray(selection_order(scores))[:30].tolist())
    assert front <= kept


def two_parabolas(population):
    """Maximise -(x - 1)^2 and -(x + 1)^2 summed over dimensions: the Pareto set is x in [-1, 1]^D
    along the diagonal; fitness minimised as evosax expects."""
    f1 = -jnp.sum((population - 1.0) ** 2, axis=-1)
    f2 = -jnp.sum((population + 1.0) ** 2, axis=-1)
    return -jnp.stack([f1, f2], axis=-1)


def test_nsga2_converges_to_a_spread_front_without_recompiling():
    strategy = NSGA2(population_size=24, solution=jnp.zeros(3), num_objectives=2)
    params = strategy.default_params.replace(std_init=jnp.float32(1.0), mutation_rate=0.5)
    key = jax.random.key(0)
    state = strategy.init(key, jnp.full((3,), 3.0), params)
    first, _ = strategy.ask(key, state, params)
    np.testing.assert_array_equal(first, state.population)  # the first ask is the initial population
    for generation in range(80):
        ask_key, tell_key = jax.random.split(jax.random.fold_in(key, generation))
        population, state = strategy.ask(ask_key, state, params)
        state, metrics = strategy.tell(tell_key, population, two_parabolas(population), state, params)
        if generation == 1:
            sizes = (strategy.ask._cache_size(), strategy.tell._cache_size())
    assert (strategy.ask._cache_size(), strategy.tell._cache_size()) == sizes  # genomes are data
    x = np.asarray(state.population)
    along = x.mean(axis=1)  # the Pareto set: the segment from (-1, -1, -1) to (1, 1, 1)
    off = np.linalg.norm(x - along[:, None], axis=1)  # the start's is ~1.4 (3 + N(0, 1) per gene)
    assert np.all(np.abs(along) <= 1.1) and np.all(off < 0.5), x
    assert np.ptp(along) > 1.2  # spread along it (from a start at 3), not collapsed to one point
    assert int(metrics["front_size"]) == 24


def test_nsga2_survivors_are_the_unions_best_fronts():
    """Elitism: after each tell, no dropped candidate of parents + offspring has a better
    (lower) Pareto rank than a kept one (ranks by the brute-force oracle)."""
    strategy = NSGA2(population_size=8, solution=jnp.zeros(2), num_objectives=2)
    params = strategy.default_params
    key = jax.random.key(1)
    state = strategy.init(key, jnp.zeros(2), params)
    for generation in range(10):
        population, state_before = strategy.ask(jax.random.fold_in(key, generation), state, params)
        fitness = two_parabolas(population)
        state, _ = strategy.tell(key, population, fitness, state_before, params)
        if generation == 0:
            np.testing.assert_array_equal(state.population, population)
            continue
        union = np.concatenate([np.asarray(state_before.scores), -np.asarray(fitness)])
        ranks = brute_force_ranks(union)
        kept = [next(i for i, u in enumerate(union) if np.array_equal(u, k)) for k in np.asarray(state.scores)]
        dropped = set(range(16)) - set(kept)
        assert max(ranks[i] for i in kept) <= min(ranks[i] for i in dropped)


def test_domination_is_the_definition():
    points = np.array(list(itertools.product([0.0, 1.0], repeat=2)), np.float32)
    np.testing.assert_array_equal(pareto_ranks(jnp.asarray(points)), [2, 1, 1, 0])


def two_target_search(out_dir, generations):
    """The search problem of test_search with two targets (weights 0.8/0.3 and 0.2/0.9): the
    front runs between them."""
    from search_problem import SPACE, make_problem

    from jaxmerge.merge import merge_params
    from jaxmerge.search import SearchConfig, run_search

    data, masks, validation = make_problem()
    targets = {name: merge_params("task_arithmetic", data["base"], data["sources"],
                                  {p: {"weight": jnp.array(w)} for p in data["base"]})
               for name, w in (("a", [0.8, 0.3]), ("b", [0.2, 0.9]))}
    data = {**data, "targets": targets}

    def score(params, data, batch, key):
        merged = merge_params("task_arithmetic", data["base"], data["sources"], params)
        return jnp.stack([-sum(jnp.sum(jnp.where(batch[p], (merged[p] - data["targets"][t][p]) ** 2, 0.0))
                               / jnp.sum(batch[p]) for p in merged) for t in ("a", "b")])

    config = SearchConfig(generations=generations, population_size=16, seed=3, strategy="nsga2", objectives=2,
                          sigma=0.3)
    return run_search(SPACE, sorted(data["base"]), score, data, masks, validation, config=config,
                      out_dir=out_dir, progress=False)


def test_pareto_search_returns_a_front_between_the_targets_and_resumes(tmp_path):
    from search_problem import SPACE

    from jaxmerge.search import evaluate_population

    evaluate_population.clear_cache()
    result = two_target_search(tmp_path / "whole", 30)
    assert evaluate_population._cache_size() == 1  # every generation and the final validation: one program
    front, scores = result.front, result.front_validation
    assert len(front) >= 4 and scores.shape == (len(front), 2)
    ranks = brute_force_ranks(scores)
    assert set(ranks) == {0}  # no member dominates another on validation
    assert np.all(np.diff(scores[:, 0]) <= 0) and result.best_validation == scores[0, 0]
    weights = np.array([np.asarray(SPACE.values(jnp.asarray(g))["weight"]).mean(axis=1) for g in front])
    # near each end of the segment from (0.8, 0.3) to (0.2, 0.9), and along it (w0 + w1 = 1.1)
    np.testing.assert_allclose(weights[0], [0.8, 0.3], atol=0.15)  # the start is (0.5, 0.5)
    np.testing.assert_allclose(weights[-1], [0.2, 0.9], atol=0.15)
    np.testing.assert_allclose(weights.sum(axis=1), 1.1, atol=0.2)
    log = [json.loads(line) for line in (tmp_path / "whole" / "generations.jsonl").read_text().splitlines()]
    assert len(log) == 30 and len(log[0]["best_fitness"]) == 2
    two_target_search(tmp_path / "parts", 12)
    resumed = two_target_search(tmp_path / "parts", 30)
    np.testing.assert_array_equal(resumed.front, result.front)


def test_several_objectives_need_a_pareto_strategy(tmp_path):
    from search_problem import SPACE

    from jaxmerge.search import SearchConfig
    from jaxmerge.search.evolution import make_strategy

    with pytest.raises(ValueError, match="2 objectives need a Pareto strategy"):
        make_strategy(SPACE, SearchConfig(objectives=2))
