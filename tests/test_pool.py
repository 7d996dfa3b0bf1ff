"""A pool of sources in host memory, a few on the device: the grouping against its
definition, merges from the slots against merges from the whole pool, and a search over a
pool that ends exactly as the same search with every source on the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.merge import merge_params, prepare, stack_sources
from jaxmerge.merge.tree import select_sources
from jaxmerge.search import GenomeSpace, SearchConfig, evaluate_population, run_search
from jaxmerge.search.pool import SourcePool

NUM_SOURCES = 5


def make_pool_problem(method: str):
    """Five sources of a tiny model: two that make the target merge, three that do not."""
    key = jax.random.key(0)
    base = {"embed_tokens.weight": jax.random.normal(key, (16, 8)),
            "layers.mlp.up_proj.kernel": jax.random.normal(jax.random.fold_in(key, 1), (4, 8, 8))}
    sources = [{p: v + jax.random.normal(jax.random.fold_in(key, 10 + i), v.shape) for p, v in base.items()}
               for i in range(NUM_SOURCES)]
    stacked = stack_sources(base, sources)
    target = merge_params("task_arithmetic", base, stack_sources(base, sources[:2]),
                          {p: {"weight": jnp.array([0.8, 0.3])} for p in base})
    return base, stacked, prepare(method, base, stacked), target


def pool_search_problem():
    """The pool problem as a search: task arithmetic over the five gated sources, at most two
    in a merge; the score (minus the error to the target merge) reads a pool's slots when
    `data` has them."""
    base, stacked, _, target = make_pool_problem("task_arithmetic")
    space = GenomeSpace("task_arithmetic", num_sources=NUM_SOURCES, num_layers=4, evolve=("weight",), layer_groups=2,
                        gates=True, max_sources=2)

    def score(params, data, batch, key):
        if "slots" in data:
            params = select_sources("task_arithmetic", params, data["slots"])
        merged = merge_params("task_arithmetic", data["base"], data["sources"], params)
        return -sum(jnp.mean((merged[p] - target[p]) ** 2) for p in merged)

    return base, stacked, space, score


def test_groups_fit_the_slots():
    """Every candidate in one group; its sources in the group's slots (ascending, then
    empty); no group holds more than the capacity; candidates with the same sources together."""
    rng = np.random.default_rng(0)
    pool = SourcePool.from_arrays({"sources": {"w": np.zeros((8, 3))}}, capacity=3)
    for _ in range(50):
        used = np.zeros((20, 8), bool)
        for row in used:
            row[rng.choice(8, rng.integers(0, 4), replace=False)] = True
        groups = pool.groups(used)
        members = np.concatenate([m for m, _ in groups])
        assert sorted(members.tolist()) == list(range(20))
        for chosen, slots in groups:
            filled = slots[slots >= 0]
            assert list(filled) == sorted(set(filled)) and list(slots[len(filled):]) == [-1] * (3 - len(filled))
            for i in chosen:
                assert set(np.flatnonzero(used[i])) <= set(filled)
        by_sources = {}
        for g, (chosen, _) in enumerate(groups):
            for i in chosen:
                assert by_sources.setdefault(tuple(np.flatnonzero(used[i])), g) == g
    with pytest.raises(ValueError, match="merges 4 sources; the device holds 3"):
        pool.groups(np.ones((2, 8), bool)[:, :8] & (np.arange(8) < 4))
    with pytest.raises(ValueError, match=r"capacity must be in \[1, 8\]"):
        SourcePool.from_arrays({"sources": {"w": np.zeros((8, 3))}}, capacity=9)


def test_slots_take_what_the_device_holds_and_copy_the_rest():
    """The slots hold their sources' arrays (statistics that are tuples too: DELLA's), an empty
    slot the first one's; a source the previous slots held is not copied again."""
    _, stacked, stats, _ = make_pool_problem("della")
    pool = SourcePool.from_arrays({"sources": stacked, "stats": stats}, capacity=3)
    copied = []
    for slots in ([0, 2, -1], [0, 2, -1], [2, 3, 4], [1, -1, -1], [-1, -1, -1]):
        resident = pool.resident(np.array(slots))
        copied.append(pool.transfers)
        fill = [s if s >= 0 else max(slots[0], 0) for s in slots]
        for name, tree in (("sources", stacked), ("stats", stats)):
            for path, sub in tree.items():
                axis = 1 if path.startswith("layers.") else 0
                for got, want in zip(jax.tree.leaves(resident[name][path]), jax.tree.leaves(sub), strict=True):
                    np.testing.assert_array_equal(np.asarray(got), np.take(np.asarray(want), fill, axis))
    assert copied == [2, 2, 4, 5, 6]  # 0 and 2; nothing; 3 and 4; 1; 0 (no source: the base alone)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs_ties", "linear"])
def test_a_merge_from_the_slots_is_the_merge_from_the_pool(method):
    """A deterministic method merges the same tensors from the candidate's sources in their
    slots as from the whole pool with the other sources gated out."""
    base, stacked, stats, _ = make_pool_problem(method)
    pool = SourcePool.from_arrays({"sources": stacked, "stats": stats}, capacity=3)
    evolve = ("weight", "density") if method in ("ties", "breadcrumbs_ties") else ("weight",)
    space = GenomeSpace(method, num_sources=NUM_SOURCES, num_layers=4, layer_groups=2, evolve=evolve, gates=True,
                        max_sources=3)
    rng = np.random.default_rng(1)
    for _ in range(4):
        genome = np.asarray(space.initial()) + rng.normal(0, 0.3, space.num_dims).astype(np.float32)
        genome[-NUM_SOURCES:] = rng.uniform(0, 1, NUM_SOURCES)
        params = space.decode(jnp.asarray(genome), sorted(base))
        whole = merge_params(method, base, stacked, params, stats=stats, options=space.options())
        [(_, slots)] = pool.groups(np.asarray(space.sources_used(genome))[None])
        resident = pool.resident(slots)
        assert pool.resident_for(space.sources_used(genome)) is resident  # the same slots: nothing copied
        from_slots = merge_params(method, base, resident["sources"], select_sources(method, params, resident["slots"]),
                                  stats=resident["stats"], options=space.options())
        for path in whole:
            np.testing.assert_array_equal(np.asarray(from_slots[path]), np.asarray(whole[path]), err_msg=path)


def test_a_search_over_a_pool_ends_as_with_every_source_on_the_device(tmp_path):
    """Task arithmetic over five gated sources, at most two in a merge: the pool (two slots on
    the device) gives the same log and genome as the stacked pool, in one program, copying
    sources only when a group's differ from the last one's; the search finds the two."""
    base, stacked, space, score = pool_search_problem()
    config = SearchConfig(generations=30, population_size=10, seed=1, chunk_size=1)
    everything = run_search(space, sorted(base), score, {"base": base, "sources": stacked}, [None], None,
                            config=config, out_dir=tmp_path / "device", progress=False)
    evaluate_population.clear_cache()
    pool = SourcePool.from_arrays({"sources": stacked}, capacity=2)
    pooled = run_search(space, sorted(base), score, {"base": base}, [None], None, config=config,
                        out_dir=tmp_path / "pool", progress=False, pool=pool)
    assert evaluate_population._cache_size() == 1  # generations and validation alike: calls of one candidate
    np.testing.assert_array_equal(pooled.best_genome, everything.best_genome)
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in everything.history]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in pooled.history] == strip
    assert np.asarray(space.sources_used(pooled.best_genome)).tolist() == [True, True, False, False, False]
    # 31 x 11 candidates of up to 2 sources each; the sources stay while later groups use them (48 copies)
    assert pool.transfers < 100
    assert pool.nbytes(2) * NUM_SOURCES == pool.nbytes() * 2


MESH_JOB = """
import json, sys
import numpy as np
from test_pool import pool_search_problem
from jaxmerge.parallel import Layout
from jaxmerge.search import SearchConfig, run_search
from jaxmerge.search.pool import SourcePool

base, stacked, space, score = pool_search_problem()
results = []
for layout, pool in ((None, None), (Layout(2, 2), SourcePool.from_arrays({"sources": stacked}, capacity=2))):
    data = {"base": base} if pool is not None else {"base": base, "sources": stacked}
    config = SearchConfig(generations=6, population_size=10, seed=1, chunk_size=1, layout=layout)
    result = run_search(space, sorted(base), score, data, [None], None, config=config,
                        out_dir=f"{sys.argv[1]}/{layout}", progress=False, pool=pool)
    results.append({"genome": np.asarray(result.best_genome).tolist(),
                    "fitness": [h["best_fitness"] for h in result.history]})
print(json.dumps(results))
"""


def test_a_pool_on_a_device_mesh_searches_as_one_device_does(tmp_path):
    """Four devices, 2 x 2 (candidates split over two, the model over two): the pool's slots
    sharded as the stacked sources would be, the search as on one device with the whole stack."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", MESH_JOB, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                              "PYTHONPATH": str(Path(__file__).parent)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, mesh = json.loads(out.stdout.strip().splitlines()[-1])
    assert mesh["genome"] == one["genome"]
    np.testing.assert_allclose(mesh["fitness"], one["fitness"], rtol=1e-6)  # the model axis sums in halves


def test_a_pool_loaded_into_host_memory_keeps_each_source_once(tmp_path):
    """`load_pool` (search.sources_on_host): the stack equals `stack_sources` of the loaded
    models; the source models hold no arrays of their own, and each one rebuilt from its row
    has the loaded checkpoint's parameters, bit for bit, in its own dtype."""
    import shutil

    from flax import nnx

    import jaxmerge
    from jaxmerge.merge import flat_params
    from jaxmerge.pipeline import EvolveConfig, GenomeConfig, SearchSettings
    from jaxmerge.pipeline.sources import load_pool
    from jaxmerge.testing import toy_world as tw

    world = tw.world_dir(0)
    shutil.copytree(world / "base", tmp_path / "idle")
    models = (str(world / "japanese"), str(world / "math"), str(tmp_path / "idle"))
    config = EvolveConfig(GenomeConfig(models, str(world / "base"), gates=True, max_sources=2), tasks=(),
                          search=SearchSettings(sources_on_host=True))
    sources = load_pool(config, jaxmerge.load, None)
    loaded = [flat_params(jaxmerge.load(m)) for m in models]
    expected = stack_sources(flat_params(sources.base), loaded)
    assert sorted(sources.hollow) == [0, 1, 2] and set(sources.stack) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(sources.stack[path], np.asarray(value), err_msg=path)
    for i, own in enumerate(loaded):
        leaves = jax.tree.leaves(nnx.state(sources.models[i], nnx.Param))
        assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
        rebuilt = flat_params(sources.model(i))
        for path, value in own.items():
            assert rebuilt[path].dtype == value.dtype
            np.testing.assert_array_equal(np.asarray(rebuilt[path]), np.asarray(value), err_msg=f"{i} {path}")
