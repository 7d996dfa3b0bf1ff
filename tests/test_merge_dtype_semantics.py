"""mergekit's dtype semantics and tie-breaking: `jaxmerge merge` against mergekit 0.1.5's own
outputs, bit for bit, on half-precision recipes whose task vectors tie everywhere.

mergekit computes in its `dtype:` (torch arithmetic in bfloat16 / float16: each step rounded
to it) and writes `out_dtype:`; TIES and breadcrumbs keep exactly int(density N) entries,
the ones torch's CPU sort (libstdc++'s introsort, not stable) puts first: `ties="torch"`
(jaxmerge's default keeps tied entries in flat order, as the search does). The checkpoints here
hold values on a coarse grid, so that thousands of |task vector| entries tie at every
selection's cut, and the arithmetic has rounding to do (weights such as 0.7 are not exact in
bfloat16). mergekit runs in-process (its `run_merge`, what mergekit-yaml calls).
"""

import shutil
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import yaml
from conftest import tied_family
from safetensors.numpy import load_file

from jaxmerge import cli
from jaxmerge.merge import Options, merge_params, merge_tensor, prepare, stack_sources
from jaxmerge.merge.methods import _introsort_window, exact_counts, get_method, rounding
from jaxmerge.merge.recipe import merge_from_yaml

pytestmark = pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit not installed")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def write_family(root, storage: str):
    """A base and three fine-tunes stored in `storage`: the base on a 2^-10 grid, the task
    vectors on a 2^-9 grid (a few levels: ties at every cut); the third fine-tune's task
    vector continuous, then rounded to the storage dtype."""
    for i, model in enumerate(tied_family(num_hidden_layers=2, hidden_size=64, intermediate_size=128)):
        model.to(DTYPES[storage]).save_pretrained(root / ("base" if i == 0 else f"ft{i - 1}"))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype_families")
    for storage in DTYPES:
        write_family(root / storage, storage)
    return root


def mergekit(recipe: str, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe)), str(out),
              options=MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False))


def read(directory) -> dict:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def run_both(families, tmp_path, recipe: str, **kwargs):
    """`jaxmerge merge --ties torch` (mergekit's choice among tied entries; --compute-dtype
    float32 where compute_dtype="float32") and mergekit."""
    recipe = textwrap.dedent(recipe).replace("ROOT", str(families))
    (tmp_path / "recipe.yml").write_text(recipe)
    flags = ["--compute-dtype", kwargs.pop("compute_dtype")] if "compute_dtype" in kwargs else []
    assert not kwargs
    assert cli.main(["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "ours"), "--quiet", "--ties", "torch",
                     *flags]) == 0
    mergekit(recipe, tmp_path / "theirs")
    return read(tmp_path / "ours"), read(tmp_path / "theirs")


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in units in the last place of their dtype (same signs: their bit patterns' distance)."""
    width = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
    ia, ib = a.view(width).astype(np.int64), b.view(width).astype(np.int64)
    ia = np.where(ia < 0, np.iinfo(width).min - ia, ia)  # sign-magnitude to two's complement order
    ib = np.where(ib < 0, np.iinfo(width).min - ib, ib)
    return np.abs(ia - ib)


def assert_bits(ours: dict, theirs: dict, max_ulps: int = 0) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        distance = ulps(ours[key], theirs[key])
        assert distance.max() <= max_ulps, (f"{key}: {int((distance > max_ulps).sum())} of {distance.size} entries "
                                            f"differ by up to {int(distance.max())} ulps")


RECIPES = {
    "ties_bf16": """
        merge_method: ties
        base_model: ROOT/bfloat16/base
        models:
          - model: ROOT/bfloat16/ft0
            parameters: {density: 0.7, weight: 0.7}
          - model: ROOT/bfloat16/ft1
            parameters: {density: [0.35, 0.55], weight: [0.45, 0.9]}
          - model: ROOT/bfloat16/ft2
            parameters: {density: 0.3, weight: 0.3}
        dtype: bfloat16
    """,
    "ties_fp16_from_fp32_out_fp32": """
        merge_method: ties
        base_model: ROOT/float32/base
        models:
          - model: ROOT/float32/ft0
            parameters: {density: 0.45, weight: 0.8}
          - model: ROOT/float32/ft1
            parameters: {density: 0.6, weight: 0.35}
        parameters: {normalize: false, int8_mask: true, lambda: 1.3}
        dtype: float16
        out_dtype: float32
    """,
    "ties_rescale_fp16": """
        merge_method: ties
        base_model: ROOT/float16/base
        models:
          - model: ROOT/float16/ft0
            parameters: {density: 0.25, weight: 0.6}
          - model: ROOT/float16/ft2
            parameters: {density: 0.5, weight: 0.7}
        parameters: {rescale: true}
    """,
    "breadcrumbs_ties_bf16": """
        merge_method: breadcrumbs_ties
        base_model: ROOT/bfloat16/base
        models:
          - model: ROOT/bfloat16/ft0
            parameters: {density: 0.7, gamma: 0.05, weight: 0.6}
          - model: ROOT/bfloat16/ft1
            parameters: {density: 0.5, gamma: 0.1, weight: 0.55}
        dtype: bfloat16
    """,
    "breadcrumbs_fp16": """
        merge_method: breadcrumbs
        base_model: ROOT/float16/base
        models:
          - model: ROOT/float16/ft1
            parameters: {density: 0.6, gamma: 0.02, weight: 0.9}
          - model: ROOT/float16/ft2
            parameters: {density: 0.45, weight: 0.35}
        dtype: float16
    """,
    "task_arithmetic_bf16_out_fp32": """
        merge_method: task_arithmetic
        base_model: ROOT/bfloat16/base
        models:
          - model: ROOT/bfloat16/ft0
            parameters: {weight: 0.7}
          - model: ROOT/bfloat16/ft2
            parameters: {weight: [0.3, 0.85]}
        parameters: {lambda: 0.9, normalize: true}
        dtype: bfloat16
        out_dtype: float32
    """,
    "linear_fp16": """
        merge_method: linear
        models:
          - model: ROOT/float16/ft0
            parameters: {weight: 0.7}
          - model: ROOT/float16/ft1
            parameters: {weight: 0.45}
          - model: ROOT/float16/ft2
            parameters: {weight: [0.2, 0.9]}
        dtype: float16
    """,
    "linear_bf16_from_fp32": """
        merge_method: linear
        models:
          - model: ROOT/float32/ft0
            parameters: {weight: 0.3}
          - model: ROOT/float32/ft2
            parameters: {weight: 0.55}
        parameters: {normalize: false}
        dtype: bfloat16
    """,
    "slerp_bf16": """
        merge_method: slerp
        base_model: ROOT/bfloat16/base
        slices:
          - sources:
              - model: ROOT/bfloat16/base
                layer_range: [0, 2]
              - model: ROOT/bfloat16/ft2
                layer_range: [0, 2]
        parameters:
          t: [{filter: self_attn, value: [0.3, 0.7]}, {value: 0.45}]
        dtype: bfloat16
    """,
    "model_stock_bf16": """
        merge_method: model_stock
        base_model: ROOT/bfloat16/base
        models:
          - model: ROOT/bfloat16/ft0
          - model: ROOT/bfloat16/ft1
          - model: ROOT/bfloat16/ft2
        dtype: bfloat16
    """,
    "model_stock_filter_wise_fp16": """
        merge_method: model_stock
        base_model: ROOT/float16/base
        models:
          - model: ROOT/float16/ft0
          - model: ROOT/float16/ft2
        parameters: {filter_wise: true}
        dtype: float16
    """,
    "passthrough_fp16": """
        merge_method: passthrough
        slices:
          - sources:
              - model: ROOT/float16/ft2
                layer_range: [0, 2]
                parameters:
                  scale: [{filter: o_proj, value: 0.7}, {value: 1.0}]
        dtype: float16
    """,
}
# SLERP's norms and dot product sum in XLA's order, not torch's: its coefficients can differ in
# their last float32 bit, and an entry then rounds to the neighbouring bfloat16 (rarely).
TOLERANCE = {"slerp_bf16": 1}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_half_precision_recipes_give_mergekits_bits(families, tmp_path, name):
    ours, theirs = run_both(families, tmp_path, RECIPES[name])
    assert_bits(ours, theirs, TOLERANCE.get(name, 0))


def test_ties_are_cut_where_mergekit_cuts_them(families):
    """The recipes above do cut runs of ties: at TIES' density 0.7 of ft0, thousands of
    |task vector| entries equal the 0.7 N-th largest, and only some of them are kept."""
    base, tuned = (read(families / "bfloat16" / n)["model.layers.0.mlp.up_proj.weight"] for n in ("base", "ft0"))
    magnitudes = np.abs((tuned.astype(np.float32) - base.astype(np.float32)).astype(ml_dtypes.bfloat16))
    ordered = np.sort(magnitudes.astype(np.float32).ravel())[::-1]
    k = int(0.7 * ordered.size)
    tied = ordered == ordered[k - 1]
    assert tied.sum() > 1000 and tied[:k].sum() < tied.sum() and ordered[k - 1] > 0


def test_float32_compute_keeps_the_accurate_result(families, tmp_path):
    """compute_dtype="float32": float32 arithmetic rounded once, as the in-memory merge with
    Options(compute_dtype=None) computes it (the same entries kept as mergekit keeps); not
    mergekit's bfloat16 arithmetic, whose result differs."""
    recipe = RECIPES["ties_bf16"]
    ours, theirs = run_both(families, tmp_path, recipe, compute_dtype="float32")
    key = "model.layers.1.self_attn.q_proj.weight"
    inputs = [read(families / "bfloat16" / n)[key] for n in ("base", "ft0", "ft1", "ft2")]
    params = {"weight": [0.7, 0.9, 0.3], "density": [0.7, 0.55, 0.3]}  # layer 1 of 2: the gradients' ends
    counts = exact_counts(get_method("ties"), {"density": np.asarray(params["density"])}, inputs[0].size)
    method = get_method("ties")
    options = Options(normalize=True, consensus=True, ties="torch")
    expected = method.merge(jnp.asarray(inputs[0]).ravel(), jnp.stack([jnp.asarray(x).ravel() for x in inputs[1:]]),
                            {"weight": jnp.float32(params["weight"]), "density": jnp.float32(params["density"]),
                             "lambda": jnp.float32(1.0), **counts}, None, None, options)
    np.testing.assert_array_equal(ours[key].ravel().view(np.uint16), np.asarray(expected).view(np.uint16))
    assert (ours[key].view(np.uint16) != theirs[key].view(np.uint16)).any()
    with pytest.raises(ValueError, match="compute_dtype: expected float32"):
        merge_from_yaml(tmp_path / "recipe.yml", tmp_path / "again", progress=False, compute_dtype="float16")


@pytest.mark.parametrize("descending", [True, False])
def test_torch_sort_replayed(descending):
    """`_introsort_window` keeps, at any window of positions, the entries torch.sort puts
    there: sizes around libstdc++'s insertion-sort threshold (16) and past it, few distinct
    values (long runs of ties), windows at either end and inside."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.choice([1, 2, 15, 16, 17, 33, 100, 1000, 5000, 20_000]))
        values = (rng.integers(0, int(rng.integers(1, 40)), n) / 8).astype(np.float32)
        lo = 0 if descending else int(rng.integers(0, n))
        hi = int(rng.integers(lo, n + 1))
        keys = -values if descending else values
        expected = torch.sort(torch.tensor(values), descending=descending).indices.numpy()[lo:hi]
        np.testing.assert_array_equal(np.sort(_introsort_window(keys, lo, hi)), np.sort(expected),
                                      err_msg=f"trial {trial}: n={n} [{lo}, {hi})")


def test_counts_are_pythons():
    """int(density * N) as Python computes it (mergekit's count), which float32 math misses:
    0.7 * 90 is 62.99999999999999 in float64, 63 in float32."""
    counts = exact_counts(get_method("breadcrumbs"), {"density": np.asarray([0.7, 0.5]), "gamma": np.asarray([0.29])},
                          90)
    assert counts["density_count"].tolist() == [62, 45] and counts["gamma_count"].tolist() == [26]
    assert exact_counts(get_method("ties"), {"density": np.asarray([0.29])}, 100)["density_count"].tolist() == [28]
    assert [int(np.floor(np.float32(d) * np.float32(n))) for d, n in ((0.7, 90), (0.29, 100))] == [63, 29]


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_search_breaks_ties_by_index(method):
    """The in-memory merge (the search's) keeps exactly mergekit's count where |task vector|
    entries tie at the cut, the first in flat order, found by radix passes (no prepared
    statistics: `prepare` has nothing to do)."""
    key = jax.random.key(0)
    shapes = {"embed_tokens.weight": (24, 16), "layers.mlp.up_proj.kernel": (2, 16, 32)}
    base = {p: jnp.round(jax.random.normal(jax.random.fold_in(key, i), shape) * 64) / 1024
            for i, (p, shape) in enumerate(shapes.items())}
    sources = [{p: v + jnp.round(jax.random.normal(jax.random.fold_in(key, 10 + i), v.shape) * 1.5) / 512
                for p, v in base.items()} for i in range(2)]
    stacked = stack_sources(base, sources)
    params = {p: {"weight": jnp.float32([1.0, 0.0]), "density": jnp.float32([0.3, 0.5]), "lambda": jnp.float32(1.0),
                  **({"gamma": jnp.float32([0.05, 0.05])} if method != "ties" else {})} for p in base}
    if method != "ties":
        params = {p: {**v, "density": jnp.float32([0.6, 0.5])} for p, v in params.items()}
    assert prepare(method, base, stacked) == {}
    one_off = merge_params(method, base, stacked, params)
    changed = np.asarray(one_off["embed_tokens.weight"] != base["embed_tokens.weight"])
    magnitudes = np.abs(np.asarray(sources[0]["embed_tokens.weight"] - base["embed_tokens.weight"]))
    if method == "ties":  # only the first source counts (weight 0 for the other): its 30%, all nonzero
        k = int(0.3 * magnitudes.size)
        cut = np.sort(magnitudes.ravel())[::-1][k - 1]
        above, tied = int((magnitudes > cut).sum()), np.flatnonzero(magnitudes.ravel() == cut)
        assert cut > 0 and above < k < above + tied.size  # a run of ties is cut
        assert changed.sum() == k
        assert np.flatnonzero(changed.ravel()[tied]).tolist() == list(range(k - above))  # the first of them


def test_tree_merge_can_compute_in_bfloat16():
    """Options(compute_dtype="bfloat16") in memory: the same as the stream's mergekit bits
    for one tensor (rounding every step), different from float32 math."""
    rng = np.random.default_rng(1)
    base = (rng.standard_normal(4096) * 0.02).astype(ml_dtypes.bfloat16)
    sources = (base.astype(np.float32) + rng.standard_normal((2, 4096)) * 0.004).astype(ml_dtypes.bfloat16)
    params = {"weight": [0.7, 0.45], "lambda": 1.3}
    merged = {dtype: merge_tensor("task_arithmetic", jnp.asarray(base), jnp.asarray(sources), params,
                                  options=Options(compute_dtype=dtype)) for dtype in (None, "bfloat16")}
    reference = torch.tensor(base.astype(np.float32)).bfloat16()
    deltas = torch.tensor(sources.astype(np.float32)).bfloat16() - reference
    deltas = deltas * torch.tensor([0.7, 0.45], dtype=torch.bfloat16)[:, None]
    expected = (reference + deltas.sum(dim=0) * 1.3).float().numpy()
    np.testing.assert_array_equal(np.asarray(merged["bfloat16"]).astype(np.float32), expected)
    assert (np.asarray(merged[None]) != np.asarray(merged["bfloat16"])).any()


def test_default_ties_follow_the_in_memory_merge(families, tmp_path):
    """`jaxmerge merge`'s default rule keeps tied entries in the order the in-memory merge (the
    search's) keeps them, a Flax kernel being torch's weight transposed: with float32 compute,
    the tensors `merge_params` gives on the loaded models, bit for bit, though runs of ties
    are cut in every matrix."""
    import jaxmerge
    from jaxmerge.merge import broadcast_params, flat_params

    recipe = textwrap.dedent("""
        merge_method: breadcrumbs_ties
        base_model: ROOT/bfloat16/base
        models:
          - model: ROOT/bfloat16/ft0
            parameters: {density: 0.5, gamma: 0.125, weight: 0.75}
          - model: ROOT/bfloat16/ft1
            parameters: {density: 0.25, gamma: 0.125, weight: 0.5}
    """).replace("ROOT", str(families))
    (tmp_path / "recipe.yml").write_text(recipe)
    merge_from_yaml(tmp_path / "recipe.yml", tmp_path / "ours", progress=False, compute_dtype="float32")
    models = [jaxmerge.load(families / "bfloat16" / n) for n in ("base", "ft0", "ft1")]
    base = flat_params(models[0])
    params = broadcast_params("breadcrumbs_ties", base, 2, weight=[0.75, 0.5], density=[0.5, 0.25], gamma=0.125)
    expected = merge_params("breadcrumbs_ties", base, stack_sources(base, [flat_params(m) for m in models[1:]]),
                            params)
    merged = flat_params(jaxmerge.load(tmp_path / "ours"))
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(merged[path]).view(np.uint16), np.asarray(value).view(np.uint16),
                                      err_msg=path)


def test_bfloat16_rounding_is_the_cast():
    """`rounding("bfloat16")` (integer operations on the bits) equals a cast to bfloat16 and back:
    ties to even, the largest finite values to infinity, subnormals, infinities, NaN."""
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F7F7FFF, 0x00008000, 0x00018000,
                                     0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x80000000], np.uint32)])
    x = bits.view(np.float32)
    ours = np.asarray(jax.jit(rounding("bfloat16"))(jnp.asarray(x)))
    cast = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    finite = ~np.isnan(cast)
    np.testing.assert_array_equal(ours[finite].view(np.uint32), cast[finite].view(np.uint32))
    assert np.isnan(ours[-3:-1]).all()  # the NaNs computations make
