"""The registries of merge methods and search strategies: one's own registered from outside the
package works wherever a built-in one does (merge_params, a `jaxmerge merge` recipe, an evolve
config, GenomeSpace; run_search), duplicates are refused and unknown names list the known ones.
Every registration here is undone by its fixture."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model
from safetensors.numpy import load_file

import jaxmerge
from jaxmerge.merge import (
    MergeMethod,
    Parameter,
    flat_params,
    get_method,
    merge_params,
    method_names,
    register_method,
    stack_sources,
    unregister_method,
)
from jaxmerge.merge.plan import RecipeError
from jaxmerge.merge.recipe import merge_from_yaml
from jaxmerge.search import GenomeSpace
from jaxmerge.search.strategies import get_strategy, register_strategy, strategy_names, unregister_strategy

# ----------------------------------------------------------------------------- merge methods


def midpoint(base, sources, params, stats, key, options):
    """Halfway from the base to the sources' weighted mean: base + (sum w_i x_i / sum w_i - base) / 2."""
    x0 = base.astype(jnp.float32)
    weights = params["weight"].reshape((-1,) + (1,) * base.ndim)
    mean = jnp.sum(weights * sources.astype(jnp.float32), axis=0) / jnp.sum(params["weight"])
    return (x0 + (mean - x0) / 2).astype(base.dtype)


def numpy_midpoint(base, sources, weights):
    mean = sum(w * s for w, s in zip(weights, sources, strict=True)) / sum(weights)
    return base + (mean - base) / 2


MIDPOINT = MergeMethod("midpoint", (Parameter("weight", per_source=True, default=1.0),), midpoint, base="required")


@pytest.fixture
def registered_midpoint():
    register_method(MIDPOINT)
    yield MIDPOINT
    unregister_method("midpoint")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny base and two fine-tunes of it, saved as HF checkpoints."""
    root = tmp_path_factory.mktemp("family")
    for i, name in enumerate(("base", "ft0", "ft1")):
        make_hf_model("mistral_gqa", seed=i, num_hidden_layers=2).save_pretrained(root / name)
    return root


def read(directory):
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_registered_method_merges_params(registered_midpoint, family):
    base = flat_params(jaxmerge.load(family / "base"))
    sources = [flat_params(jaxmerge.load(family / name)) for name in ("ft0", "ft1")]
    weights = np.array([1.0, 3.0], np.float32)
    params = {p: {"weight": weights} for p in base}
    merged = jax.jit(lambda b, s, p: merge_params("midpoint", b, s, p))(base, stack_sources(base, sources), params)
    for path in base:
        expected = numpy_midpoint(np.asarray(base[path]), [np.asarray(s[path]) for s in sources], weights)
        np.testing.assert_allclose(np.asarray(merged[path]), expected, rtol=1e-5, atol=1e-6)


def test_registered_method_in_a_recipe(registered_midpoint, family, tmp_path):
    recipe = textwrap.dedent(f"""
        merge_method: midpoint
        base_model: {family / "base"}
        models:
          - model: {family / "ft0"}
            parameters: {{weight: 1.0}}
          - model: {family / "ft1"}
            parameters: {{weight: 3.0}}
        dtype: float32
    """)
    (tmp_path / "recipe.yml").write_text(recipe)
    merged = read(merge_from_yaml(tmp_path / "recipe.yml", tmp_path / "out", progress=False))
    base, ft0, ft1 = (read(family / name) for name in ("base", "ft0", "ft1"))
    assert merged.keys() == base.keys()
    for name, tensor in merged.items():
        np.testing.assert_allclose(tensor, numpy_midpoint(base[name], [ft0[name], ft1[name]], [1.0, 3.0]),
                                   rtol=1e-5, atol=1e-6)


def test_registered_method_in_a_genome_space(registered_midpoint):
    space = GenomeSpace("midpoint", num_sources=2, num_layers=4, evolve=("weight",), layer_groups=2)
    genome = np.asarray(space.initial()).copy()
    genome[:] = 0.25
    params = space.decode(jnp.asarray(genome), ["layers.mlp.up_proj.kernel"])
    np.testing.assert_allclose(params["layers.mlp.up_proj.kernel"]["weight"], 0.25)


def test_registered_method_in_an_evolve_config(registered_midpoint, tmp_path):
    from test_evolve import small_config, toy_data, write_config

    from jaxmerge.pipeline import load_config

    toy_data(tmp_path)
    config = small_config(tmp_path)
    config["genome"]["merge_method"] = "midpoint"
    loaded = load_config(write_config(tmp_path, config))
    assert loaded.genome.merge_method == "midpoint" and loaded.genome.evolved() == ("weight",)


def test_duplicate_and_unknown_methods(registered_midpoint):
    assert "midpoint" in method_names()
    with pytest.raises(ValueError, match="'midpoint' is already registered"):
        register_method(MIDPOINT)
    assert register_method(MIDPOINT, replace=True) is MIDPOINT
    with pytest.raises(ValueError, match="'ties' is already registered"):
        register_method(MergeMethod("ties", (), midpoint, base="required"))
    with pytest.raises(KeyError, match=r"unknown merge method 'nope' \(registered: .*midpoint.*ties"):
        get_method("nope")
    with pytest.raises(RecipeError, match="unknown merge method 'nope'.*midpoint"):
        from jaxmerge.merge.recipe import parse_recipe
        parse_recipe("merge_method: nope\nmodels: [{model: x}]\n")


@pytest.mark.parametrize("method, message", [
    (MergeMethod("two weights", (), midpoint, base="required"), "name is an identifier"),
    (MergeMethod("twice", (Parameter("w", True), Parameter("w", False)), midpoint, base="required"), "distinct"),
    (MergeMethod("based", (), midpoint, base="maybe"), "base must be one of required, optional, none"),
    (MergeMethod("none_in", (), midpoint, base="none", min_sources=0), "1 <= min_sources <= max_sources"),
    (MergeMethod("few", (), midpoint, base="none", min_sources=3, max_sources=2), "min_sources <= max_sources"),
    (MergeMethod("statless", (), midpoint, base="none", stats_required=True), "give it a prepare function"),
])
def test_bad_method_declarations_are_refused(method, message):
    with pytest.raises(ValueError, match=message):
        register_method(method)
    assert method.name not in method_names()


def test_unregistered_method_is_gone():
    register_method(MIDPOINT)
    unregister_method("midpoint")
    assert "midpoint" not in method_names()
    with pytest.raises(KeyError, match="unknown merge method 'midpoint'"):
        unregister_method("midpoint")


# ----------------------------------------------------------------------------- search strategies


def plain_cma_es(*, population_size, solution):
    """CMA-ES as one's own factory: the same algorithm the name cma_es makes."""
    from evosax.algorithms import CMA_ES

    return CMA_ES(population_size=population_size, solution=solution)


@pytest.fixture
def registered_strategy():
    register_strategy("my_cma_es", plain_cma_es)
    yield "my_cma_es"
    unregister_strategy("my_cma_es")


def test_registered_strategy_runs_a_search(registered_strategy, tmp_path):
    from search_problem import search

    ours = search(tmp_path / "ours", 4, strategy="my_cma_es")
    by_name = search(tmp_path / "by_name", 4, strategy="cma_es")
    assert len(ours.history) == 4
    np.testing.assert_array_equal(ours.best_genome, by_name.best_genome)
    assert [h["best_fitness"] for h in ours.history] == [h["best_fitness"] for h in by_name.history]


def test_duplicate_and_unknown_strategies(registered_strategy):
    assert {"my_cma_es", "nsga2", "cma_es", "sep_cma_es", "snes"} <= set(strategy_names())
    assert get_strategy("my_cma_es") is plain_cma_es
    with pytest.raises(ValueError, match="'my_cma_es' is already registered"):
        register_strategy("my_cma_es", plain_cma_es)
    with pytest.raises(ValueError, match="'nsga2' is already registered"):
        register_strategy("nsga2", plain_cma_es)
    with pytest.raises(ValueError, match=r"unknown strategy 'pso' \(known: .*my_cma_es.*nsga2"):
        get_strategy("pso")
    with pytest.raises(ValueError, match="must be an identifier"):
        register_strategy("my cma", plain_cma_es)


def test_every_evosax_algorithm_and_a_registered_one_pass_validation(registered_strategy, tmp_path):
    """evosax's distribution-based algorithms (its own registry), in lower case; a registered
    strategy; an unknown name refused with the known ones listed."""
    from evosax.algorithms.distribution_based import distribution_based_algorithms
    from test_evolve import small_config, toy_data, write_config

    from jaxmerge.pipeline import ConfigError, load_config

    toy_data(tmp_path)
    path = write_config(tmp_path, small_config(tmp_path))
    names = [name.lower() for name in distribution_based_algorithms] + ["my_cma_es"]
    assert {"cma_es", "sep_cma_es", "snes", "xnes", "pgpe"} <= set(names)
    for name in names:
        assert load_config(path, [f"search.strategy={name}"]).search.strategy == name
    with pytest.raises(ConfigError, match=r"search.strategy: unknown strategy 'pso' \(known: .*my_cma_es"):
        load_config(path, ["search.strategy=pso"])


def test_a_multi_host_config_does_not_import_evosax(tmp_path):
    """evosax starts JAX's backend on import: a distributed run's config is read and validated
    without it (its strategy's name is checked once the search starts)."""
    from test_evolve import small_config, toy_data, write_config

    toy_data(tmp_path)
    config = small_config(tmp_path, distributed=True)
    config["search"]["strategy"] = "xnes"
    path = write_config(tmp_path, config)
    script = ("import sys; from jaxmerge.pipeline import load_config; "
              f"assert load_config({str(path)!r}).search.strategy == 'xnes'; "
              "assert 'evosax' not in sys.modules, 'evosax was imported'")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
