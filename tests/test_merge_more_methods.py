"""mergekit 0.1.5's other merge methods (nuslerp, multislerp, karcher, sce, nearswap,
arcee_fusion, ram, ramplus_tl, and model_stock's filter_wise) against mergekit's own merges
of tiny random models: from a recipe (`jaxmerge merge`, streamed in the checkpoint's layout)
and in memory (in Flax's layout: from a genome, its plan exported as mergekit YAML).

mergekit runs in this process (`mergekit.merge.run_merge`, what mergekit-yaml runs): a
command per recipe would take most of this file's time. Recipes in bfloat16 / float16, which
mergekit computes in, have their own test (`test_half_precision_recipe_matches_mergekit`:
most give mergekit's bits there). In fp32:
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
import ml_dtypes
import numpy as np
import pytest
import torch
import yaml
from conftest import write_fine_tuned_family
from mergekit import merge_methods as mergekit_methods
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods.base import TensorGroup
from mergekit.options import MergeOptions
from test_merge_mergekit import read

import jaxmerge
from jaxmerge.merge import broadcast_params, flat_params, get_method, merge_params, merge_tensor, stack_sources
from jaxmerge.merge.methods import method_names
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
    write_fine_tuned_family(root, num_hidden_layers=2, num_key_value_heads=4, intermediate_size=32)
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


HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
HALF_NUMPY = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@pytest.fixture(scope="module")
def half_family(family, tmp_path_factory):
    """`family` stored in bfloat16 and in float16: ROOT/<dtype>/<model>."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("half_family")
    for name in ("base", "ft0", "ft1", "ft2"):
        for dtype, torch_dtype in HALF.items():
            AutoModelForCausalLM.from_pretrained(family / name, dtype=torch_dtype).save_pretrained(root / dtype / name)
    return root


SCE_ALL = """
    merge_method: sce
    base_model: ROOT/base
    models:
      - model: ROOT/ft0
      - model: ROOT/ft1
      - model: ROOT/ft2
"""
# (name, dtype) -> (recipe: a name in RECIPES / RECIPES_WITH_BASE or its text, inputs stored in "half" (the
# recipe's dtype) or "float32", extra recipe lines, check: at most how many ulps of the tensor's largest entry (in
# the output dtype) at at most which fraction of its entries, or "flips")
HALF_RECIPES = {
    ("nearswap", "bfloat16"): ("nearswap", "float32", "", (0, 0)),
    ("nearswap", "float16"): ("nearswap", "half", "", (0, 0)),
    ("ram", "bfloat16"): ("ram", "half", "", (0, 0)),
    ("ram", "float16"): ("ram", "float32", "", (0, 0)),
    ("ramplus_tl", "bfloat16"): ("ramplus_tl", "half", "out_dtype: float32\n", (0, 0)),
    ("ramplus_tl", "float16"): ("ramplus_tl", "half", "", (0, 0)),
    ("arcee_fusion", "bfloat16"): ("arcee_fusion", "half", "", "flips"),
    ("arcee_fusion", "float16"): ("arcee_fusion", "half", "out_dtype: float32\n", "flips"),
    ("sce", "bfloat16"): (SCE_ALL, "half", "", (1, 0.05)),
    ("sce", "float16"): (SCE_ALL, "float32", "", (1, 0.05)),
    ("nuslerp", "bfloat16"): ("nuslerp", "half", "", (1, 0.05)),
    ("nuslerp_base", "bfloat16"): ("nuslerp_base", "half", "", (1, 0.05)),
    ("nuslerp_row_wise", "float16"): ("nuslerp_row_wise", "half", "", (1, 0.05)),
    ("multislerp", "bfloat16"): ("multislerp", "half", "", (1, 0.05)),
    ("multislerp_base", "float16"): ("multislerp_base", "half", "", (1, 0.05)),
    ("karcher", "bfloat16"): ("karcher", "half", "", (1, 0.05)),
    ("karcher", "float16"): ("karcher", "half", "", (1, 0.05)),
}


@pytest.mark.parametrize("name, dtype", sorted(HALF_RECIPES))
def test_half_precision_recipe_matches_mergekit(family, half_family, tmp_path, name, dtype):
    """A recipe's `dtype: bfloat16` / `float16` is the dtype mergekit computes in (each torch
    operation rounded to it; karcher's norms float32): `jaxmerge merge` computes so too.
    - nearswap, ram and ramplus_tl give mergekit's bits, from inputs stored in the dtype or
      in float32; arcee_fusion too, within its flips rule (its KL sums may round otherwise).
    - ramplus_tl's and arcee_fusion's results are float32 in mergekit (float32 scales, a
      float32 mask) and written so unless out_dtype says otherwise; jaxmerge writes the
      recipe's dtype, those float32 results rounded to it (compared so), and with
      `out_dtype: float32` their float32 bits.
    - Methods with float32 reductions inside (norms, dot products, means, softmax sums:
      nuslerp, multislerp, karcher, sce) sum in XLA's order rather than torch's: a last
      float32 bit can differ, and a value within that bit of a rounding boundary of the
      dtype then rounds to its neighbour. Most such sums are rounded to the dtype at once,
      which hides the difference (nuslerp, multislerp and sce give mergekit's bits here);
      karcher keeps its norms float32, so every unit vector x / |x| can round the other way
      at a few entries, and its iterations carry that on (float16: 3 of 20640 entries here,
      by one ulp; on other tensors ~2% of the entries, by up to 1 ulp of the largest, the
      smallest entries by more of their own). So: up to 1 ulp of the tensor's largest entry
      in the output dtype, at under 5% of its entries.
    - sce selects with select_topk 1: below 1, entries whose half-precision variance ties
      the cut are common, and mergekit's top-k keeps an arbitrary count of them."""
    from test_merge_dtype_semantics import ulps

    recipe, storage, extra, check = HALF_RECIPES[(name, dtype)]
    known = {**RECIPES, **RECIPES_WITH_BASE}
    recipe = known[recipe][1] if recipe in known else recipe
    root = family if storage == "float32" else half_family / dtype
    path = tmp_path / "recipe.yml"
    path.write_text(textwrap.dedent(recipe).replace("ROOT", str(root)) + f"dtype: {dtype}\n" + extra)
    theirs = read(run_mergekit(path, tmp_path / "theirs"))
    ours = read(merge_from_yaml(path, tmp_path / "ours", progress=False))
    out_dtype = np.dtype(np.float32 if extra else HALF_NUMPY[dtype])
    assert ours.keys() == theirs.keys()
    base, source = (read(root / n) for n in ("base", "ft2"))
    flipped = 0
    for k, a in ours.items():
        assert a.dtype == out_dtype, k
        assert theirs[k].dtype == (np.float32 if name in ("ramplus_tl", "arcee_fusion") else out_dtype), k
        b = theirs[k].astype(a.dtype)  # mergekit's float32 results without out_dtype: as jaxmerge writes them
        differ = ulps(a, b)
        if check == "flips":  # differ only where one took the base's value and the other the fused one
            x0 = base[k].astype(HALF_NUMPY[dtype]).astype(np.float32)
            change = (source[k].astype(HALF_NUMPY[dtype]).astype(np.float32) - x0).astype(HALF_NUMPY[dtype])
            fused, x0 = (x0 + change.astype(np.float32)).astype(out_dtype), x0.astype(out_dtype)
            assert np.all(((a == x0) & (b == fused)) | ((a == fused) & (b == x0)) | (differ == 0)), k
            flipped += int((differ > 0).sum())
        else:  # in units in the last place of the tensor's largest entry, in the output dtype
            most, fraction = check
            top = np.abs(b.astype(np.float32)).max()
            unit = ml_dtypes.finfo(a.dtype).eps * 2.0 ** np.floor(np.log2(top)) if top else 1.0
            worst = np.abs(a.astype(np.float32) - b.astype(np.float32)).max() / unit
            assert worst <= most and (differ > 0).mean() <= fraction, (
                f"{k}: {int((differ > 0).sum())} of {differ.size} entries differ, by up to {worst} ulps")
    assert flipped <= MAX_FLIPPED * sum(v.size for v in ours.values()), f"{flipped} entries differ"


def test_registry_matches_mergekits_declarations():
    """Each method's parameters (name, default, per source or for the merge), its base and its
    source counts are mergekit's. (sce's int8_mask is a recipe option of every method here.)"""
    registered = {m.name() if hasattr(m, "name") else m.spec.name for m in mergekit_methods.registered_methods()}
    assert set(method_names()) == registered  # every method mergekit registers, and no other
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


GENOMES = {
    # per-source weights, per layer: row-wise slerps of the task vectors
    "nuslerp": (dict(evolve=("weight",), fixed=(("nuslerp_flatten", 0.0), ("nuslerp_row_wise", 1.0))),
                ["ft0", "ft2"], "layers.self_attn.q_proj.kernel"),
    # a merge-wide parameter, per layer: one value per layer group (the genome's first source row)
    "sce": (dict(evolve=("select_topk",)), ["ft0", "ft1", "ft2"], "layers.mlp.up_proj.kernel"),
}


@pytest.mark.parametrize("method", sorted(GENOMES))
def test_genome_merges_compile_once_and_match_mergekit_on_their_recipes(family, tmp_path, method):
    """A genome of the method's continuous parameters, per layer (the statistics prepared
    once): its jitted merge compiles once for every genome, each genome gets its own merge,
    and mergekit's merge of the genome's exported recipe gives the same tensors."""
    from jaxmerge.merge import merge_plan, prepare
    from jaxmerge.search import GenomeSpace
    from jaxmerge.search.export import genome_recipe

    genes, sources, changed = GENOMES[method]
    space = GenomeSpace(method, num_sources=len(sources), num_layers=2, layer_groups=2, **genes)
    names = [str(family / n) for n in ["base", *sources]]
    base = flat_model(names[0])
    stacked = stack_sources(base, [flat_model(n) for n in names[1:]])
    stats = jax.jit(lambda b, s: prepare(method, b, s))(base, stacked)
    paths = sorted(base)
    decoded = space.decode(space.initial(), paths)
    for name in genes["evolve"]:
        per_source = get_method(method).parameter(name).per_source
        assert decoded[changed][name].shape == ((len(sources), 2) if per_source else (2,))

    @jax.jit
    def merged(genome):
        return merge_plan(space.plan(genome, paths), base, stacked, stats=stats)

    genomes = [space.rounded(space.initial() + 0.3 * jax.random.normal(jax.random.key(i), (space.num_dims,)))
               for i in range(2)]
    first, second = merged(genomes[0]), merged(genomes[1])
    assert merged._cache_size() == 1
    assert not np.allclose(first[changed], second[changed])
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
