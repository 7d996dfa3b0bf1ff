"""The rest of mergekit 0.1.5's merge methods, in the one registry beside `methods.py`'s.

Spherical interpolation: nuslerp, multislerp, karcher. Task-vector selection: sce, ram,
ramplus_tl, nearswap, arcee_fusion. Each takes mergekit's parameters (names, defaults, one
per source or one for the merge), its role for the base (required; optional: used when a
recipe names one; none: the base is an input like the others) and its source counts.
mergekit types some parameters as bool (nuslerp_row_wise, nuslerp_flatten,
normalize_weights) or int (max_iter); here every parameter is a float32 array like the
others, 0 meaning false, so that no value recompiles.

Semantics and their limits (see each method's docstring):
- `Options.compute_dtype` None or float32: float32 math, the result cast to the base's
  dtype (the sources' without a base); the search's merges and `--compute-dtype float32`.
- bfloat16 / float16 (a recipe's `dtype:`, `jaxmerge merge`): mergekit's arithmetic in it,
  float32 math with each step rounded where torch on CPU rounds (`rounding`): every
  elementwise op and transcendental, each reduction (norm, sum, mean, var, dot, softmax)
  accumulated in float32 and rounded once, Python-float scalars kept float32 but those
  torch compares or clamps with cast to the dtype; karcher's norms stay float32 as
  mergekit's, a float32 0-dim tensor before a half-precision one is cast to its dtype.
  ramplus_tl and arcee_fusion return float32 there, as mergekit's (float32 scales, a
  float32 mask promote their sums): written in out_dtype, whatever it is, with mergekit's
  bits (mergekit without out_dtype writes them in float32, jaxmerge in the recipe's dtype).
- Products that torch rounds before adding them are rounded here too (`rounded`), and
  sources are summed in order (`sum_sources`): the elementwise methods (nearswap, ram,
  ramplus_tl, arcee_fusion where its mask agrees) give mergekit's bits in float32 and in
  half precision; where a reduction or a transcendental function enters (norms, sin, acos,
  softmax), XLA's and torch's differ in the last float32 bits, and so do float32 results
  (tests bound them in ulps). In half precision most of those sums are rounded to the dtype
  at once, which hides the difference: nuslerp, multislerp and sce gave mergekit's bits in
  the tests, karcher (float32 norms) differs by an ulp at a few entries. sce below
  select_topk 1 keeps every entry tied at the cut, mergekit's top-k an arbitrary count of
  them: rare in float32, common among half-precision variances.
- nuslerp, arcee_fusion (and model_stock's filter_wise, in methods.py) work along a
  tensor's rows: torch's last axis, a linear layer's input features. Their `prepare` takes
  the row axis (`tree.prepare` gives -2 for a Flax kernel [in, out], the disk-to-disk merge
  -1 for the checkpoint's [out, in]), so their statistics are required.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.merge.methods import MergeMethod, Options, Parameter, kth_largest, register_method, rounding

Array = jax.Array
_F32 = jnp.float32
_UNROUNDED = rounding(None)  # float32 arithmetic: the identity


def rounded(x: Array) -> Array:
    """x, a product, rounded to float32 before whatever adds it: the select (the same value;
    -0 becomes +0) keeps XLA-CPU from contracting the product and the add into one fused
    multiply-add, which torch does not do and whose unrounded product changes the last bit."""
    return jnp.where(x == 0, 0.0, x)


def sum_sources(x: Array, rnd=_UNROUNDED) -> Array:
    """Sum over the leading source axis in order, ((x0 + x1) + x2)..., as torch sums a small
    leading axis (and as fast: XLA-CPU reduces a small leading axis slowly); each partial sum
    rounded by `rnd` (torch's `total += x` in a half-precision dtype; its sum(dim=0)
    accumulates in float32 and rounds once: rnd(sum_sources(x)))."""
    total = x[0]
    for i in range(1, x.shape[0]):
        total = rnd(total + x[i])
    return total


def divided(a: Array, b: Array) -> Array:
    """a / b, IEEE's quotient even where b is broadcast over a: XLA rewrites a division by a
    broadcast value into a product with its reciprocal, which rounds differently from
    torch's division (in half precision that shows as a last-bit difference)."""
    return a / jnp.where(jnp.isnan(a), jnp.nan, b)


def _is_half(options: Options) -> bool:
    """Whether the merge computes as mergekit in a half-precision `dtype:` (each step rounded)."""
    return options.compute_dtype in ("bfloat16", "float16")


def _flag(value: Array) -> Array:
    """A mergekit bool given as a number: anything but 0 is true."""
    return value != 0


def _out_dtype(base: Array | None, sources: Array):
    return sources.dtype if base is None else base.dtype


# --------------------------------------------------------------------------- nuslerp


def _torch_axes(ndim: int, row_axis: int) -> tuple[int, int]:
    """The axes that are torch's last (a row: row_axis) and first (the other one of a matrix)."""
    last = row_axis % ndim
    return last, (0 if last == ndim - 1 else ndim - 1)


def _cosine(v0: Array, v1: Array, axis: int | None, compute_dtype: str | None = None) -> Array:
    """mergekit's cos between v0 and v1 along `axis` (None: the whole tensors), axis kept:
    each normalised (its norm at least 1e-7), the dot product clipped to [-1, 1]; in
    `compute_dtype` each norm, quotient, product and sum rounded to it."""
    rnd = rounding(compute_dtype)
    divide = divided if compute_dtype in ("bfloat16", "float16") else jnp.divide

    def unit(v):
        return rnd(divide(v, jnp.maximum(rnd(jnp.sqrt(jnp.sum(v * v, axis=axis, keepdims=True))),
                                         rnd(np.float32(1e-7)))))
    return jnp.clip(rnd(jnp.sum(rnd(unit(v0) * unit(v1)), axis=axis, keepdims=True)), -1.0, 1.0)


def _endpoints(base: Array | None, sources: Array, compute_dtype: str | None = None) -> tuple[Array, Array]:
    """The two vectors nuslerp interpolates: the sources, or their task vectors given a base."""
    rnd = rounding(compute_dtype)
    x = rnd(sources.astype(_F32))
    if base is None:
        return x[0], x[1]
    x0 = rnd(base.astype(_F32))
    return rnd(x[0] - x0), rnd(x[1] - x0)


def nuslerp_stats(base: Array | None, sources: Array, row_axis: int = -1,
                  compute_dtype: str | None = None) -> dict[str, Array]:
    """The cosines nuslerp may need, which depend on the inputs alone: of the whole tensors
    ("flat", nuslerp_flatten), of each row along torch's last axis ("last", the default
    without flattening) and along its first ("first", nuslerp_row_wise); axes kept. In
    `compute_dtype` as mergekit computes them there."""
    v0, v1 = _endpoints(base, sources, compute_dtype)
    if v0.ndim == 0:
        flat = _cosine(v0, v1, None, compute_dtype)
        return {"flat": flat, "last": flat, "first": flat}
    last, first = _torch_axes(v0.ndim, row_axis)
    return {"flat": _cosine(v0, v1, None, compute_dtype), "last": _cosine(v0, v1, last, compute_dtype),
            "first": _cosine(v0, v1, first, compute_dtype)}


def nuslerp(base, sources, params, stats, key, options: Options) -> Array:
    """Spherical interpolation of two models (or of their task vectors, given a base) at
    t = w1 / (w0 + w1) (1/2 where |w0 + w1| < 1e-6): over the whole tensor
    (nuslerp_flatten, the default), else row by row along torch's last axis, or its first
    with nuslerp_row_wise; exactly colinear vectors interpolate linearly.

    mergekit computes t in float64 from the recipe's decimals, a plan holds float32 weights:
    t, and so the result, may differ in the last bit unless t is exact in float32. In a
    half-precision compute dtype every step is rounded to it (t, a Python float there, not)."""
    rnd = rounding(options.compute_dtype)
    v0, v1 = _endpoints(base, sources, options.compute_dtype)
    stats = nuslerp_stats(base, sources, compute_dtype=options.compute_dtype) if stats is None else stats
    weight = params["weight"]
    total = weight[0] + weight[1]
    small = jnp.abs(total) < 1e-6
    t = jnp.where(small, 0.5, weight[1] / jnp.where(small, 1.0, total))
    cos = jnp.where(_flag(params["nuslerp_flatten"]), stats["flat"],
                    jnp.where(_flag(params["nuslerp_row_wise"]), stats["first"], stats["last"]))
    # mergekit's eps ** 2 (eps = 1e-8), compared in the dtype: 0 in float16
    colinear = rnd(1 - rnd(rounded(cos * cos))) <= rnd(np.float32(1e-16))
    theta = rnd(jnp.arccos(jnp.where(colinear, 0.0, cos)))
    if _is_half(options):
        sines = rnd(rnd(rounded(rnd(jnp.sin(rnd((1 - t) * theta))) * v0))
                    + rnd(rounded(rnd(jnp.sin(rnd(t * theta))) * v1)))
        spherical = rnd(divided(sines, rnd(jnp.sin(theta))))
    else:
        spherical = (rounded(jnp.sin((1 - t) * theta) * v0) + rounded(jnp.sin(t * theta) * v1)) / jnp.sin(theta)
    out = jnp.where(colinear, rnd(rnd(rounded((1 - t) * v0)) + rnd(rounded(t * v1))), spherical)
    out = out if base is None else rnd(rnd(base.astype(_F32)) + out)
    return out.astype(_out_dtype(base, sources))


# --------------------------------------------------------------------------- multislerp


def _norms(x: Array) -> Array:
    """The L2 norm of each row of x [K, N]: [K, 1]."""
    return jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def multislerp(base, sources, params, stats, key, options: Options) -> Array:
    """Barycentric interpolation on the hypersphere (whole tensors, or their task vectors
    given a base): the inputs' unit vectors are averaged with the weights (normalised to
    sum 1 with normalize_weights), projected onto the tangent space at that mean,
    interpolated there, mapped back by the exponential map and scaled by the weighted mean
    norm. One source is returned as it is. A vanishing weighted mean (antipodal inputs) falls
    back to the weighted sum for two sources; for more mergekit raises, here the tensor
    becomes NaN (which `jaxmerge merge` refuses, naming it)."""
    count = sources.shape[0]
    if count == 1:
        return sources[0].astype(_out_dtype(base, sources))
    rnd = rounding(options.compute_dtype)
    divide = divided if _is_half(options) else jnp.divide
    x = rnd(sources.astype(_F32)).reshape(count, -1)
    if base is not None:
        x = rnd(x - rnd(base.astype(_F32)).reshape(1, -1))
    weight = rnd(params["weight"].astype(_F32))  # mergekit's torch.tensor(weights, dtype=dtype)
    weight = jnp.where(_flag(params["normalize_weights"]), rnd(divide(weight, rnd(sum_sources(weight)))), weight)
    w = weight[:, None]
    eps = params["eps"]
    norms = rnd(_norms(x))  # [K, 1]
    units = rnd(divide(x, rnd(norms + eps)))
    mean = rnd(sum_sources(rnd(rounded(units * w))))
    mean_norm = rnd(jnp.sqrt(jnp.sum(mean * mean)))
    mean = rnd(divide(mean, mean_norm))
    dots = rnd(jnp.sum(rnd(units * mean), axis=-1, keepdims=True))
    tangent = rnd(sum_sources(rnd(rounded(rnd(units - rnd(rounded(dots * mean))) * w))))
    tangent_norm = rnd(rnd(jnp.sqrt(jnp.sum(tangent * tangent))) + eps)
    result = rnd(rnd(rounded(mean * rnd(jnp.cos(tangent_norm))))
                 + rnd(rounded(tangent * rnd(rnd(jnp.sin(tangent_norm)) / tangent_norm))))
    result = rnd(result * rnd(sum_sources(rnd(rounded(norms[:, 0] * weight)))))
    fallback = rnd(sum_sources(rnd(rounded(x * w)))) if count == 2 else jnp.full_like(result, jnp.nan)
    out = jnp.where(mean_norm < rnd(eps), fallback, result)  # torch compares in the dtype
    out = out.reshape(sources.shape[1:])
    out = out if base is None else rnd(rnd(base.astype(_F32)) + out)
    return out.astype(_out_dtype(base, sources))


# --------------------------------------------------------------------------- karcher


def _karcher_step(units: Array, alpha: Array, valid: Array, tol: Array, rnd=_UNROUNDED, divide=jnp.divide):
    """One Riemannian gradient step of the weighted Karcher mean on the unit sphere: the
    loop body over (iteration, mean, converged). `rnd` rounds what torch rounds in a
    half-precision dtype (not the float32 norms); `divide` divides by a broadcast norm."""
    def step(state):
        i, mean, _ = state
        dots = jnp.clip(rnd(jnp.dot(units, mean, precision=jax.lax.Precision.HIGHEST)), -1.0, 1.0)  # [K]
        theta = rnd(jnp.arccos(dots))
        moving = valid & ~(theta < tol)  # mergekit skips inputs already at the mean
        coefficient = rnd(rounded(alpha * rnd(theta / rnd(jnp.sin(theta)))))
        terms = rnd(rounded(coefficient[:, None] * rnd(units - rnd(rounded(dots[:, None] * mean)))))
        tangent = sum_sources(jnp.where(moving[:, None], terms, 0.0), rnd)  # torch's tangent += term
        tangent_norm = jnp.sqrt(jnp.sum(tangent * tangent))
        converged = tangent_norm < tol
        # cos and sin of the float32 norm, rounded to the dtype first (a 0-dim tensor before a
        # half-precision one is cast to its dtype); tangent / norm divides in float32
        moved = rnd(rnd(rounded(rnd(jnp.cos(tangent_norm)) * mean))
                    + rnd(rounded(rnd(jnp.sin(tangent_norm)) * rnd(divide(tangent, tangent_norm)))))
        moved_norm = jnp.sqrt(jnp.sum(moved * moved))
        moved = jnp.where(moved_norm > tol, rnd(divide(moved, moved_norm)), moved)
        return i + 1, jnp.where(converged, mean, moved), converged
    return step


def karcher(base, sources, params, stats, key, options: Options) -> Array:
    """The Karcher (Riemannian) mean of the inputs' directions with equal weights, scaled by
    their mean norm (mergekit's "karcher": every input counts, a recipe's base included).
    Inputs of norm <= tol take no part in the direction; the mean starts at the normalised
    average (the first input's direction if that vanishes) and moves by gradient steps
    until the tangent's norm falls below tol or after max_iter steps (a while loop, per
    tensor: tensors stop at their own step). No input above tol: zeros."""
    count = sources.shape[0]
    if count == 1:
        return sources[0]
    rnd = rounding(options.compute_dtype)
    divide = divided if _is_half(options) else jnp.divide
    x = rnd(sources.astype(_F32)).reshape(count, -1)
    tol = params["tol"]
    norms = _norms(x)[:, 0]  # [K], float32 in any dtype (mergekit's)
    units = jnp.where(norms[:, None] == 0, 0.0, rnd(divide(x, jnp.where(norms == 0, 1.0, norms)[:, None])))
    valid = norms > tol
    num_valid = jnp.sum(valid)
    alpha = jnp.where(valid, 1.0 / jnp.maximum(num_valid, 1).astype(_F32), 0.0)
    mean = sum_sources(rnd(rounded(alpha[:, None] * units)), rnd)  # torch's mean += alpha * unit
    mean_norm = jnp.sqrt(jnp.sum(mean * mean))
    mean = jnp.where(mean_norm < tol, units[jnp.argmax(valid)], rnd(divide(mean, mean_norm)))
    step = _karcher_step(units, alpha, valid, tol, rnd, divide)
    _, mean, _ = jax.lax.while_loop(lambda s: (s[0] < params["max_iter"]) & ~s[2], step,
                                    (jnp.int32(0), mean, jnp.bool_(False)))
    scale = sum_sources(rounded(np.float32(1 / count) * norms))
    out = jnp.where(num_valid > 0, rnd(rnd(scale) * mean), 0.0)  # the float32 scale cast to the dtype first
    return out.reshape(sources.shape[1:]).astype(sources.dtype)


# --------------------------------------------------------------------------- sce


def sce_stats(base: Array, sources: Array, row_axis: int = -1, compute_dtype: str | None = None) -> tuple[Array, Array]:
    """The variance of the task vectors over the sources [*S] and its magnitudes sorted
    descending [N]: computed once for a search, any select_topk then costs a gather. In
    `compute_dtype` the task vectors and the variance rounded to it."""
    rnd = rounding(compute_dtype)
    variance = rnd(jnp.var(rnd(rnd(sources.astype(_F32)) - rnd(base.astype(_F32))), axis=0))
    return variance, -jnp.sort(-jnp.abs(variance).ravel())


def sce(base, sources, params, stats, key, options: Options) -> Array:
    """SCE (select, calculate, erase): keep the int(select_topk * nonzero) entries where the
    task vectors vary most over the sources (all with select_topk >= 1), weight each task
    vector by its mean square (normalised; equal weights where they sum below 1e-6), erase
    the entries whose sign disagrees with the sum's (TIES' election) and divide by the kept
    weights. (Entries tied with the last kept variance are all kept; mergekit's top-k
    breaks such ties arbitrarily: rare in float32, common among half-precision variances.)
    In a half-precision compute dtype every step is rounded to it."""
    rnd = rounding(options.compute_dtype)
    divide = divided if _is_half(options) else jnp.divide
    x0 = rnd(base.astype(_F32))
    deltas = rnd(rnd(sources.astype(_F32)) - x0)  # [K, *S]
    count = deltas.shape[0]
    topk = params["select_topk"]

    def select(deltas):
        variance, ordered = sce_stats(base, sources, compute_dtype=options.compute_dtype) if stats is None else stats
        magnitude = jnp.abs(variance)
        k = jnp.floor(jnp.sum(variance != 0).astype(_F32) * topk).astype(jnp.int32)
        threshold = kth_largest(magnitude, k) if ordered is None else ordered[jnp.clip(k - 1, 0, ordered.size - 1)]
        return jnp.where((k > 0) & (magnitude >= threshold), deltas, 0.0)

    deltas = jax.lax.cond(topk < 1, select, lambda d: d, deltas)  # one branch runs, unless vmapped
    majority = jnp.where(rnd(sum_sources(deltas)) >= 0, 1.0, -1.0)  # a sum rounded to -0 counts as >= 0
    agree = jnp.sign(deltas) == majority
    weight = rnd(jnp.mean(rnd(jnp.square(deltas)).reshape(count, -1), axis=-1))  # [K]
    weight_sum = rnd(sum_sources(weight))
    weight = jnp.where(jnp.abs(weight_sum) < 1e-6, rnd(np.float32(1 / count)), rnd(divide(weight, weight_sum)))
    kept = jnp.where(agree, weight.reshape((count,) + (1,) * (deltas.ndim - 1)), 0.0)
    divisor = jnp.maximum(rnd(sum_sources(kept)), rnd(np.float32(1e-6)))
    merged = rnd(rnd(sum_sources(rnd(rounded(deltas * kept)))) / divisor)
    return rnd(x0 + merged).astype(base.dtype)


# --------------------------------------------------------------------------- nearswap


def nearswap(base, sources, params, stats, key, options: Options) -> Array:
    """NearSwap: take the other model's value where it is near the base's. Per entry,
    w = clip(t / max(|base - other|, 1e-6), 0, 1) and out = w other + (1 - w) base; in a
    half-precision compute dtype each step rounded to it (1e-6 too, as torch's clamp casts
    it: in float16 the reciprocal of a difference below 2^-16 is inf, w then 1)."""
    rnd = rounding(options.compute_dtype)
    a, b = rnd(base.astype(_F32)), rnd(sources[0].astype(_F32))
    difference = jnp.maximum(rnd(jnp.abs(a - b)), rnd(np.float32(1e-6)))
    # torch's t / x: x.reciprocal() * t
    weight = jnp.clip(rnd(rounded(rnd(1.0 / difference) * params["t"])), 0.0, 1.0)
    return rnd(rnd(rounded(weight * b)) + rnd(rounded(rnd(1 - weight) * a))).astype(base.dtype)


# --------------------------------------------------------------------------- RAM


def _ram(base: Array, sources: Array, epsilon: Array, r: Array | None = None, alpha: Array | None = None,
         compute_dtype: str | None = None) -> Array:
    """Reinforced agent merging: an entry moved (|task vector| > epsilon) by one source
    takes that source's change, one moved by several their mean. ramplus_tl (r, alpha
    given) scales each source's unique changes by 1 + r min(alpha, shared / unique), its
    counts of shared and unique entries in the tensor.

    In a half-precision compute dtype the task vectors, the quotients and RAM's sums are
    rounded to it, and epsilon too where it is compared. ramplus_tl's scales are float32
    tensors there, which promote its sums: its result is float32 (mergekit writes it so
    unless out_dtype says otherwise), not rounded to the dtype."""
    rnd = rounding(compute_dtype)
    x0 = rnd(base.astype(_F32))
    deltas = rnd(rnd(sources.astype(_F32)) - x0)  # [K, *S]
    moved = jnp.abs(deltas) > rnd(epsilon)
    counts = sum_sources(moved.astype(jnp.int32))
    unique, shared = counts == 1, counts > 1
    deltas = jnp.where(moved, deltas, 0.0)
    own = deltas
    if r is not None:
        axes = tuple(range(1, deltas.ndim))
        num_shared = jnp.sum(moved & shared, axis=axes).astype(_F32)  # [K]
        num_unique = jnp.sum(moved & unique, axis=axes).astype(_F32)
        ratio = num_shared / jnp.maximum(num_unique, epsilon)
        scale = 1 + rounded(r * jnp.clip(ratio, 0.0, alpha))
        own = deltas * scale.reshape((-1,) + (1,) * (deltas.ndim - 1))
    # Divided source by source: XLA would turn a division by a broadcast divisor into a product
    # with its reciprocal, which rounds differently from torch's division.
    divisor = jnp.maximum(counts, 1).astype(_F32)
    terms = [jnp.where(unique, own[i], jnp.where(shared, rnd(deltas[i] / divisor), 0.0))
             for i in range(deltas.shape[0])]
    merged = sum(terms[1:], terms[0])  # in order, as sum_sources
    if r is not None:  # float32 sums
        return x0 + merged if compute_dtype in ("bfloat16", "float16") else (x0 + merged).astype(base.dtype)
    return rnd(x0 + rnd(merged)).astype(base.dtype)


def ram(base, sources, params, stats, key, options: Options) -> Array:
    """RAM: each entry moved by a single source takes its change; entries moved by several
    the mean of their changes (see `_ram`)."""
    return _ram(base, sources, params["epsilon"], compute_dtype=options.compute_dtype)


def ramplus_tl(base, sources, params, stats, key, options: Options) -> Array:
    """RAM+ (tensor-local): RAM with each source's unique changes scaled up by
    1 + r min(alpha, shared / unique) (see `_ram`)."""
    return _ram(base, sources, params["epsilon"], params["r"], params["alpha"], options.compute_dtype)


# --------------------------------------------------------------------------- arcee_fusion

_QUARTILES = (0.25, 0.5, 0.75)


def arcee_fusion_stats(base: Array, sources: Array, row_axis: int = -1, compute_dtype: str | None = None) -> Array:
    """KL(softmax(other) || softmax(base)) of each row, softmaxes along torch's last axis
    (`row_axis`), each plus 1e-8; the row axis kept, as arcee_fusion's importance needs. In
    `compute_dtype` each softmax, sum, quotient, logarithm and product rounded to it."""
    rnd = rounding(compute_dtype)
    axis = row_axis % base.ndim if base.ndim else None
    p = rnd(rnd(jax.nn.softmax(rnd(sources[0].astype(_F32)), axis=axis)) + 1e-8)
    q = rnd(rnd(jax.nn.softmax(rnd(base.astype(_F32)), axis=axis)) + 1e-8)
    return rnd(jnp.sum(rnd(rounded(p * rnd(jnp.log(rnd(p / q))))), axis=axis, keepdims=True))


def arcee_fusion(base, sources, params, stats, key, options: Options) -> Array:
    """Arcee Fusion: take the other model's change where its importance, |change| times its
    row's KL divergence (`arcee_fusion_stats`), reaches median + 1.5 IQR of the tensor's
    importances (quantiles at index floor(q (N - 1)) of the sorted values). mergekit
    estimates the quantiles of a tensor over 1M entries from a random sample of 1M (its
    result varies from run to run); here they are exact at any size. In a half-precision
    compute dtype the importances and the threshold are rounded to it, and the result is
    float32 (mergekit's mask is, and promotes base + change * mask), not rounded to it."""
    rnd = rounding(options.compute_dtype)
    x0, x1 = rnd(base.astype(_F32)), rnd(sources[0].astype(_F32))
    kl = arcee_fusion_stats(base, sources, compute_dtype=options.compute_dtype) if stats is None else stats
    change = rnd(x1 - x0)
    importance = rnd(jnp.abs(change) * kl)
    ordered = jnp.sort(importance.ravel())
    q1, median, q3 = (ordered[int(np.float32(q) * np.float32(ordered.size - 1))] for q in _QUARTILES)
    threshold = rnd(median + rnd(rounded(1.5 * rnd(q3 - q1))))
    out = x0 + jnp.where(importance >= threshold, change, 0.0)
    return out if _is_half(options) else out.astype(base.dtype)


# --------------------------------------------------------------------------- the registry

_WEIGHT = Parameter("weight", per_source=True)

for _method in [
    MergeMethod("nuslerp", (_WEIGHT, Parameter("nuslerp_row_wise", per_source=False, default=0.0),
                            Parameter("nuslerp_flatten", per_source=False, default=1.0)),
                nuslerp, base="optional", prepare=nuslerp_stats, stats_required=True, min_sources=2, max_sources=2),
    MergeMethod("multislerp", (_WEIGHT, Parameter("normalize_weights", per_source=False, default=1.0),
                               Parameter("eps", per_source=False, default=1e-8)), multislerp, base="optional"),
    MergeMethod("karcher", (Parameter("max_iter", per_source=False, default=10.0),
                            Parameter("tol", per_source=False, default=1e-5)), karcher, base="none"),
    MergeMethod("sce", (Parameter("select_topk", per_source=False, default=1.0),), sce, base="required",
                prepare=sce_stats),
    MergeMethod("nearswap", (Parameter("t", per_source=False),), nearswap, base="required",
                min_sources=1, max_sources=1),
    MergeMethod("ram", (Parameter("epsilon", per_source=False, default=1e-5),), ram, base="required"),
    MergeMethod("ramplus_tl", (Parameter("r", per_source=False, default=0.1),
                               Parameter("alpha", per_source=False, default=0.2),
                               Parameter("epsilon", per_source=False, default=1e-5)), ramplus_tl, base="required"),
    MergeMethod("arcee_fusion", (), arcee_fusion, base="required", prepare=arcee_fusion_stats,
                stats_required=True, min_sources=1, max_sources=1),
]:
    register_method(_method)
