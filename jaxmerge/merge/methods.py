"""Merge methods as pure functions of one tensor, and their registry.

Every method has the same signature:

    merge(base, sources, params, stats, key, options) -> merged tensor

  base     [*S] or None        the base model's tensor (task vectors are taken against it)
  sources  [K, *S]             the other models' tensors, stacked
  params   {name: array}       per-source parameters [K] (weight, density, gamma, epsilon),
                               merge-wide ones [] (t, lambda); arrays, so new values never
                               recompile and a population can be vmapped
  stats    from `prepare`      what depends only on base and sources (|task vector| order
                               statistics, ranks, sums), computed once and shared by every candidate;
                               None: computed in the call (a one-off merge)
  key      PRNG key or None    for the random sparsifiers (DARE, DELLA)
  options  frozen Options      static choices that change the computation (normalize, rescale)

Semantics follow mergekit (see the module docstrings of each helper); computation is in
float32 and the result is cast to the base's dtype.

Methods are looked up by name in one registry. A method of one's own, registered once,

    register_method(MergeMethod("midpoint", (Parameter("weight", per_source=True),), midpoint, base="required"))

is then a name like the built-in ones: in `merge_params`, a `jaxmerge merge` recipe's
merge_method and an evolve config's genome.merge_method.

(Just over 500 lines: the methods share their sparsifiers and order statistics, which are
kept beside them rather than in a module no other code would read.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
_EPS = 1e-7  # mergekit's tolerance for a vanishing norm when rescaling


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    per_source: bool  # one value per source model, or one for the whole merge
    default: float | None = None  # None: required


@dataclasses.dataclass(frozen=True)
class Options:
    """Static switches. rescale: None (off), "l1" (mergekit: match the L1 norm of the
    task vector) or "density" (the DARE paper: divide by density)."""

    normalize: bool = False
    rescale: str | None = None
    consensus: bool = False  # TIES sign election (mergekit's "sum" method)


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    name: str
    parameters: tuple[Parameter, ...]
    merge: Callable[..., Array]
    base: str  # "required" | "optional" | "none"
    default_options: Options = Options()
    random: bool = False
    prepare: Callable[..., Any] | None = None  # (base, sources, row_axis=) -> stats
    stats_required: bool = False  # prepare is part of the method, not only a speed-up
    min_sources: int = 1
    max_sources: int | None = None

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(f"merge method {self.name!r} has no parameter {name!r} "
                       f"(it has: {', '.join(p.name for p in self.parameters)})")


# --------------------------------------------------------------------------- sparsifiers
# Each takes one task vector d [*S] and returns the kept (and rescaled) vector.


def _rescale(d: Array, kept: Array, density: Array, mode: str | None, abs_sum: Array | None = None) -> Array:
    """abs_sum: sum |d|, if prepared (one reduction pass less per candidate)."""
    if mode is None:
        return kept
    if mode == "density":
        return kept / density
    if mode == "l1":
        before = jnp.sum(jnp.abs(d)) if abs_sum is None else abs_sum
        after = jnp.sum(jnp.abs(kept))
        ok = (before >= _EPS) & (after >= _EPS)
        return jnp.where(ok, kept * (before / jnp.where(ok, after, 1.0)), kept)
    raise ValueError(f"unknown rescale mode {mode!r} (use None, 'l1' or 'density')")


def magnitude_stats(base: Array, sources: Array, row_axis: int = -1) -> Array:
    """|task vector| of each source, sorted descending: [K, N]. Computed once for a search;
    any density then costs one gather instead of a selection pass per candidate. (Whole
    tensors: row_axis does not matter.)"""
    d = (sources.astype(jnp.float32) - base.astype(jnp.float32)).reshape(sources.shape[0], -1)
    return -jnp.sort(-jnp.abs(d), axis=-1)


@jax.jit  # compiled once per shape when called outside jit, too
def kth_largest(magnitudes: Array, k: Array) -> Array:
    """The k-th largest (1-based) of non-negative float32 values, without sorting. k may be
    traced. Exact: the same float as sorting (ties, zeros, denormals, +inf); NaN counts as
    +inf and a negative value as +0; k < 1 gives +inf and k > N gives 0.

    A radix select on the float bit patterns (as integers they order like the floats, for
    non-negative values): two histogram passes over the tensor, see `_kth_largest_rows`. It
    replaces a bisection on the patterns, whose 32 counting passes dominated TIES merges on
    CPU; on a 58M-element tensor the radix select is ~10x faster."""
    k = jnp.asarray(k)
    k = jnp.ceil(k) if jnp.issubdtype(k.dtype, jnp.floating) else k  # count >= k, as the bisection had it
    return _kth_largest_rows(magnitudes.astype(jnp.float32).reshape(1, -1), k.astype(jnp.int32).reshape(1))[0]


_INF_BITS = 0x7F800000  # +inf's bit pattern as int32: the largest non-NaN float
_CHUNK = 1 << 18  # elements per histogram step: its digits and updates stay in cache
_MAX_ROWS = 64  # rows counted at once under vmap (their histograms take 256 KiB each)


@jax.custom_batching.custom_vmap
def _kth_largest_rows(x: Array, k: Array) -> Array:
    """kth_largest of each row of x [R, N], k [R] (int32). Pass 1 counts every element's top
    16 bits in a 65,536-bin histogram: summed from the top, it gives the answer's top 16 bits
    (the largest digit whose count from the top reaches k). Pass 2 counts the low 16 bits of
    the elements whose top bits are those, for the answer's low 16 bits. Each pass is one
    scatter-add per chunk for all rows, into one flat histogram (see the vmap rule below)."""
    rows, n = x.shape
    step = max(1, min(n, _CHUNK // rows))
    offsets = jnp.arange(rows, dtype=jnp.int32)[:, None] << 16

    def histogram(digit):  # [rows, 2**16] counts of digit(bits); a digit of 2**16 is not counted
        def add(i, counts):
            start = jnp.minimum(i * step, n - step)  # the last step ends at n, overlapping the one before
            bits = jax.lax.bitcast_convert_type(jax.lax.dynamic_slice_in_dim(x, start, step, axis=1), jnp.int32)
            bits = jnp.clip(bits, 0, _INF_BITS)  # monotone: the k-th largest of these is the answer, clipped
            fresh = jnp.arange(step) >= i * step - start  # not in the overlap, counted by the step before
            d = jnp.where(fresh, digit(bits), 1 << 16)
            return counts.at[jnp.where(d < 1 << 16, d + offsets, rows << 16)].add(1, mode="drop")  # row r at r << 16

        counts = jax.lax.fori_loop(0, -(-n // step), add, jnp.zeros(rows << 16, jnp.int32))
        return counts.reshape(rows, 1 << 16)

    def radix_pass(i, state):  # a loop, not two copies: compiles faster
        prefix, rank = state  # [rows]: the answer's bits found so far, its rank among the elements sharing them

        def digits(bits):  # pass 0: the top 16 bits; pass 1: the low 16 bits where the top ones are the prefix
            matches = (i == 0) | (bits >> 16 == prefix[:, None])
            return jnp.where(matches, (bits >> (16 - 16 * i)) & 0xFFFF, 1 << 16)

        digit, rank = jax.vmap(_radix_digit)(histogram(digits), rank)
        return (prefix << 16) | digit, rank

    state = (jnp.zeros(rows, jnp.int32), jnp.clip(k, 1, n).astype(jnp.int32))
    found, _ = jax.lax.fori_loop(0, 2, radix_pass, state) if n else state
    found = jnp.where(k < 1, _INF_BITS, jnp.where(k > n, 0, found))
    return jax.lax.bitcast_convert_type(found.astype(jnp.int32), jnp.float32)


@_kth_largest_rows.def_vmap
def _kth_largest_rows_vmap(axis_size: int, in_batched: list[bool], x: Array, k: Array) -> tuple[Array, bool]:
    """vmap folds the mapped axis into the rows: XLA-CPU runs a batched scatter (vmap's own
    rule) at about half the speed of a flat one. One tensor with many k, or too many rows:
    one after another."""
    x_batched, k_batched = in_batched
    k = k if k_batched else jnp.broadcast_to(k, (axis_size,) + k.shape)
    if x_batched and axis_size * x.shape[1] <= _MAX_ROWS:
        return _kth_largest_rows(x.reshape(-1, x.shape[-1]), k.reshape(-1)).reshape(k.shape), True
    if x_batched:
        return jax.lax.map(lambda xk: _kth_largest_rows(*xk), (x, k)), True
    return jax.lax.map(lambda one: _kth_largest_rows(x, one), k), True


def _radix_digit(counts: Array, rank: Array) -> tuple[Array, Array]:
    """From a histogram of 16-bit digits: the digit d of the rank-th largest element
    (1 <= rank <= total), and that element's rank among those with digit d. Searched as two
    8-bit digits, the cumulative counts of 256 bins at a time being cheaper than of 65,536."""
    def select(counts, rank):  # counts [256]
        upper = jnp.arange(256)[None, :] >= jnp.arange(256)[:, None]  # (a cumsum compiles slower)
        at_least = jnp.sum(jnp.where(upper, counts, 0), axis=1)  # at_least[d] = count(digit >= d)
        d = jnp.sum(at_least >= rank, dtype=jnp.int32) - 1
        return d, rank - (at_least[d] - counts[d])

    rows = counts.reshape(256, 256)
    high, rank = select(jnp.sum(rows, axis=1), rank)
    low, rank = select(rows[high], rank)
    return high * 256 + low, rank


def _order_statistic(magnitudes: Array, sorted_desc: Array | None, index: Array) -> Array:
    """The (index + 1)-th largest: from precomputed sorted values if there are any."""
    return kth_largest(magnitudes, index + 1) if sorted_desc is None else sorted_desc[index]


def magnitude(d: Array, sorted_desc: Array | None, density: Array, rescale: str | None = None) -> Array:
    """TIES trimming: keep the k = max(1, int(density * N)) entries of largest |d|.
    (Entries tied with the k-th largest are all kept; mergekit breaks such ties
    arbitrarily.)"""
    n = d.size
    k = jnp.clip(jnp.floor(density * n).astype(jnp.int32), 1, n)
    threshold = _order_statistic(jnp.abs(d), sorted_desc, k - 1)
    kept = _rescale(d, jnp.where(jnp.abs(d) >= threshold, d, 0.0), density, rescale)
    return jnp.where(density >= 1, d, jnp.where(density <= 0, 0.0, kept))


def magnitude_outliers(d: Array, sorted_desc: Array | None, density: Array, gamma: Array,
                       rescale: str | None = None) -> Array:
    """Model breadcrumbs: drop the top int(gamma N) entries by |d| (outliers) and enough of
    the smallest that int(density N) remain."""
    n = d.size
    keep = jnp.floor(density * n).astype(jnp.int32)
    top = jnp.floor(gamma * n).astype(jnp.int32)
    bottom = jnp.maximum(0, n - keep - top)
    # In ascending order the kept entries are [bottom, bottom + keep); in descending
    # order that is [n - bottom - keep, n - bottom).
    first = jnp.clip(n - bottom - keep, 0, n - 1)
    last = jnp.clip(n - bottom - 1, 0, n - 1)
    magnitude_ = jnp.abs(d)
    upper = _order_statistic(magnitude_, sorted_desc, first)
    lower = _order_statistic(magnitude_, sorted_desc, last)
    kept = jnp.where((magnitude_ <= upper) & (magnitude_ >= lower) & (keep > 0), d, 0.0)
    return jnp.where(density >= 1, d, _rescale(d, kept, density, rescale))


def abs_sums(base: Array, sources: Array, row_axis: int = -1) -> Array:
    """sum |task vector| of each source: [K], what the L1 rescale of a random sparsifier
    divides by, computed once for a search."""
    d = sources.astype(jnp.float32) - base.astype(jnp.float32)
    return jnp.sum(jnp.abs(d).reshape(d.shape[0], -1), axis=-1)


def della_stats(base: Array, sources: Array, row_axis: int = -1) -> tuple[Array, Array]:
    """DELLA's rank of |d| within each row, normalised to [0, 1]: [K, *S], and `abs_sums`
    [K]. A row runs along `row_axis` of a tensor (the input axis of a linear layer: -1 for
    torch's [out, in] weight, -2 for a Flax [in, out] kernel); a vector is one row."""
    d = jnp.abs(sources.astype(jnp.float32) - base.astype(jnp.float32))  # [K, *S]
    axis = -1 if base.ndim == 1 else (row_axis % base.ndim) + 1
    ranks = jnp.argsort(jnp.argsort(d, axis=axis), axis=axis).astype(jnp.float32)
    width = d.shape[axis]
    ranks = ranks / (width - 1) if width > 1 else jnp.zeros_like(ranks)
    return ranks, jnp.sum(d.reshape(d.shape[0], -1), axis=-1)


def _mix32(x: Array) -> Array:
    """MurmurHash3's 32-bit finalizer: a bijection whose output bits each depend on every
    input bit (an avalanche)."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hashed_uniform(key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform floats in [0, 1) on a 2^-24 grid, one per element: a counter-based hash of the
    element's index, keyed by two words drawn from `key`. A random mask costs a few integer
    ops per element instead of threefry's ~100 (DARE-TIES was 10x slower than TIES on CPU);
    distinct keys (sources, layers, candidates) give independent-looking masks, and a tensor's
    kept fraction is the density to within sampling noise (tests check it)."""
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(f"a random mask over {size} elements: indices past 2^32 would repeat")
    words = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape) if shape else jnp.uint32(0)
    bits = _mix32(_mix32(index ^ words[0]) + words[1])
    return (bits >> 8).astype(jnp.float32) * (2.0**-24)


def bernoulli(d: Array, density: Array, key: Array, rescale: str | None, abs_sum: Array | None = None) -> Array:
    """DARE: keep each entry with probability density, then rescale."""
    keep = hashed_uniform(key, d.shape) < jnp.clip(density, 0.0, 1.0)
    return jnp.where(density >= 1, d, _rescale(d, jnp.where(keep, d, 0.0), density, rescale, abs_sum))


def della_magprune(d: Array, rank: Array, density: Array, epsilon: Array, key: Array,
                   rescale: str | None, abs_sum: Array | None = None) -> Array:
    """DELLA: keep probability (density - eps) + 2 eps * normalised rank of |d| in its row."""
    probability = (density - epsilon) + rank * 2 * epsilon
    keep = hashed_uniform(key, d.shape) < jnp.clip(probability, 0.0, 1.0)
    return jnp.where(density >= 1, d, _rescale(d, jnp.where(keep, d, 0.0), density, rescale, abs_sum))


# --------------------------------------------------------------------------- the methods


def _sum_sources(x: Array) -> Array:
    """Sum over the leading source axis as K elementwise adds: XLA-CPU lowers a reduction
    over a small leading axis of a large tensor to a slow (superlinear) reduce-window."""
    total = x[0]
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


def _per_source_keys(key: Array | None, count: int) -> Array | None:
    return None if key is None else jax.random.split(key, count)


def _task_arithmetic_family(sparsifier: str | None):
    """mergekit's generalized task arithmetic: sparsify each task vector, weight, optional
    sign consensus, sum, optional normalisation by the (kept) weights, scale by lambda."""

    def merge(base, sources, params, stats, key, options: Options) -> Array:
        x0 = base.astype(jnp.float32)
        deltas = sources.astype(jnp.float32) - x0  # [K, *S]
        K = deltas.shape[0]
        density = params.get("density", jnp.ones((K,)))
        if sparsifier == "magnitude":
            deltas = jax.vmap(lambda d, s, p: magnitude(d, s, p, options.rescale))(deltas, stats, density)
        elif sparsifier == "magnitude_outliers":
            deltas = jax.vmap(lambda d, s, p, g: magnitude_outliers(d, s, p, g, options.rescale))(
                deltas, stats, density, params["gamma"])
        elif sparsifier == "random":
            keys = _per_source_keys(key, K)
            deltas = jax.vmap(lambda d, p, k, s: bernoulli(d, p, k, options.rescale, s))(deltas, density, keys, stats)
        elif sparsifier == "della":
            keys = _per_source_keys(key, K)
            ranks, sums = stats
            deltas = jax.vmap(lambda d, r, p, e, k, s: della_magprune(d, r, p, e, k, options.rescale, s))(
                deltas, ranks, density, params["epsilon"], keys, sums)

        weights = params["weight"].astype(jnp.float32).reshape((K,) + (1,) * (deltas.ndim - 1))
        # Rounded products, as mergekit sums them: XLA-CPU contracts a product feeding an add into
        # one fused multiply-add, whose unrounded product flips the sign election where the
        # weighted task vectors cancel exactly. A select between them prevents that (same values).
        deltas = jnp.where(deltas == 0, 0.0, deltas * weights)
        if options.consensus:
            majority = jnp.where(_sum_sources(deltas) >= 0, 1.0, -1.0)
            agree = (jnp.sign(deltas) == majority).astype(jnp.float32)  # pruned entries: sign 0
            mixed = _sum_sources(deltas * agree)
            divisor = _sum_sources(weights * agree)
            divisor = jnp.where(divisor == 0, 1.0, divisor)
        else:
            mixed = _sum_sources(deltas)
            divisor = _sum_sources(weights)
            divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
        if options.normalize:
            mixed = mixed / divisor
        mixed = mixed * params.get("lambda", 1.0)
        return (x0 + mixed).astype(base.dtype)

    return merge


def linear(base, sources, params, stats, key, options: Options) -> Array:
    """sum_i w_i x_i over all inputs (no base: a base model is one more input), divided
    by sum_i w_i if normalize."""
    weights = params["weight"].astype(jnp.float32)
    out = _sum_sources(weights.reshape((-1,) + (1,) * (sources.ndim - 1)) * sources.astype(jnp.float32))
    if options.normalize:
        out = out / jnp.sum(weights)
    return out.astype(sources.dtype)


def slerp(base, sources, params, stats, key, options: Options) -> Array:
    """Spherical interpolation from the base (t = 0) to the one other model (t = 1), over
    the whole flattened tensor; nearly parallel tensors interpolate linearly."""
    t = params["t"].astype(jnp.float32)
    v0, v1 = base.astype(jnp.float32).ravel(), sources[0].astype(jnp.float32).ravel()
    n0, n1 = jnp.linalg.norm(v0), jnp.linalg.norm(v1)
    n0, n1 = jnp.where(n0 > 1e-8, n0, 1.0), jnp.where(n1 > 1e-8, n1, 1.0)
    dot = jnp.clip(jnp.dot(v0 / n0, v1 / n1), -1.0, 1.0)
    parallel = jnp.abs(dot) > 0.9995
    theta = jnp.arccos(jnp.where(parallel, 0.0, dot))
    sin_theta = jnp.where(parallel, 1.0, jnp.sin(theta))
    c0 = jnp.where(parallel, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    c1 = jnp.where(parallel, t, jnp.sin(t * theta) / sin_theta)
    return (c0 * v0 + c1 * v1).reshape(base.shape).astype(base.dtype)


def model_stock(base, sources, params, stats, key, options: Options) -> Array:
    """Model Stock: t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task
    vectors; out = t mean(x_i) + (1 - t) x0 (the base where the denominator vanishes)."""
    x0 = base.astype(jnp.float32).ravel()
    xs = sources.astype(jnp.float32).reshape(sources.shape[0], -1)
    offsets = xs - x0
    K = xs.shape[0]
    norms = jnp.linalg.norm(offsets, axis=-1)
    cos = (offsets @ offsets.T) / jnp.maximum(norms[:, None] * norms[None, :], 1e-6)
    pairs = jnp.triu_indices(K, k=1)
    cos_theta = jnp.mean(jnp.clip(cos[pairs], -1.0, 1.0))
    denominator = 1 + (K - 1) * cos_theta
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0.0, K * cos_theta / jnp.where(singular, 1.0, denominator))
    out = t * (_sum_sources(xs) / K) + (1 - t) * x0
    return out.reshape(base.shape).astype(base.dtype)


def passthrough(base, sources, params, stats, key, options: Options) -> Array:
    """The one input, times an optional scale."""
    return (sources[0] * params["scale"][0]).astype(sources.dtype)


# --------------------------------------------------------------------------- the built-in methods

_WEIGHT = Parameter("weight", per_source=True)
_DENSITY = Parameter("density", per_source=True, default=1.0)
_LAMBDA = Parameter("lambda", per_source=False, default=1.0)


def _task_vector_method(name, sparsifier, *, consensus, normalize, rescale, extra=()):
    prepare = {"magnitude": magnitude_stats, "magnitude_outliers": magnitude_stats, "random": abs_sums,
               "della": della_stats}.get(sparsifier)
    parameters = (_WEIGHT, _LAMBDA) + ((_DENSITY,) if sparsifier else ()) + tuple(extra)
    return MergeMethod(
        name=name, parameters=parameters, merge=_task_arithmetic_family(sparsifier), base="required",
        default_options=Options(normalize=normalize, rescale="l1" if rescale else None, consensus=consensus),
        random=sparsifier in ("random", "della"), prepare=prepare, stats_required=sparsifier == "della",
    )


_GAMMA = Parameter("gamma", per_source=True, default=0.01)
_EPSILON = Parameter("epsilon", per_source=True, default=0.15)

# The registry: every merge method by name. jaxmerge's own register below, as a user's would;
# recipes, configs and genome spaces look names up here when they run, so a method
# registered later works everywhere a built-in one does.
_REGISTRY: dict[str, MergeMethod] = {}
BASE_ROLES = ("required", "optional", "none")


def register_method(method: MergeMethod, *, replace: bool = False) -> MergeMethod:
    """Adds `method` under `method.name` (a name already taken only with replace=True) and
    returns it. Checks the declaration: distinct parameter names, the base's role, the
    source counts, and stats for a method that requires them."""
    if not (isinstance(method, MergeMethod) and isinstance(method.name, str) and method.name.isidentifier()):
        raise ValueError(f"a merge method needs a MergeMethod whose name is an identifier, got {method!r}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"merge method {method.name!r} is already registered (pass replace=True to replace it)")
    names = [p.name for p in method.parameters]
    if not all(isinstance(p, Parameter) for p in method.parameters) or len(set(names)) != len(names):
        raise ValueError(f"merge method {method.name!r}: parameters must be distinct Parameter()s, got {names}")
    if method.base not in BASE_ROLES:
        raise ValueError(f"merge method {method.name!r}: base must be one of {', '.join(BASE_ROLES)}, "
                         f"got {method.base!r}")
    if method.min_sources < 1 or (method.max_sources is not None and method.max_sources < method.min_sources):
        raise ValueError(f"merge method {method.name!r}: sources must satisfy 1 <= min_sources <= max_sources, "
                         f"got {method.min_sources} and {method.max_sources}")
    if method.stats_required and method.prepare is None:
        raise ValueError(f"merge method {method.name!r} requires stats: give it a prepare function")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> MergeMethod:
    """Removes a registered method (a test's, say) and returns it."""
    return _REGISTRY.pop(get_method(name).name)


def method_names() -> tuple[str, ...]:
    """The registered methods' names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_method(name: str) -> MergeMethod:
    if name not in _REGISTRY:
        raise KeyError(f"unknown merge method {name!r} (registered: {', '.join(method_names())})")
    return _REGISTRY[name]


for _method in [
    MergeMethod("linear", (_WEIGHT,), linear, base="none", default_options=Options(normalize=True)),
    _task_vector_method("task_arithmetic", None, consensus=False, normalize=False, rescale=False),
    _task_vector_method("ties", "magnitude", consensus=True, normalize=True, rescale=False),
    _task_vector_method("dare_ties", "random", consensus=True, normalize=False, rescale=True),
    _task_vector_method("dare_linear", "random", consensus=False, normalize=False, rescale=True),
    _task_vector_method("breadcrumbs", "magnitude_outliers", consensus=False, normalize=False, rescale=False,
                        extra=(_GAMMA,)),
    _task_vector_method("breadcrumbs_ties", "magnitude_outliers", consensus=True, normalize=False,
                        rescale=False, extra=(_GAMMA,)),
    _task_vector_method("della", "della", consensus=True, normalize=True, rescale=True, extra=(_EPSILON,)),
    _task_vector_method("della_linear", "della", consensus=False, normalize=False, rescale=True,
                        extra=(_EPSILON,)),
    MergeMethod("slerp", (Parameter("t", per_source=False),), slerp, base="required",
                min_sources=1, max_sources=1),
    MergeMethod("model_stock", (), model_stock, base="required", min_sources=2),
    MergeMethod("passthrough", (Parameter("scale", per_source=True, default=1.0),), passthrough,
                base="none", max_sources=1),
]:
    register_method(_method)


def merge_tensor(method: MergeMethod | str, base: Array | None, sources: Array, params: dict,
                 key: Array | None = None, options: Options | None = None, stats=None) -> Array:
    """Merges one tensor. sources [K, *S]; params per `method.parameters` (defaults filled
    in); stats from `method.prepare(base, sources)` when the caller reuses them."""
    method = get_method(method) if isinstance(method, str) else method
    options = method.default_options if options is None else options
    if stats is None and method.stats_required:
        stats = method.prepare(base, sources)
    if method.random and key is None:
        raise ValueError(f"{method.name} is random: pass a PRNG key")
    return method.merge(base, sources, fill_defaults(method, params, sources.shape[0]), stats, key, options)


def fill_defaults(method: MergeMethod, params: dict, num_sources: int) -> dict:
    """Parameters as float32 arrays, defaults added; a missing required one is an error."""
    out = {}
    for p in method.parameters:
        value = params.get(p.name, p.default)
        if value is None:
            raise ValueError(f"merge method {method.name!r} needs parameter {p.name!r}")
        value = jnp.asarray(value, jnp.float32)
        if p.per_source and value.ndim == 0:
            value = jnp.broadcast_to(value, (num_sources,))
        out[p.name] = value
    unknown = set(params) - {p.name for p in method.parameters}
    if unknown:
        raise ValueError(f"merge method {method.name!r} has no parameter(s) {', '.join(sorted(unknown))}")
    return out
