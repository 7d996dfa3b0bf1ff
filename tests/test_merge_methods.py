"""Merge methods on small arrays, against values worked out by hand; and the properties
the evolutionary search relies on: no recompilation, vmap over a population, layer-wise
parameters, source statistics computed once."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.merge import (
    Options,
    broadcast_params,
    get_method,
    merge_params,
    merge_tensor,
    method_names,
    prepare,
    stack_sources,
)

BASE = jnp.array([1.0, 1.0, 1.0, 1.0])
SOURCES = jnp.array([[2.0, 0.0, 1.5, 1.0],    # task vector [1, -1, 0.5, 0]
                     [0.5, 3.0, 1.0, 1.2]])   # task vector [-0.5, 2, 0, 0.2]


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_every_registered_method_is_covered():
    more = {"nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}  # their tests:
    # test_merge_more_methods.py
    assert set(method_names()) == {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                   "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock",
                                   "passthrough"} | more


def test_linear():
    close(merge_tensor("linear", None, SOURCES, {"weight": [1.0, 3.0]}), [0.875, 2.25, 1.125, 1.15])
    close(merge_tensor("linear", None, SOURCES, {"weight": [1.0, 3.0]}, options=Options(normalize=False)),
          [3.5, 9.0, 4.5, 4.6])


def test_task_arithmetic_with_lambda():
    # 1 + 2 * (1.0 * d1 + 0.5 * d2)
    close(merge_tensor("task_arithmetic", BASE, SOURCES, {"weight": [1.0, 0.5], "lambda": 2.0}),
          [2.5, 1.0, 2.0, 1.2])


def test_ties():
    # density 0.5 keeps 2 of 4 entries: d1 -> [1, -1, 0, 0] (|d| ties at 1 both kept), d2 -> [-0.5, 2, 0, 0].
    # Signs of the sum [0.5, 1, 0, 0] are all +: d1's -1 and d2's -0.5 disagree and drop out.
    close(merge_tensor("ties", BASE, SOURCES, {"weight": [1.0, 1.0], "density": 0.5}), [2.0, 3.0, 1.0, 1.0])
    # Unnormalised with weights: [1*1, 2*2, 0, 0] added to the base.
    close(merge_tensor("ties", BASE, SOURCES, {"weight": [1.0, 2.0], "density": 0.5},
                       options=Options(consensus=True)), [2.0, 5.0, 1.0, 1.0])


def test_breadcrumbs_drops_outliers_and_small_entries():
    # N = 4, density 0.5 -> keep 2; gamma 0.25 -> drop the largest 1, so the 2nd and 3rd largest stay.
    # d2 = [-0.5, 2, 0, 0.2] keeps -0.5 and 0.2.
    close(merge_tensor("breadcrumbs", BASE, SOURCES[1:], {"weight": [1.0], "density": 0.5, "gamma": 0.25}),
          [0.5, 1.0, 1.0, 1.2])


def test_slerp():
    v0, v1 = jnp.array([1.0, 0.0]), jnp.array([[0.0, 1.0]])
    close(merge_tensor("slerp", v0, v1, {"t": 0.5}), [np.sqrt(0.5), np.sqrt(0.5)])
    close(merge_tensor("slerp", v0, v1, {"t": 0.0}), v0)
    close(merge_tensor("slerp", v0, 2 * v0[None], {"t": 0.25}), [1.25, 0.0])  # parallel: linear


def test_model_stock():
    base = jnp.zeros(2)
    # Orthogonal task vectors: cos 0, t 0, the base.
    close(merge_tensor("model_stock", base, jnp.array([[1.0, 0.0], [0.0, 1.0]]), {}), [0.0, 0.0])
    # Identical ones: cos 1, t 1, their mean.
    close(merge_tensor("model_stock", base, jnp.array([[1.0, 2.0], [1.0, 2.0]]), {}), [1.0, 2.0])


def test_passthrough_scale():
    close(merge_tensor("passthrough", None, SOURCES[:1], {"scale": 0.5}), [1.0, 0.0, 0.75, 0.5])


def test_dare_rescale_modes():
    base = jnp.zeros(20_000)
    source = jax.random.normal(jax.random.key(1), (1, 20_000))
    key = jax.random.key(0)
    paper = merge_tensor("dare_linear", base, source, {"weight": 1.0, "density": 0.25}, key=key,
                         options=Options(rescale="density"))
    kept = np.asarray(paper) != 0
    assert kept.mean() == pytest.approx(0.25, abs=0.01)
    close(np.asarray(paper)[kept], np.asarray(source[0])[kept] / 0.25)
    l1 = merge_tensor("dare_linear", base, source, {"weight": 1.0, "density": 0.25}, key=key)  # mergekit's
    assert float(jnp.abs(l1).sum()) == pytest.approx(float(jnp.abs(source).sum()), rel=1e-5)
    close(merge_tensor("dare_linear", base, source, {"weight": 1.0, "density": 1.0}, key=key), source[0])
    with pytest.raises(ValueError, match="PRNG key"):
        merge_tensor("dare_ties", base, source, {"weight": 1.0, "density": 0.5})


def test_della_keeps_large_entries_more_often():
    base = jnp.zeros((64, 512))
    source = jax.random.normal(jax.random.key(2), (1, 64, 512))
    merged = merge_tensor("della_linear", base, source, {"weight": 1.0, "density": 0.5, "epsilon": 0.4},
                          key=jax.random.key(3), options=Options())
    kept = np.asarray(merged) != 0
    magnitude = np.abs(np.asarray(source[0]))
    large = magnitude > np.quantile(magnitude, 0.9, axis=-1, keepdims=True)
    small = magnitude < np.quantile(magnitude, 0.1, axis=-1, keepdims=True)
    assert kept.mean() == pytest.approx(0.5, abs=0.01)
    assert kept[large].mean() == pytest.approx(0.86, abs=0.03)  # 0.1 + 0.8 * rank, rank ~0.95
    assert kept[small].mean() == pytest.approx(0.14, abs=0.03)


def tiny_models(num_sources=3, layers=4):
    key = jax.random.key(0)
    base = {"embed_tokens.weight": jax.random.normal(key, (10, 8)),
            "layers.mlp.up_proj.kernel": jax.random.normal(jax.random.fold_in(key, 1), (layers, 8, 16))}
    sources = [{p: v + 0.1 * jax.random.normal(jax.random.fold_in(key, 10 + i), v.shape) for p, v in base.items()}
               for i in range(num_sources)]
    return base, stack_sources(base, sources)


def test_new_parameter_values_do_not_recompile():
    base, sources = tiny_models()
    stats = prepare("ties", base, sources)
    merge = jax.jit(lambda params: merge_params("ties", base, sources, params, stats=stats))
    for density in (0.2, 0.5, 0.9):
        merge(broadcast_params("ties", base, 3, weight=[0.3, 0.5, 1.0 - density], density=density))
    assert merge._cache_size() == 1


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_magnitude_selections_never_sort(method):
    """TIES and breadcrumbs prepare nothing (no sort of the task vectors when a search sets
    up, no copy of the sources' size kept): each candidate finds its thresholds by radix
    passes, as `jaxmerge merge` and the streamed merge do."""
    base, sources = tiny_models()
    assert prepare(method, base, sources) == {}
    params = broadcast_params(method, base, 3, weight=[1.0, 0.4, 0.7], density=[0.5, 0.31, 0.8])
    candidate = str(jax.make_jaxpr(lambda p: merge_params(method, base, sources, p, stats={}))(params))
    assert not re.search(r"\bsort\[", candidate)


def test_kth_largest_by_bisection():
    from jaxmerge.merge.methods import kth_largest
    values = jnp.abs(jax.random.normal(jax.random.key(4), (1000,)))
    ordered = np.sort(np.asarray(values))[::-1]
    for k in (1, 2, 500, 999, 1000):
        assert float(kth_largest(values, jnp.int32(k))) == ordered[k - 1]


def kth_largest_bisection(magnitudes, k):
    """The previous kth_largest, kept as the oracle: a bisection on the float bit patterns,
    32 counting passes."""
    bits = jax.lax.bitcast_convert_type(magnitudes.astype(jnp.float32).ravel(), jnp.int32)

    def halve(_, bounds):  # invariant: count(bits >= lo) >= k > count(bits >= hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), jnp.int32(0x7F800001)))  # [0, +inf]
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def kth_cases(rng, n):
    """Non-negative float32 vectors of length n that stress a radix select: spread over the
    whole float range, bf16 values (many ties, low 16 bits zero), a few distinct values, all
    equal, zeros, denormals, +inf."""
    normal = np.abs(rng.standard_normal(n)).astype(np.float32)
    yield "normal", normal
    yield "bf16", normal.astype(jnp.bfloat16).astype(np.float32)
    yield "log-uniform", np.exp2(rng.uniform(-149, 128, n)).astype(np.float32)  # denormals to +inf
    yield "few values", rng.choice(np.float32([0, 1e-45, 1e-40, 0.5, 1, 3]), n)
    yield "all equal", np.full(n, 0.25, np.float32)
    yield "zeros", np.zeros(n, np.float32)
    special = normal.copy()
    special[rng.integers(0, n, 1 + n // 10)] = np.inf
    special[rng.integers(0, n, 1 + n // 10)] = 0.0
    yield "inf and zeros", special


def kth_ks(rng, n, x):
    ks = {1, 2, n - 1, n, (n + 1) // 2, *rng.integers(1, n + 1, 4).tolist()}
    order = np.sort(x)[::-1]  # the first and last k of a run of ties
    ks |= {1 + int(np.argmax(order == order[n // 3])), n - int(np.argmax(order[::-1] == order[n // 3]))}
    return sorted(k for k in ks if 1 <= k <= n)


@pytest.mark.parametrize("n", [1, 2, 3, 255, 256, 257, 1000, 65535, 65537, 262143, 262144, 262145, 600_001])
def test_kth_largest_is_the_sorted_value(n):
    """The radix select returns exactly the k-th value of the sorted tensor (and so what the
    bisection returned), for a traced k under jit."""
    from jaxmerge.merge.methods import kth_largest
    rng = np.random.default_rng(n)
    select = jax.jit(kth_largest)
    for name, x in kth_cases(rng, n):
        ks = kth_ks(rng, n, x)
        got = [select(x, jnp.int32(k)) for k in ks]
        expected = np.sort(x)[::-1][np.array(ks) - 1]
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"{name}, k = {ks}")


def test_kth_largest_on_a_large_tensor():
    from jaxmerge.merge.methods import kth_largest
    rng = np.random.default_rng(0)
    x = (np.abs(rng.standard_normal(1 << 22)) * 0.02).astype(jnp.bfloat16).astype(np.float32)  # 4M, ties
    x[rng.integers(0, x.size, 100)] = np.inf
    ks = [1, 100, 101, 12345, x.size // 2, x.size - 7, x.size]
    got = jax.jit(jax.vmap(kth_largest, in_axes=(None, 0)))(x, jnp.array(ks))
    np.testing.assert_array_equal(np.asarray(got), np.sort(x)[::-1][np.array(ks) - 1])
    got = jax.jit(kth_largest)(x[:-1000], jnp.int32(77777))  # a length that is no multiple of the chunk
    assert float(got) == np.sort(x[:-1000])[::-1][77776]
    rows = np.stack([x[:300_001], np.abs(rng.standard_normal(300_001)).astype(np.float32), x[-300_001:]])
    ks = np.array([150_000, 1, 300_001])  # three rows counted at once, in overlapping steps
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(kth_largest))(rows, ks)),
                                  np.sort(rows, axis=1)[:, ::-1][np.arange(3), ks - 1])


def test_kth_largest_matches_the_bisection_outside_its_domain():
    """k < 1, k > N, a fractional k, NaN, negative values, -0.0, -inf, an empty tensor:
    whatever the bisection returned."""
    from jaxmerge.merge.methods import kth_largest
    rng = np.random.default_rng(1)
    x = rng.standard_normal(3000).astype(np.float32)  # half negative
    x[:50], x[50:60], x[60:70] = np.nan, -0.0, -np.inf
    ks = np.array([-5, 0, 1, 2, 49, 50, 51, 1499, 1500, 3000, 3001, 10**6])
    radix, bisection = (jax.jit(jax.vmap(f, in_axes=(None, 0))) for f in (kth_largest, kth_largest_bisection))
    for values in (x, np.float32([]), np.float32([-1.0, -0.0, np.nan])):
        for k in (ks.astype(np.int32), np.float32([-0.5, 0.5, 1.5, 49.2, 2999.9, 3000.5])):
            got, expected = radix(values, k), bisection(values, k)
            np.testing.assert_array_equal(np.asarray(got).view(np.int32), np.asarray(expected).view(np.int32),
                                          err_msg=f"{values[:3]}, k = {k}")


def test_kth_largest_under_vmap_and_lax_map():
    """As the merges use it: vmapped over sources (one tensor each, its own k), mapped over
    layers, vmapped again over a population sharing the tensors; jitted, k traced."""
    from jaxmerge.merge.methods import _MAX_ROWS, kth_largest
    rng = np.random.default_rng(2)
    layers, sources, population, n = 3, 2, 4, 5000
    x = np.abs(rng.standard_normal((layers, sources, n))).astype(jnp.bfloat16).astype(np.float32)
    k = rng.integers(1, n + 1, (population, layers, sources)).astype(np.int32)
    expected = np.take_along_axis(-np.sort(-x, axis=-1)[None], k[..., None] - 1, axis=-1)[..., 0]

    per_layer = jax.vmap(kth_largest)  # over sources
    by_layer = jax.jit(lambda x, k: jax.lax.map(lambda xk: per_layer(*xk), (x, k)))
    np.testing.assert_array_equal(np.asarray(by_layer(x, k[0])), expected[0])
    population_vmap = jax.jit(jax.vmap(lambda k: jax.lax.map(lambda xk: per_layer(*xk), (x, k))))
    np.testing.assert_array_equal(np.asarray(population_vmap(k)), expected)
    nested = jax.jit(jax.vmap(jax.vmap(jax.vmap(kth_largest)), in_axes=(None, 0)))
    np.testing.assert_array_equal(np.asarray(nested(x, k)), expected)
    same_k = jax.jit(jax.vmap(kth_largest, in_axes=(0, None)))(x[0], k[0, 0, 0])
    np.testing.assert_array_equal(np.asarray(same_k), -np.sort(-x[0], axis=-1)[:, k[0, 0, 0] - 1])
    many = np.abs(rng.standard_normal((_MAX_ROWS + 3, 300))).astype(np.float32)  # past the rows counted at once
    ks = rng.integers(1, 301, _MAX_ROWS + 3)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(kth_largest))(many, ks)),
                                  np.sort(many, axis=-1)[:, ::-1][np.arange(len(ks)), ks - 1])


def stable_window(d, lo, hi, descending, index_order=None):
    """numpy's reference for a selection: which entries of d (one source's task vector) a
    stable sort of |d|, descending or ascending, puts at positions [lo, hi), ties in flat
    order or (index_order (rows, cols)) counted column by column, as torch's weight."""
    size = d.size
    places = np.arange(size) if index_order is None else np.arange(size).reshape(index_order).T.ravel()
    magnitudes = np.abs(d.ravel())[places]  # in the order ties are counted in
    order = np.argsort(-magnitudes if descending else magnitudes, kind="stable")
    mask = np.zeros(size, bool)
    mask[places[order[lo:hi]]] = True
    return mask.reshape(d.shape)


def tie_cases(rng, shape):
    """Two sources' task vectors: spread, bf16 values (many exact ties), seven values (a
    seventh zeros), mostly zeros (with a denormal)."""
    normal = (rng.standard_normal((2, *shape)) * 0.02).astype(np.float32)
    yield "normal", normal
    yield "bf16", normal.astype(jnp.bfloat16).astype(np.float32)
    yield "seven values", (rng.integers(-3, 4, (2, *shape)) * 2.0**-6).astype(np.float32)
    few = rng.choice(np.float32([-0.5, 0.25, 1e-40, 3.0]), (2, *shape))
    yield "mostly zeros", np.where(rng.random((2, *shape)) < 0.9, 0, few).astype(np.float32)


def cut_places(magnitudes, descending, rng):
    """Counts of entries to keep (1 to N) that cut where selections go wrong: inside runs of
    ties, inside the run of zeros, at a run's end, the ends, anywhere."""
    ordered = np.sort(magnitudes.ravel())[::-1] if descending else np.sort(magnitudes.ravel())
    n = ordered.size
    inside = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1  # keeping that many splits a run
    ends = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    places = {1, n - 1, n, n // 2, *rng.integers(1, n, 2).tolist()}
    places |= set(rng.choice(inside, min(4, inside.size), replace=False).tolist()) if inside.size else set()
    places |= {int(ends[ends.size // 2])} if ends.size else set()
    zeros = int((ordered == 0).sum())
    if zeros > 1:
        places.add(n - zeros // 2 if descending else zeros // 2)
    return sorted(places)


def paired(first, second):
    """Every item of both lists, as pairs (the second list reversed, the shorter repeated)."""
    return [(first[i % len(first)], second[-1 - i % len(second)]) for i in range(max(len(first), len(second)))]


@pytest.mark.parametrize("shape, index_order", [((12411,), None), ((96, 130), (96, 130))])
def test_selections_keep_what_a_stable_sort_keeps(shape, index_order):
    """TIES' top k and breadcrumbs' window [lo, hi) of |task vector|, found by radix passes
    and counting (no sort), keep exactly the entries a stable sort puts there (ties in flat
    order, a kernel's column by column): on spread and tie-heavy tensors, with cuts inside
    runs of ties and of zeros. Compared by value: which zeros are kept changes nothing."""
    from jaxmerge.merge.methods import magnitude, magnitude_outliers

    rng = np.random.default_rng(len(shape))
    n = int(np.prod(shape))
    top = jax.jit(functools.partial(magnitude, index_order=index_order))
    window = jax.jit(functools.partial(magnitude_outliers, index_order=index_order))
    for name, d in tie_cases(rng, shape):
        ks = [cut_places(np.abs(d[i]), True, rng) for i in range(2)]
        for k in paired(*ks):  # each source its own count
            k = np.int32(k)
            got = np.asarray(top(d, k.astype(np.float32) / n, count=k))
            expected = np.stack([np.where(stable_window(d[i], 0, k[i], True, index_order), d[i], 0)
                                 for i in range(2)])
            np.testing.assert_array_equal(got, expected, err_msg=f"{name}: TIES keeping {k}")
        bounds = [cut_places(np.abs(d[i]), False, rng) for i in range(2)]
        windows = [[(lo, hi) for lo in [0, *b] for hi in b if lo < hi] for b in bounds]
        for (lo0, hi0), (lo1, hi1) in paired(*windows):
            lo, hi = np.int32([lo0, lo1]), np.int32([hi0, hi1])
            keep, outliers = hi - lo, n - hi  # breadcrumbs' counts: the window [n - keep - outliers, n - outliers)
            got = np.asarray(window(d, keep.astype(np.float32) / n, outliers.astype(np.float32) / n,
                                    counts=(keep, outliers)))
            expected = np.stack([np.where(stable_window(d[i], lo[i], hi[i], False, index_order), d[i], 0)
                                 for i in range(2)])
            np.testing.assert_array_equal(got, expected, err_msg=f"{name}: breadcrumbs window {lo}, {hi}")


@pytest.mark.parametrize("shape, row_axis", [((300,), -1), ((40, 130), -1), ((130, 40), -2), ((65536,), -1),
                                             ((3, 65537), -1)])
def test_della_ranks_are_the_double_argsort(shape, row_axis):
    """DELLA's ranks (one sort, inverted by a scatter) are argsort(argsort(|d|)) along each
    row, ties in flat order, stored as uint16 where a row fits it; the factor normalising
    them is float32's 1 / (width - 1)."""
    from jaxmerge.merge.methods import della_stats

    rng = np.random.default_rng(len(shape))
    base = (np.round(rng.standard_normal(shape) * 8) / 8).astype(np.float32)  # exact differences: many ties
    sources = (base + np.round(rng.standard_normal((2, *shape)) * 2) / 8).astype(np.float32)
    ranks, scale, _ = jax.jit(functools.partial(della_stats, row_axis=row_axis))(base, sources)
    axis = (row_axis % len(shape)) + 1
    magnitudes = np.abs(sources - base)
    expected = np.argsort(np.argsort(magnitudes, axis=axis, kind="stable"), axis=axis, kind="stable")
    width = shape[axis - 1]
    assert ranks.dtype == (jnp.uint16 if width <= 1 << 16 else jnp.int32)
    np.testing.assert_array_equal(np.asarray(ranks), expected)
    np.testing.assert_array_equal(np.asarray(scale), np.full(2, np.float32(1) / np.float32(width - 1)))


def test_vmap_over_a_population():
    base, sources = tiny_models()
    stats = prepare("dare_ties", base, sources)
    population = 5
    weights = jax.random.uniform(jax.random.key(7), (population, 3))
    densities = jax.random.uniform(jax.random.key(8), (population, 3), minval=0.2, maxval=1.0)

    def candidate(w, d):
        params = {p: {"weight": w, "density": d, "lambda": jnp.float32(1.0)} for p in base}
        return merge_params("dare_ties", base, sources, params, stats=stats, key=jax.random.key(0))

    batched = jax.jit(jax.vmap(candidate))(weights, densities)
    assert batched["layers.mlp.up_proj.kernel"].shape == (population, 4, 8, 16)
    for i in (0, 3):
        one = candidate(weights[i], densities[i])
        close(batched["layers.mlp.up_proj.kernel"][i], one["layers.mlp.up_proj.kernel"])


def test_layerwise_parameters():
    base, sources = tiny_models(num_sources=2)
    per_layer = jnp.array([[0.0, 0.5, 1.0, 2.0], [1.0, 0.0, 0.0, 0.5]])  # [K, L]
    params = {"embed_tokens.weight": {"weight": jnp.array([1.0, 1.0]), "lambda": jnp.float32(1.0)},
              "layers.mlp.up_proj.kernel": {"weight": per_layer, "lambda": jnp.float32(1.0)}}
    merged = merge_params("task_arithmetic", base, sources, params)
    path = "layers.mlp.up_proj.kernel"
    for layer in range(4):
        expected = merge_tensor("task_arithmetic", base[path][layer], sources[path][layer],
                                {"weight": per_layer[:, layer]})
        close(merged[path][layer], expected)


def test_vocabulary_mismatch_merges_common_rows():
    base = {"embed_tokens.weight": jnp.ones((5, 2)), "lm_head.kernel": jnp.ones((2, 5))}
    bigger = {"embed_tokens.weight": jnp.full((6, 2), 3.0), "lm_head.kernel": jnp.full((2, 6), 3.0)}  # +pad
    smaller = {"embed_tokens.weight": jnp.full((4, 2), 2.0), "lm_head.kernel": jnp.full((2, 4), 2.0)}
    sources = stack_sources(base, [bigger, smaller])
    merged = merge_params("task_arithmetic", base, sources,
                          broadcast_params("task_arithmetic", base, 2, weight=1.0))
    # Rows 0-3: 1 + 2 + 1; row 4: the smaller model lacks it (zero task vector): 1 + 2 + 0.
    close(merged["embed_tokens.weight"][:, 0], [4, 4, 4, 4, 3])
    close(merged["lm_head.kernel"][0], [4, 4, 4, 4, 3])
    with pytest.raises(ValueError, match="layers.x: source 0 has shape"):
        stack_sources({"layers.x": jnp.ones((2, 3))}, [{"layers.x": jnp.ones((2, 4))}])


def test_vlm_language_model_merge_keeps_image_token_rows():
    """Merging a VLM's language model with LLMs of a smaller vocabulary: merged rows for the
    shared tokens, the VLM's own rows for the rest (its image token), vision untouched."""
    from flax import nnx

    from jaxmerge.merge import broadcast_params, flat_params, merge_params, stack_sources
    from jaxmerge.merge.tree import language_model, with_language_model_params
    from jaxmerge.models.config import TransformerConfig
    from jaxmerge.models.llava import Llava, LlavaConfig
    from jaxmerge.models.transformer import Transformer
    from jaxmerge.models.vision import VisionConfig

    text = TransformerConfig.tiny(vocab_size=40)
    vlm = Llava(LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                                image_size=8, patch_size=4),
                            text=text, image_token_id=39), rngs=nnx.Rngs(0))
    base = flat_params(Transformer(TransformerConfig.tiny(vocab_size=39), rngs=nnx.Rngs(1)))
    other = flat_params(Transformer(TransformerConfig.tiny(vocab_size=39), rngs=nnx.Rngs(2)))
    sources = stack_sources(base, [flat_params(language_model(vlm)), other])
    merged = merge_params("task_arithmetic", base, sources,
                          broadcast_params("task_arithmetic", base, 2, weight=[0.5, 0.5]))
    out = with_language_model_params(vlm, merged)
    lm_before, lm_after = flat_params(language_model(vlm)), flat_params(language_model(out))
    np.testing.assert_allclose(lm_after["embed_tokens.weight"][:39], merged["embed_tokens.weight"])
    np.testing.assert_array_equal(lm_after["embed_tokens.weight"][39], lm_before["embed_tokens.weight"][39])
    np.testing.assert_array_equal(lm_after["lm_head.kernel"][:, 39], lm_before["lm_head.kernel"][:, 39])
    before, after = flat_params(vlm), flat_params(out)
    for path in before:
        if not path.startswith("language_model."):
            np.testing.assert_array_equal(after[path], before[path])


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_sign_election_sums_rounded_products(method):
    """Where the weighted task vectors cancel exactly (sum 0: the majority sign is +), the
    election must see the rounded products mergekit sums: a fused multiply-add, which XLA-CPU
    forms from a product feeding an add, leaves the product's rounding error and flips the
    sign. Parameters are traced (as in a search) so nothing is constant-folded."""
    rng = np.random.default_rng(0)
    n = 1 << 16
    base = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    steps = rng.integers(-3, 4, size=(3, n)).astype(np.float32) * 2.0**-6
    sources = (base.astype(jnp.float32)[None] + steps).astype(jnp.bfloat16)
    weights = np.array([1 / 3, 1 / 3, 2 / 3], np.float32)
    params = {"weight": weights, "density": np.ones(3, np.float32), "gamma": np.zeros(3, np.float32),
              "epsilon": np.zeros(3, np.float32)}
    params = {p.name: params[p.name] for p in get_method(method).parameters if p.name in params}
    merged = jax.jit(lambda b, s, p, k: merge_tensor(method, b, s, p, key=k))(
        base, sources, params, jax.random.key(0))

    deltas = np.asarray(sources, np.float32) - np.asarray(base, np.float32)
    weighted = deltas * weights[:, None]  # rounded products, summed in source order
    total = (weighted[0] + weighted[1]) + weighted[2]
    assert np.sum(total == 0) > 1000  # the case under test occurs
    majority = np.where(total >= 0, 1.0, -1.0)
    moved = np.asarray(merged, np.float32) - np.asarray(base, np.float32)
    assert np.sum(np.sign(moved) * majority < 0) == 0


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_stacked_layers_in_steps_equal_one_pass(method, monkeypatch):
    """Layers whose temporaries pass the budget merge a few at a time (a loop): the same
    values as all at once, per-layer parameters, statistics and keys included."""
    from jaxmerge.merge import tree

    base, sources = tiny_models(num_sources=2, layers=6)
    stats = prepare(method, base, sources)
    path = "layers.mlp.up_proj.kernel"
    per_layer = jax.random.uniform(jax.random.key(3), (2, 6), minval=0.2, maxval=1.0)  # [K, L]
    params = broadcast_params(method, base, 2, weight=[0.7, 0.4], density=[0.6, 0.5])
    params[path] = dict(params[path], weight=per_layer, density=per_layer[::-1])
    key = jax.random.key(4)
    one_pass = merge_params(method, base, sources, params, stats=stats, key=key)
    layer_bytes = 4 * 2 * 8 * 16
    monkeypatch.setattr(tree, "_TEMPORARY_BYTES", 2 * layer_bytes)
    assert tree.layers_per_step(6, layer_bytes) == 2
    stepped = jax.jit(lambda p: merge_params(method, base, sources, p, stats=stats, key=key))
    assert "scan[" in str(jax.make_jaxpr(lambda p: merge_params(method, base, sources, p, stats=stats, key=key))(
        params))  # a loop over steps
    same = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)  # programs differ: rounding may
    same(np.asarray(stepped(params)[path]), np.asarray(one_pass[path]))
    monkeypatch.setattr(tree, "_TEMPORARY_BYTES", layer_bytes // 2)  # not even one layer fits: one at a time
    assert tree.layers_per_step(6, layer_bytes) == 1
    stepped = merge_params(method, base, sources, params, stats=stats, key=key)
    same(np.asarray(stepped[path]), np.asarray(one_pass[path]))


def test_layers_per_step_divides_the_layer_count():
    from jaxmerge.merge.tree import layers_per_step

    assert layers_per_step(32, 1) == 32
    assert layers_per_step(32, (1 << 30) // 5) == 4  # 5 would fit; 4 divides 32
    assert layers_per_step(7, (1 << 30) // 3) == 1  # 7 is prime
    assert layers_per_step(32, 1 << 40) == 1


def test_hashed_mask_statistics():
    """The counter-based uniforms behind DARE/DELLA: uniform, the kept fraction the density,
    different keys (sources, layers, candidates) nearly independent masks, the same under vmap."""
    from jaxmerge.merge.methods import hashed_uniform

    n = 1 << 20
    u = np.asarray(hashed_uniform(jax.random.key(0), (n,)))
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=64, range=(0, 1))[0]
    assert np.abs(counts / (n / 64) - 1).max() < 0.03  # 4-5 standard deviations of a bin's count
    for density in (0.1, 0.5, 0.9):
        assert np.mean(u < density) == pytest.approx(density, abs=2e-3)
    v = np.asarray(hashed_uniform(jax.random.key(1), (n,)))
    assert abs(np.corrcoef(u < 0.5, v < 0.5)[0, 1]) < 5e-3  # independent masks: correlation ~1/sqrt(n)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5e-3  # neighbours uncorrelated
    keys = jax.random.split(jax.random.key(2), 3)
    batched = jax.vmap(lambda k: hashed_uniform(k, (64, 32)))(keys)
    np.testing.assert_array_equal(np.asarray(batched[1]), np.asarray(hashed_uniform(keys[1], (64, 32))))
    with pytest.raises(ValueError, match="2\\^32"):
        jax.eval_shape(lambda k: hashed_uniform(k, (1 << 17, 1 << 16)), jax.random.key(0))
