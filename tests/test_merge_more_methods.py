"""mergekit 0.1.5's other merge methods (nuslerp, multislerp, karcher, sce, nearswap,
arcee_fusion, ram, ramplus_tl, and model_stock's filter_wise) against mergekit's own merges
of tiny random models: from a recipe (`jaxmerge merge`, streamed in the checkpoint's layout)
and in memory (in Flax's layout: from a genome, its plan exported as mergekit YAML).

mergekit runs in this process (`mergekit.merge.run_merge`, what mergekit-yaml runs): a
command per recipe would take most of this file's time. All in fp32:
- nearswap, ram and ramplus_tl give mergekit's bits.
- Methods with norms, dot products, sines and arccosines (nuslerp, multislerp, karcher,
  model_stock) and sce (mean squares) differ in the last bits: XLA and torch reduce in other
  orders and have their own sin / acos (and XLA turns a division by a broadcast value into a
  product with its reciprocal). The bound is 4 units in the last place of the tensor's
  largest entry; 8 for model_stock's filter_wise, whose t = 3 cos / (1 + 2 cos) per row moves
  by up to 3 / (1 + 2 cos)^2 (~30 here) times the last-bit difference of the row's cosine.
- arcee_fusion's importance (|change| times the KL divergence of two nearly equal softmaxes,
  a sum of cancelling terms) differs by ~1e-4 relative between torch's exp and XLA's, so an
  entry that close to the threshold may fall on its other side: such entries must be rare
  and each one either the base's value or the fused one.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from conftest import make_hf_model
from mergekit import merge_methods as mergekit_methods
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods.base import TensorGroup
from mergekit.options import MergeOptions
from test_merge_mergekit import read

import jaxmerge
from jaxmerge.merge import broadcast_params, flat_params, get_method, merge_params, merge_tensor, stack_sources
from jaxmerge.merge.recipe import merge_from_yaml

NEW = ("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
ULPS = 4
MAX_FLIPPED = 1e-3  # arcee_fusion: the fraction of entries on the other side of the threshold


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three fine-tunes (base + noise of std 0.02, 0.03, 0.05). Two layers whose
    projections are all 32 x 32, beside the [96, 32] embeddings and output head: three tensor
    shapes, so each method compiles three programs."""
    root = tmp_path_factory.mktemp("family")
    shape = dict(num_hidden_layers=2, num_key_value_heads=4, intermediate_size=32)
    make_hf_model("mistral_gqa", seed=0, **shape).save_pretrained(root / "base")
    for i, scale in enumerate([0.02, 0.03, 0.05]):
        tuned = make_hf_model("mistral_gqa", seed=0, **shape)
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * scale)
        tuned.save_pretrained(root / f"ft{i}")
    return root


def run_mergekit(recipe_path, out_dir):
    """mergekit's merge of a recipe file, as mergekit-yaml runs it."""
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_path.read_text()))
    run_merge(config, str(out_dir), MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return out_dir


def write_recipe(family, tmp_path, recipe: str):
    path = tmp_path / "recipe.yml"
    path.write_text(textwrap.dedent(recipe).replace("ROOT", str(family)) + "dtype: float32\n")
    return path


def compare(ours: dict, theirs: dict, check, base: dict | None = None, source: dict | None = None):
    """check: "exact" (bit for bit), a number of ulps (of each tensor's largest entry) or "flips"
    (arcee_fusion: equal but for a few entries, where one takes the base's value and the other
    the fused one, base + (source - base))."""
    assert ours.keys() == theirs.keys()
    flipped = 0
    for k in ours:
        a, b = np.asarray(ours[k]), np.asarray(theirs[k])
        if check == "exact":
            assert np.array_equal(a, b), f"{k}: {np.sum(a != b)} entries differ, by up to {np.abs(a - b).max()}"
        elif check == "flips":
            x0, differ = base[k], a != b
            fused = x0 + (source[k] - x0)
            flipped += int(differ.sum())
            assert np.all(((a == x0) & (b == fused)) | ((a == fused) & (b == x0)) | ~differ), k
        else:
            worst = np.abs(a - b).max() / np.spacing(np.abs(b).max())
            assert worst <= check, f"{k}: {worst:.1f} ulps of its largest entry"
    assert flipped <= MAX_FLIPPED * sum(v.size for v in ours.values()), f"{flipped} entries differ"


RECIPES = {
    "nuslerp": (ULPS, """
        merge_method: nuslerp
        models:
          - model: ROOT/ft0
            parameters: {weight: 1.0}
          - model: ROOT/ft2
            parameters: {weight: 3.0}
    """),
    "nuslerp_rows": (ULPS, """
        merge_method: nuslerp
        models:
          - model: ROOT/ft0
            parameters: {weight: 1.0}
          - model: ROOT/ft1
            parameters: {weight: 3.0}
        parameters: {nuslerp_flatten: false}
    """),
    "nuslerp_row_wise": (ULPS, """
        merge_method: nuslerp
        models:
          - model: ROOT/ft1
            parameters: {weight: 0.5}
          - model: ROOT/ft2
            parameters: {weight: 1.5}
        parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
    """),
    "multislerp": (ULPS, """
        merge_method: multislerp
        models:
          - model: ROOT/ft0
            parameters: {weight: 0.5}
          - model: ROOT/ft1
            parameters: {weight: 0.25}
          - model: ROOT/ft2
            parameters: {weight: 1.0}
        parameters: {normalize_weights: false, eps: 1.0e-6}
    """),
    "karcher": (ULPS, """
        merge_method: karcher
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
          - model: ROOT/ft1
          - model: ROOT/ft2
        parameters: {max_iter: 30, tol: 1.0e-7}
    """),
    "sce": (ULPS, """
        merge_method: sce
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
          - model: ROOT/ft1
          - model: ROOT/ft2
        parameters: {select_topk: 0.4}
    """),
    "nearswap": ("exact", """
        merge_method: nearswap
        base_model: ROOT/base
        models:
          - model: ROOT/ft2
        parameters: {t: 0.03}
    """),
    "arcee_fusion": ("flips", """
        merge_method: arcee_fusion
        base_model: ROOT/base
        models:
          - model: ROOT/ft2
    """),
    "ram": ("exact", """
        merge_method: ram
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
          - model: ROOT/ft1
          - model: ROOT/ft2
        parameters: {epsilon: 0.03}
    """),
    "ramplus_tl": ("exact", """
        merge_method: ramplus_tl
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
          - model: ROOT/ft1
          - model: ROOT/ft2
        parameters: {epsilon: 0.03, r: 0.5, alpha: 0.3}
    """),
    "model_stock_filter_wise": (2 * ULPS, """
        merge_method: model_stock
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
          - model: ROOT/ft1
          - model: ROOT/ft2
        parameters: {filter_wise: true}
    """),
}
RECIPES_WITH_BASE = {
    "nuslerp_base": (ULPS, """
        merge_method: nuslerp
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters: {weight: 0.25}
          - model: ROOT/ft1
            parameters: {weight: 0.75}
        parameters: {nuslerp_flatten: false}
    """),
    "multislerp_base": (ULPS, """
        merge_method: multislerp
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters: {weight: 0.5}
          - model: ROOT/ft2
            parameters: {weight: 0.7}
    """),
}


@pytest.mark.parametrize("name", sorted(RECIPES) + sorted(RECIPES_WITH_BASE))
def test_recipe_matches_mergekit(family, tmp_path, name):
    check, recipe = {**RECIPES, **RECIPES_WITH_BASE}[name]
    path = write_recipe(family, tmp_path, recipe)
    theirs = read(run_mergekit(path, tmp_path / "theirs"))
    ours = read(merge_from_yaml(path, tmp_path / "ours", progress=False))
    compare(ours, theirs, check, read(family / "base"), read(family / "ft2"))


def test_registry_matches_mergekits_declarations():
    """Each method's parameters (name, default, per source or for the merge), its base and its
    source counts are mergekit's. (sce's int8_mask is a recipe option of every method here.)"""
    roles = {"required": "required", "optional": "optional", "ignored": "none"}
    for name in NEW + ("model_stock",):
        ours, theirs = get_method(name), mergekit_methods.get(name).spec
        declared = {p.name: (p.scope.value != "shared", None if p.required else float(p.default))
                    for p in theirs.parameters if p.name != "int8_mask"}
        assert {p.name: (p.per_source, p.default) for p in ours.parameters} == declared, name
        assert ours.base == roles[theirs.contract.base.value], name
        contract = theirs.contract
        with_base = int(contract.base.value == "required")
        low = contract.min_non_base if contract.min_non_base is not None else contract.min_inputs - with_base
        high = contract.max_non_base if contract.max_non_base is not None else (
            None if contract.max_inputs is None else contract.max_inputs - with_base)
        assert (ours.min_sources, ours.max_sources) == (max(low, 1), high), name


# ----------------------------------------------------------------------------- in memory (Flax layout)


def flat_model(directory) -> dict:
    return flat_params(jaxmerge.load(directory))


@pytest.mark.parametrize("name, values, sources", [
    ("arcee_fusion", {}, ["ft2"]),
    ("model_stock_filter_wise", {"filter_wise": 1.0}, ["ft0", "ft1", "ft2"]),
    ("sce", {"select_topk": 0.4}, ["ft0", "ft1", "ft2"]),
    ("karcher", {"max_iter": 30, "tol": 1e-7}, ["ft0", "ft1", "ft2", "base"]),  # the recipe's base is an input
])
def test_in_memory_merge_matches_mergekit(family, tmp_path, name, values, sources):
    """As a search merges: statistics prepared once, then a jitted merge of every tensor, the
    stacked layers' under vmap. Rows run along a Flax kernel's input axis (-2), as along a
    torch weight's last axis; sce selects with its prepared variances, karcher's layers
    stop iterating each at its own step."""
    from jaxmerge.merge import prepare

    check, recipe = RECIPES[name]
    method = yaml.safe_load(textwrap.dedent(recipe))["merge_method"]
    theirs = flat_model(run_mergekit(write_recipe(family, tmp_path, recipe), tmp_path / "theirs"))
    base = flat_model(family / "base")
    stacked = stack_sources(base, [flat_model(family / s) for s in sources])
    stats = jax.jit(lambda b, s: prepare(method, b, s))(base, stacked)  # one compilation, not one per tensor
    ours = jax.jit(lambda b, s, p, st: merge_params(method, b, s, p, stats=st))(
        base, stacked, broadcast_params(method, base, len(sources), **values), stats)
    compare(ours, theirs, check, base, flat_model(family / sources[-1]))


def test_genome_merges_compile_once_and_match_mergekit_on_their_recipes(family, tmp_path):
    """A genome of nuslerp's per-source weights, per layer (row-wise slerps of the task
    vectors, the statistics prepared once): its jitted merge compiles once for every genome,
    each genome gets its own merge, and mergekit's merge of the genome's exported recipe gives
    the same tensors."""
    from jaxmerge.merge import merge_plan, prepare
    from jaxmerge.search import GenomeSpace
    from jaxmerge.search.export import genome_recipe

    space = GenomeSpace("nuslerp", num_sources=2, num_layers=2, evolve=("weight",), layer_groups=2,
                        fixed=(("nuslerp_flatten", 0.0), ("nuslerp_row_wise", 1.0)))
    names = [str(family / n) for n in ("base", "ft0", "ft2")]
    base = flat_model(names[0])
    stacked = stack_sources(base, [flat_model(n) for n in names[1:]])
    stats = jax.jit(lambda b, s: prepare("nuslerp", b, s))(base, stacked)
    paths = sorted(base)

    @jax.jit
    def merged(genome):
        return merge_plan(space.plan(genome, paths), base, stacked, stats=stats)

    genomes = [space.rounded(space.initial() + 0.3 * jax.random.normal(jax.random.key(i), (space.num_dims,)))
               for i in range(2)]
    first, second = merged(genomes[0]), merged(genomes[1])
    assert merged._cache_size() == 1
    assert not np.allclose(first["layers.self_attn.q_proj.kernel"], second["layers.self_attn.q_proj.kernel"])
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(genome_recipe(space, genomes[1], names[0], names[1:], paths))
    compare(second, flat_model(run_mergekit(recipe, tmp_path / "theirs")), ULPS)


# ----------------------------------------------------------------------------- edge cases, one tensor


def mergekit_tensor(name: str, base, sources, **parameters) -> np.ndarray:
    """mergekit's method on one tensor (base first if given)."""
    tensors = ([] if base is None else [torch.tensor(base)]) + [torch.tensor(s) for s in sources]
    group = TensorGroup.from_tensors(tensors, base_index=None if base is None else 0)
    (out,) = mergekit_methods.get(name)((group,), parameters=parameters)
    return out.numpy()


def ours_tensor(name: str, base, sources, **parameters) -> np.ndarray:
    merge = jax.jit(lambda b, s, p: merge_tensor(name, b, s, p))  # one compilation, not one per operation
    return np.asarray(merge(None if base is None else jnp.asarray(base), jnp.asarray(np.stack(sources)), parameters))


RNG = np.random.RandomState(7)
X = RNG.randn(4, 6).astype(np.float32)
Y = RNG.randn(4, 6).astype(np.float32)


@pytest.mark.parametrize("name, base, sources, parameters", [
    ("nuslerp", None, [X, 2 * X], {"weight": [1.0, 3.0]}),  # colinear: linear interpolation
    ("nuslerp", None, [X, Y], {"weight": [1.0, -1.0], "nuslerp_flatten": False}),  # weights cancel: t = 1/2
    ("multislerp", X, [Y], {"weight": [2.0]}),  # one source: itself
    ("multislerp", None, [X, -X], {"weight": [1.0, 1.0]}),  # antipodal: the weighted sum
    ("karcher", None, [X, np.zeros_like(X), Y], {}),  # a zero input: no direction, a third of the norm
    ("karcher", None, [np.zeros_like(X), np.zeros_like(X)], {}),  # nothing above tol: zeros
    ("karcher", None, [X, Y, X + Y], {"max_iter": 1}),
    ("sce", X, [X + 1e-4 * Y, X - 2e-4 * Y], {}),  # mean squares below 1e-6: equal weights
    ("sce", X, [Y, X + Y], {"select_topk": 0.0}),  # nothing selected: the base
    ("ram", X, [X + 1e-6 * Y, Y], {}),  # one source moves nothing
    ("ramplus_tl", X, [Y, X + 0.01 * Y, X - Y], {"epsilon": 0.5, "alpha": -0.1}),
    ("nearswap", X, [Y], {"t": 0.5}),
])
def test_edge_cases_match_mergekit(name, base, sources, parameters):
    ours, theirs = ours_tensor(name, base, sources, **parameters), mergekit_tensor(name, base, sources, **parameters)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ULPS * np.spacing(np.abs(theirs).max()))


def test_more_than_two_antipodal_sources_give_nan_where_mergekit_raises():
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mergekit_tensor("multislerp", None, [X, -X, X, -X], weight=[1.0] * 4)
    assert np.isnan(ours_tensor("multislerp", None, [X, -X, X, -X], weight=[1.0] * 4)).all()
