"""Merge methods as pure functions of one tensor, and their registry.

Every method has the same signature:

    merge(base, sources, params, stats, key, options) -> merged tensor

  base     [*S] or None        the base model's tensor (task vectors are taken against it)
  sources  [K, *S]             the other models' tensors, stacked
  params   {name: array}       per-source parameters [K] (weight, density, gamma, epsilon),
                               merge-wide ones [] (t, lambda); arrays, so new values never
                               recompile and a population can be vmapped
  stats    from `prepare`      what depends only on base and sources (DELLA's ranks, sums of
                               |task vector|), computed once and shared by every candidate; None:
                               computed in the call (a one-off merge). TIES and breadcrumbs prepare
                               nothing: each candidate selects by radix passes (`_window_mask`)
  key      PRNG key or None    for the random sparsifiers (DARE, DELLA)
  options  frozen Options      static choices that change the computation (normalize, rescale,
                               the compute dtype, the tie rule)

Semantics follow mergekit 0.1.5 (see each helper's docstring). Dtypes: with
`Options.compute_dtype` None the math is float32 and the result is cast to the base's dtype
(the accurate result, the search's). With a compute dtype, the arithmetic is mergekit's in
its `dtype:` (`rounding`): the inputs cast to it and each step rounded to it where torch
computing in it rounds (TIES, task arithmetic, breadcrumbs, DARE and DELLA: every step; linear
and SLERP: float32 inside, the inputs and result in the dtype). Selections by magnitude keep
exactly mergekit's count of entries; `Options.ties` says which of those tied at the cut
(`_window_mask`).

Methods are looked up by name in one registry. A method of one's own, registered once,

    register_method(MergeMethod("midpoint", (Parameter("weight", per_source=True),), midpoint, base="required"))

is then a name like the built-in ones: in `merge_params`, a `jaxmerge merge` recipe's
merge_method and an evolve config's genome.merge_method.

(Over 800 lines: the methods share their sparsifiers, order statistics, roundings and
selection rules (torch's sort replayed among them), which are kept beside them rather than
in a module no other code would read.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_EPS = 1e-7  # mergekit's tolerance for a vanishing norm when rescaling
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # Options.compute_dtype
TIE_RULES = ("index", "torch")  # Options.ties


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
    # None: float32 arithmetic, the result cast to the base's dtype (the accurate result);
    # a dtype of COMPUTE_DTYPES: mergekit's `dtype:`, every step rounded to it as torch computes
    compute_dtype: str | None = None
    ties: str = "index"  # which entries tied at a selection's cut are kept: TIE_RULES, see `_window_mask`
    # the "index" rule's order: None, the tensor's flat order; (rows, cols): the tensor is a
    # [rows, cols] one whose entries count column by column, as `merge.tree` gives a Flax kernel
    # [in, out], so that ties are counted in torch's order (its weight [out, in] row by row),
    # the order of `jaxmerge merge`: the search's merges and its exported recipes keep the same
    index_order: tuple[int, int] | None = None

    def __post_init__(self):
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: expected None or one of {', '.join(COMPUTE_DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        if self.ties not in TIE_RULES:
            raise ValueError(f"ties: expected one of {', '.join(TIE_RULES)}, got {self.ties!r}")


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
    counts: tuple[str, ...] = ()  # parameters mergekit turns into entry counts, int(value * size): `exact_counts`

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(f"merge method {self.name!r} has no parameter {name!r} "
                       f"(it has: {', '.join(p.name for p in self.parameters)})")


# --------------------------------------------------------------------------- dtypes
# mergekit computes in its `dtype:`: torch's arithmetic in bfloat16 or float16 does each
# operation in float32 and rounds its result to the dtype; a sum accumulates in float32 and
# is rounded once. Here the math is float32 with those roundings written out (`rounding`).

def rounding(compute_dtype: str | None) -> Callable[[Array], Array]:
    """x (float32) -> x rounded to `compute_dtype` (to nearest, ties to even), kept float32:
    what torch computing in that dtype stores after each operation. The identity for None and
    float32. Not a cast there and back: XLA may drop such a pair (it allows itself excess
    precision). bfloat16: `_to_bfloat16`'s integer rounding; float16: `reduce_precision`,
    which flushes float16's subnormals, which torch keeps, so those are rounded on their
    fixed 2**-24 grid here."""
    if compute_dtype in (None, "float32"):
        return lambda x: x
    if compute_dtype == "bfloat16":
        return _to_bfloat16
    if compute_dtype == "float16":
        def to_float16(x):
            subnormal = jnp.round(x * 2.0**24) * 2.0**-24
            return jnp.where(jnp.abs(x) < 2.0**-14, subnormal, jax.lax.reduce_precision(x, exponent_bits=5,
                                                                                         mantissa_bits=10))
        return to_float16
    raise ValueError(f"compute_dtype: expected None or one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")


def _to_bfloat16(x: Array) -> Array:
    """x (float32) rounded to bfloat16's precision (to nearest, ties to even), kept float32:
    five integer operations on its bits, which XLA-CPU vectorises (its reduce_precision, or
    any guard here, costs 1.5x; on a merge, up to 2x). Infinities and the NaNs computations
    make stay what they are; a float32 NaN of the largest payloads (bits 0x7FFF8001 and up,
    without the sign) carries into the sign and becomes a zero (NaN inputs are refused unless
    allowed, and bfloat16 / float16 ones are not of those)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + (jnp.uint32(0x7FFF) + ((bits >> 16) & 1))) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _work_dtype(compute_dtype: str | None) -> str | None:
    """The dtype mergekit's random sparsifiers rescale in on a CPU: bfloat16 stays, float16
    works in float32 (torch.bernoulli has no float16 CPU kernel), the result is cast back."""
    return "bfloat16" if compute_dtype == "bfloat16" else None


def _product(x: Array, factor: Array) -> Array:
    """x * factor, rounded to float32 before whatever adds it: torch adds rounded products,
    while XLA-CPU may contract a product feeding an add into one fused multiply-add, whose
    unrounded product changes the last bit. A select on x in between prevents that (the same
    value, but -0 for +0; a select on the product itself, or on isnan, the compiler sees
    through, and the search's results then differ in their last bits between programs)."""
    return jnp.where(x == 0, 0.0, x * factor)


def _materialized(x: Array) -> Array:
    """x, computed once into memory: the branch of a conditional that is always taken (XLA
    cannot tell). XLA-CPU otherwise fuses a sparsified task vector into every consumer and
    recomputes it, roundings and selection included, per use (5x a TIES merge's time in
    bfloat16); an optimization barrier does not stop that on CPU."""
    first = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32) if x.size else jnp.int32(1)
    return jax.lax.cond((first | 1) != 0, lambda: x, lambda: jnp.zeros_like(x))


def _divide(a: Array, b: Array) -> Array:
    """a / b, IEEE's quotient even where b is one number for all of a: XLA rewrites a division
    by a broadcast scalar into a multiplication by its reciprocal, which rounds differently
    (torch divides). A divisor that depends on a per entry cannot be rewritten."""
    return a / jnp.where(jnp.isnan(a), jnp.nan, b)


def as_computed(x: Array, compute_dtype: str | None) -> Array:
    """x as float32, holding the values of x cast to `compute_dtype` (as mergekit casts its
    inputs): no rounding where x is stored in that dtype already (the streamed merge's
    inputs usually are), where it would cost a pass of integer operations for nothing."""
    same = compute_dtype is not None and x.dtype == jnp.dtype(compute_dtype)
    return x.astype(jnp.float32) if same else rounding(compute_dtype)(x.astype(jnp.float32))


def task_vectors(base: Array, sources: Array, compute_dtype: str | None = None) -> Array:
    """sources [K, *S] minus base [*S] in float32, as mergekit computes them in
    `compute_dtype` (the inputs cast to it, the difference rounded to it)."""
    return rounding(compute_dtype)(as_computed(sources, compute_dtype) - as_computed(base, compute_dtype))


def exact_counts(method: MergeMethod, params: dict, size: int) -> dict:
    """How many entries of a tensor of `size` entries each source's counting parameters
    (`method.counts`: density, gamma) select, as mergekit counts them: int(value * size) in
    Python floats, from the recipe's own values (float64 `params`). Float32 math misses by
    one near whole numbers (0.7 * 90 is 62.99999999999999 in Python, 63 in float32) and by
    more past 2**24 entries. {"density_count": [K] int32, ...}, for the sparsifiers to use."""
    return {f"{name}_count": np.asarray([int(float(v) * size) for v in np.ravel(params[name])], np.int32)
            for name in method.counts if name in params}


def _count(value: Array, n: int, exact: Array | None) -> Array:
    """int(value * n): the exact count if given (`exact_counts`), else from float32 math."""
    return jnp.floor(value * n).astype(jnp.int32) if exact is None else exact.astype(jnp.int32)


# --------------------------------------------------------------------------- sparsifiers
# Each takes task vectors d [K, *S] (one row per source) and returns the kept (and rescaled) ones.


def _rescale(d: Array, kept: Array, density: Array, mode: str | None, abs_sum: Array | None = None,
             rnd: Callable[[Array], Array] = rounding(None)) -> Array:
    """One source's kept entries rescaled. abs_sum: sum |d|, if prepared (one reduction pass
    less per candidate). rnd: the dtype mergekit rescales in (its sums rounded once)."""
    if mode is None:
        return kept
    if mode == "density":
        return rnd(_divide(kept, density))
    if mode == "l1":
        before = rnd(jnp.sum(jnp.abs(d))) if abs_sum is None else abs_sum
        after = rnd(jnp.sum(jnp.abs(kept)))
        eps = rnd(jnp.float32(_EPS))
        ok = (before >= eps) & (after >= eps)
        return jnp.where(ok, rnd(kept * rnd(before / jnp.where(ok, after, 1.0))), kept)
    raise ValueError(f"unknown rescale mode {mode!r} (use None, 'l1' or 'density')")


def _sort_keys(magnitudes: Array, descending: bool) -> Array:
    """Non-negative float32 values as int32 keys whose descending order is the values' own
    order, descending or (descending=False) ascending: a float's bit pattern orders like the
    float. NaN counts as +inf, -0 as +0."""
    bits = jnp.clip(jax.lax.bitcast_convert_type(magnitudes, jnp.int32), 0, _INF_BITS)
    return bits if descending else _INF_BITS - bits


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
    found = _kth_largest_rows(magnitudes.astype(jnp.float32).reshape(1, -1), k.astype(jnp.int32).reshape(1))[0][0]
    return jax.lax.bitcast_convert_type(found, jnp.float32)


_INF_BITS = 0x7F800000  # +inf's bit pattern as int32: the largest non-NaN float
_CHUNK = 1 << 18  # elements per histogram step: its digits and updates stay in cache
_MAX_ROWS = 64  # rows counted at once under vmap (their histograms take 256 KiB each)


@jax.custom_batching.custom_vmap
def _kth_largest_rows(x: Array, k: Array) -> tuple[Array, Array, Array]:
    """kth_largest of each row of x [R, N] (float32, or int32 keys in [0, +inf's pattern]),
    k [R] (int32), as its bit pattern (int32); also, for 1 <= k <= N, the
    answer's rank among the row's elements equal to it (1-based: k minus the count of larger
    ones) and their count. Pass 1 counts every element's top 16 bits in a 65,536-bin
    histogram: summed from the top, it gives the answer's top 16 bits (the largest digit whose
    count from the top reaches k). Pass 2 counts the low 16 bits of the elements whose top
    bits are those, for the answer's low 16 bits. Each pass is one scatter-add per chunk for
    all rows, into one flat histogram (see the vmap rule below)."""
    rows, n = x.shape
    step = max(1, min(n, _CHUNK // rows))
    offsets = jnp.arange(rows, dtype=jnp.int32)[:, None] << 16

    def histogram(digit):  # [rows, 2**16] counts of digit(bits); a digit of 2**16 is not counted
        def add(i, counts):
            start = jnp.minimum(i * step, n - step)  # the last step ends at n, overlapping the one before
            bits = jax.lax.dynamic_slice_in_dim(x, start, step, axis=1)
            bits = bits if bits.dtype == jnp.int32 else jax.lax.bitcast_convert_type(bits, jnp.int32)
            bits = jnp.clip(bits, 0, _INF_BITS)  # monotone: the k-th largest of these is the answer, clipped
            fresh = jnp.arange(step) >= i * step - start  # not in the overlap, counted by the step before
            d = jnp.where(fresh, digit(bits), 1 << 16)
            return counts.at[jnp.where(d < 1 << 16, d + offsets, rows << 16)].add(1, mode="drop")  # row r at r << 16

        counts = jax.lax.fori_loop(0, -(-n // step), add, jnp.zeros(rows << 16, jnp.int32))
        return counts.reshape(rows, 1 << 16)

    def radix_pass(i, state):  # a loop, not two copies: compiles faster
        prefix, rank, _ = state  # [rows]: the answer's bits found so far, its rank among the elements sharing them

        def digits(bits):  # pass 0: the top 16 bits; pass 1: the low 16 bits where the top ones are the prefix
            matches = (i == 0) | (bits >> 16 == prefix[:, None])
            return jnp.where(matches, (bits >> (16 - 16 * i)) & 0xFFFF, 1 << 16)

        digit, rank, count = jax.vmap(_radix_digit)(histogram(digits), rank)
        return (prefix << 16) | digit, rank, count

    state = (jnp.zeros(rows, jnp.int32), jnp.clip(k, 1, n).astype(jnp.int32), jnp.zeros(rows, jnp.int32))
    found, rank, count = jax.lax.fori_loop(0, 2, radix_pass, state) if n else state
    found = jnp.where(k < 1, _INF_BITS, jnp.where(k > n, 0, found))
    return found.astype(jnp.int32), rank, count


@_kth_largest_rows.def_vmap
def _kth_largest_rows_vmap(axis_size: int, in_batched: list[bool], x: Array, k: Array):
    """vmap folds the mapped axis into the rows: XLA-CPU runs a batched scatter (vmap's own
    rule) at about half the speed of a flat one. One tensor with many k, or too many rows:
    one after another."""
    x_batched, k_batched = in_batched
    k = k if k_batched else jnp.broadcast_to(k, (axis_size,) + k.shape)
    if x_batched and axis_size * x.shape[1] <= _MAX_ROWS:
        found = _kth_largest_rows(x.reshape(-1, x.shape[-1]), k.reshape(-1))
        return tuple(part.reshape(k.shape) for part in found), (True, True, True)
    if x_batched:
        return jax.lax.map(lambda xk: _kth_largest_rows(*xk), (x, k)), (True, True, True)
    return jax.lax.map(lambda one: _kth_largest_rows(x, one), k), (True, True, True)


def _radix_digit(counts: Array, rank: Array) -> tuple[Array, Array, Array]:
    """From a histogram of 16-bit digits: the digit d of the rank-th largest element
    (1 <= rank <= total), that element's rank among those with digit d, and their count.
    Searched as two 8-bit digits, the cumulative counts of 256 bins at a time being cheaper
    than of 65,536."""
    def select(counts, rank):  # counts [256]
        upper = jnp.arange(256)[None, :] >= jnp.arange(256)[:, None]  # (a cumsum compiles slower)
        at_least = jnp.sum(jnp.where(upper, counts, 0), axis=1)  # at_least[d] = count(digit >= d)
        d = jnp.sum(at_least >= rank, dtype=jnp.int32) - 1
        return d, rank - (at_least[d] - counts[d])

    rows = counts.reshape(256, 256)
    high, rank = select(jnp.sum(rows, axis=1), rank)
    low, rank = select(rows[high], rank)
    return high * 256 + low, rank, rows[high, low]


# --------------------------------------------------------------------------- selection by rank
# TIES keeps the k largest |d| of a tensor, breadcrumbs the entries between two ranks: the
# entries a sort of |d| puts at positions [lo, hi), exactly as many as mergekit keeps. Where
# a run of equal values crosses lo or hi, which of them are kept depends on the sort.
# Neither rule sorts: the values at lo and hi come from radix passes (`_kth_largest_rows`),
# in the search, its export and the streamed merge alike (so they agree by construction).
# "index" keeps the tied ones in flat order (a stable sort's), cheaply: the search's rule and
# `jaxmerge merge`'s default. "torch" keeps those
# torch's CPU sort keeps, i.e. mergekit 0.1.5 on a CPU: torch 2.x sorts float32 with
# libstdc++'s std::sort (introsort, not stable), whose choice among ties depends on every
# element; `_introsort_window` replays it on the host for the tensors whose kept run of ties
# is cut (common in half precision, rare in float32), at about 70 ns per entry. (mergekit on
# a GPU, or a torch built against another C++ library, breaks ties otherwise again.)


def _window_mask(magnitudes: Array, lo: Array | None, hi: Array, *, descending: bool, ties: str,
                 index_order: tuple[int, int] | None = None) -> Array:
    """Which entries of each row of `magnitudes` [R, N] (non-negative float32) a sort,
    descending or ascending, puts at positions [lo, hi) ([R] int32; lo None: 0), ties broken
    by the rule `ties`, found without sorting: the keys at lo and hi by radix passes, the
    place of the last kept one of a tied run by counting (`_nth_equal`). index_order:
    `Options.index_order`."""
    keys = _sort_keys(magnitudes, descending)  # the sort's order is the keys' descending order
    rows, n = keys.shape
    if index_order is None:
        iota = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 1)
    else:  # each entry's place counting column by column: from 2-D iotas (a division per entry costs 2x)
        height, width = index_order
        shape = (rows, height, width)
        iota = (jax.lax.broadcasted_iota(jnp.int32, shape, 2) * height
                + jax.lax.broadcasted_iota(jnp.int32, shape, 1)).reshape(keys.shape)
    empty = (hi <= (0 if lo is None else lo))[:, None]
    last = jnp.clip(hi - 1, 0, n - 1)
    first = None if lo is None else jnp.clip(lo, 0, n - 1)

    zero = 0 if descending else _INF_BITS  # a magnitude of 0: which of those are kept changes nothing
    if ties == "index":
        def at(position, upper):  # (key, flat index) of the entry at that position
            key, rank, count = _select_keys(keys, position + 1)
            cut = ((rank < count) if upper else (rank > 1)) & (key != zero)  # else: all of its run, any index
            # always counted: a conditional would copy the keys (the tensor's size in memory again)
            index = _nth_equal(keys, key, rank, index_order)
            return key, jnp.where(cut, index, n if upper else 0)

        key, index = at(last, True)
        kept = (keys > key[:, None]) | ((keys == key[:, None]) & (iota <= index[:, None]))
        if lo is not None:
            key, index = at(first, False)
            kept &= (keys < key[:, None]) | ((keys == key[:, None]) & (iota >= index[:, None]))
        return kept & ~empty
    if ties != "torch":
        raise ValueError(f"unknown tie rule {ties!r} (use one of {', '.join(TIE_RULES)})")
    key, rank, count = _select_keys(keys, last + 1)
    kept = keys >= key[:, None]
    cut = (rank < count) & (key != zero)
    if lo is not None:
        low, low_rank, _ = _select_keys(keys, first + 1)
        kept &= keys <= low[:, None]
        cut |= (low_rank > 1) & (low != zero)
    kept &= ~empty
    cut &= ~empty[:, 0]
    start = jnp.zeros(rows, jnp.int32) if lo is None else lo
    return jax.lax.cond(jnp.any(cut), lambda: jnp.where(cut[:, None], _torch_window(
        magnitudes, start, hi, cut, descending), kept), lambda: kept)


def _nth_equal(keys: Array, key: Array, nth: Array, index_order: tuple[int, int] | None = None) -> Array:
    """The place of each row's nth (1-based) entry equal to its `key` in keys [R, N],
    counting in flat order (blocks of 4,096) or (index_order (rows, cols)) column by column of
    a [rows, cols] row: counts per block or column (one reduction pass), then a count within
    the block that holds it (gathered from `keys`, already in memory: not a second pass)."""
    count, n = keys.shape
    if index_order is None:
        block = min(4096, n)
        padded = jnp.pad(keys, ((0, 0), (0, -n % block)), constant_values=-1) if n % block else keys
        blocks = padded.reshape(count, -1, block)  # [R, blocks, block]
        totals = jnp.sum(blocks == key[:, None, None], axis=2, dtype=jnp.int32)
    else:
        blocks = keys.reshape(count, *index_order)  # [R, rows, cols]: a block is a column
        block = index_order[0]
        totals = jnp.sum(blocks == key[:, None, None], axis=1, dtype=jnp.int32)
    before = jnp.cumsum(totals, axis=1)  # [R, blocks]: up to each block's end
    which = jnp.minimum(jnp.sum(before < nth[:, None], axis=1, dtype=jnp.int32), before.shape[1] - 1)
    earlier = jnp.where(which > 0, jnp.take_along_axis(before, jnp.maximum(which - 1, 0)[:, None], axis=1)[:, 0], 0)
    if index_order is None:
        inside = jnp.take_along_axis(blocks, which[:, None, None], axis=1)[:, 0]  # [R, block]
    else:
        inside = jnp.take_along_axis(blocks, which[:, None, None], axis=2)[:, :, 0]
    ahead = jnp.cumsum(inside == key[:, None], axis=1, dtype=jnp.int32)
    return which * block + jnp.sum(ahead < (nth - earlier)[:, None], axis=1, dtype=jnp.int32)


def _select_keys(keys: Array, k: Array) -> tuple[Array, Array, Array]:
    """The k-th largest int32 key of each row (keys in [0, +inf's pattern]), its rank among
    the keys equal to it and their count: `_kth_largest_rows` on the keys."""
    return _kth_largest_rows(keys, k)


def _torch_window(magnitudes: Array, lo: Array, hi: Array, run: Array, descending: bool) -> Array:
    """For the rows `run`: which entries torch's CPU sort puts at positions [lo, hi) (False
    elsewhere), replayed on the host (`_introsort_window`), rows in parallel threads."""
    def host(magnitudes, lo, hi, run):
        magnitudes = np.asarray(magnitudes, np.float32)
        kept = np.zeros(magnitudes.shape, bool)

        def one(r):  # torch's comparator as `<` on int32 keys: the bit patterns, reversed for descending
            bits = np.clip(magnitudes[r].view(np.int32), 0, _INF_BITS)
            keys = np.subtract(_INF_BITS, bits, out=bits) if descending else bits
            kept[r, _introsort_positions(keys, int(lo[r]), int(hi[r]))] = True

        todo = [r for r in range(len(run)) if run[r]]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            list(pool.map(one, todo))
        return kept

    return jax.pure_callback(host, jax.ShapeDtypeStruct(magnitudes.shape, jnp.bool_), magnitudes, lo, hi, run,
                             vmap_method="sequential")


_SORT_SMALL = 16  # libstdc++'s _S_threshold: ranges this small are left to the final insertion sort


def _introsort_window(keys: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The indices of the entries that libstdc++'s std::sort with `<` on `keys` (1-D float32,
    no NaN) puts at positions [lo, hi): its introsort replayed on the ranges that contain lo
    or hi (about 2N element visits, a quickselect's, instead of a sort's N log N). Partitions
    and their swaps are exactly std::sort's; a range of at most 16 ends up stably sorted (the
    final insertion sort); past the depth limit, a heap sort. torch's CPU sort is this, for
    its (value, index) pairs; tests check it against torch."""
    bits = (np.asarray(keys, np.float32) + np.float32(0)).view(np.int32)  # + 0: -0 sorts as +0
    return _introsort_positions(np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits), lo, hi)


def _introsort_positions(keys: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """`_introsort_window` on int32 keys that order like the floats. Each entry travels as one
    int64, its key above its index."""
    packed = keys.astype(np.int64)
    packed <<= 32
    packed |= np.arange(packed.size, dtype=np.int64)
    bounds = (lo, hi)

    def crossed(first, last):  # a bound strictly inside: the range's order matters
        return any(first < b < last for b in bounds)

    stack = [(0, packed.size, 2 * (packed.size.bit_length() - 1))]  # std::__lg(n) * 2
    while stack:
        first, last, depth = stack.pop()
        while last - first > _SORT_SMALL and crossed(first, last):
            if depth == 0:
                _heap_sort(packed, first, last)
                break
            depth -= 1
            cut = _partition(packed, first, last)
            stack.append((cut, last, depth))
            last = cut
        else:
            if crossed(first, last):
                packed[first:last] = packed[first:last][np.argsort(packed[first:last] >> 32, kind="stable")]
    return packed[lo:hi] & 0xFFFFFFFF


def _partition(packed: np.ndarray, first: int, last: int) -> int:
    """std::__unguarded_partition_pivot on packed[first:last] (keys in the high 32 bits): the
    median of the keys at first + 1, the middle and last - 1 moved to `first`, then Hoare's
    partition around it, vectorised: the left scan stops at the keys >= pivot, the right one
    (from the end) at those <= pivot, the i-th stops of each swap until they cross. Returns
    the cut."""
    x, y, z = first + 1, first + (last - first) // 2, last - 1
    kx, ky, kz = (int(packed[i]) >> 32 for i in (x, y, z))
    if kx < ky:
        median = y if ky < kz else (z if kx < kz else x)
    else:
        median = x if kx < kz else (z if ky < kz else y)
    packed[[first, median]] = packed[[median, first]]
    pivot = int(packed[first]) >> 32
    left = np.flatnonzero(packed[first + 1:last] >= pivot << 32) + (first + 1)
    right = np.flatnonzero(packed[first:last] < (pivot + 1) << 32) + first  # the right scan meets them last first
    low, high = 0, min(left.size, right.size)
    while low < high:  # the first swap whose stops have crossed
        middle = (low + high) // 2
        if left[middle] >= right[right.size - 1 - middle]:
            high = middle
        else:
            low = middle + 1
    swaps = low
    cut = min(left[swaps] if swaps < left.size else last, right[right.size - swaps] if swaps else last)
    if swaps:
        ls, rs = left[:swaps], right[right.size - swaps:][::-1]
        packed[ls], packed[rs] = packed[rs], packed[ls]
    return int(cut)


def _heap_sort(packed: np.ndarray, first: int, last: int) -> None:
    """std::__partial_sort(first, last, last): make_heap then sort_heap, with `<` on the keys
    (introsort's fallback past its depth limit; rare)."""
    items = packed[first:last].tolist()

    def less(u, v):
        return u >> 32 < v >> 32

    def adjust(hole, length, value):  # std::__adjust_heap, then std::__push_heap
        top, child = hole, hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if less(items[child], items[child - 1]):
                child -= 1
            items[hole], hole = items[child], child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            items[hole], hole = items[child - 1], child - 1
        parent = (hole - 1) // 2
        while hole > top and less(items[parent], value):
            items[hole], hole = items[parent], parent
            parent = (hole - 1) // 2
        items[hole] = value

    size = len(items)
    for parent in range((size - 2) // 2, -1, -1) if size >= 2 else ():
        adjust(parent, size, items[parent])
    for end in range(size - 1, 0, -1):
        value, items[end] = items[end], items[0]
        adjust(0, end, value)
    packed[first:last] = items


def _selection(mask: Array) -> Array:
    """A selection's mask, written out as bytes: XLA-CPU otherwise fuses the selection (keys,
    the tied run's cut) into every consumer of the kept entries and recomputes it per use. A
    byte per entry, where materialising the kept float32 entries cost 4 (TIES 1.4x faster in
    float32)."""
    return _materialized(mask.astype(jnp.uint8)).astype(bool)


def magnitude(d: Array, density: Array, *, count: Array | None = None, rescale: str | None = None,
              ties: str = "index", rnd: Callable[[Array], Array] = rounding(None),
              index_order: tuple[int, int] | None = None) -> Array:
    """TIES trimming of task vectors d [K, *S]: each keeps its k = max(1, int(density N))
    entries of largest |d| (ties: `_window_mask`), the others zeroed. count: `exact_counts`'
    int(density N); rnd: the dtype mergekit rescales in (the task vectors' own)."""
    rows = d.reshape(d.shape[0], -1)
    n = rows.shape[1]
    k = jnp.clip(_count(density, n, count), 1, n)
    mask = _selection(_window_mask(jnp.abs(rows), None, k, descending=True, ties=ties, index_order=index_order))
    kept = jax.vmap(lambda x, m, p: _rescale(x, x * m, p, rescale, rnd=rnd))(rows, mask.astype(jnp.float32), density)
    keep_all, keep_none = (density >= 1)[:, None], (density <= 0)[:, None]
    return jnp.where(keep_all, rows, jnp.where(keep_none, 0.0, kept)).reshape(d.shape)


def magnitude_outliers(d: Array, density: Array, gamma: Array, *,
                       counts: tuple[Array | None, Array | None] = (None, None), rescale: str | None = None,
                       ties: str = "index", rnd: Callable[[Array], Array] = rounding(None),
                       index_order: tuple[int, int] | None = None) -> Array:
    """Model breadcrumbs on task vectors d [K, *S]: in ascending order of |d|, keep the
    int(density N) entries that follow the smallest max(0, N - int(density N) - int(gamma N))
    (so the largest int(gamma N), the outliers, go where there is room). counts:
    `exact_counts`' (density, gamma) ones."""
    rows = d.reshape(d.shape[0], -1)
    n = rows.shape[1]
    keep, top = _count(density, n, counts[0]), _count(gamma, n, counts[1])
    bottom = jnp.maximum(0, n - keep - top)
    mask = _selection(_window_mask(jnp.abs(rows), bottom, bottom + keep, descending=False, ties=ties,
                                   index_order=index_order))
    kept = jax.vmap(lambda x, m, p: _rescale(x, x * m, p, rescale, rnd=rnd))(rows, mask.astype(jnp.float32), density)
    return jnp.where((density >= 1)[:, None], rows, kept).reshape(d.shape)


def abs_sums(base: Array, sources: Array, row_axis: int = -1, compute_dtype: str | None = None) -> Array:
    """sum |task vector| of each source: [K], what the L1 rescale of a random sparsifier
    divides by, computed once for a search (rounded as mergekit's, see `_work_dtype`)."""
    d = task_vectors(base, sources, compute_dtype)
    return rounding(_work_dtype(compute_dtype))(jnp.sum(jnp.abs(d).reshape(d.shape[0], -1), axis=-1))


def della_stats(base: Array, sources: Array, row_axis: int = -1,
                compute_dtype: str | None = None) -> tuple[Array, Array, Array]:
    """DELLA's rank of |d| within each row: [K, *S] integers (uint16 where a row has at most
    65,536 entries, else int32: a quarter or the same of the sources' float32 bytes); the
    factor that normalises them to [0, 1], 1 / (width - 1) in float32 (0 for rows of one
    entry), per source [K]; and `abs_sums` [K]. A row runs along `row_axis` of a tensor (the
    input axis of a linear layer: -1 for torch's [out, in] weight, -2 for a Flax [in, out]
    kernel); a vector is one row. One stable sort, its order inverted by a scatter (ties
    rank in flat order; mergekit's sort ranks them as it happens to, a random method's
    detail)."""
    d = jnp.abs(task_vectors(base, sources, compute_dtype))  # [K, *S]
    axis = -1 if base.ndim == 1 else (row_axis % base.ndim) + 1
    width = d.shape[axis]
    dtype = jnp.uint16 if width <= 1 << 16 else jnp.int32
    rows = jnp.moveaxis(d, axis, -1)  # sorted and scattered along the last axis (XLA-CPU sorts others slower)
    order = jnp.argsort(rows, axis=-1, stable=True)
    places = jax.lax.broadcasted_iota(dtype, rows.shape, rows.ndim - 1)
    ranks = jnp.moveaxis(jnp.put_along_axis(jnp.zeros(rows.shape, dtype), order, places, axis=-1, inplace=False),
                         -1, axis)
    # a multiplication, as the jitted division by a constant always was (XLA rewrites it so)
    scale = np.float32(1) / np.float32(width - 1) if width > 1 else np.float32(0)
    sums = rounding(_work_dtype(compute_dtype))(jnp.sum(d.reshape(d.shape[0], -1), axis=-1))
    return ranks, jnp.full(d.shape[:1], scale), sums


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


def bernoulli(d: Array, density: Array, key: Array, rescale: str | None, abs_sum: Array | None = None,
              rnd: Callable[[Array], Array] = rounding(None)) -> Array:
    """DARE: keep each entry of one task vector with probability density, then rescale (in
    the dtype `rnd` rounds to: `_work_dtype`)."""
    keep = hashed_uniform(key, d.shape) < jnp.clip(density, 0.0, 1.0)
    return jnp.where(density >= 1, d, _rescale(d, jnp.where(keep, d, 0.0), density, rescale, abs_sum, rnd))


def della_magprune(d: Array, rank: Array, density: Array, epsilon: Array, key: Array,
                   rescale: str | None, abs_sum: Array | None = None,
                   rnd: Callable[[Array], Array] = rounding(None)) -> Array:
    """DELLA: keep probability (density - eps) + 2 eps * normalised rank of |d| in its row."""
    probability = (density - epsilon) + rank * 2 * epsilon
    keep = hashed_uniform(key, d.shape) < jnp.clip(probability, 0.0, 1.0)
    return jnp.where(density >= 1, d, _rescale(d, jnp.where(keep, d, 0.0), density, rescale, abs_sum, rnd))


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
    sign consensus, sum, optional normalisation by the (kept) weights, scale by lambda. In
    `options.compute_dtype` as mergekit computes in its `dtype:`: the task vectors, the
    weights (a tensor of that dtype), each product, sum and quotient rounded to it."""

    def merge(base, sources, params, stats, key, options: Options) -> Array:
        rnd, work = rounding(options.compute_dtype), rounding(_work_dtype(options.compute_dtype))
        x0 = as_computed(base, options.compute_dtype)
        deltas = task_vectors(base, sources, options.compute_dtype)  # [K, *S]
        K = deltas.shape[0]
        density = params.get("density", jnp.ones((K,)))
        if sparsifier == "magnitude":
            deltas = magnitude(deltas, density, count=params.get("density_count"), rescale=options.rescale,
                               ties=options.ties, rnd=rnd, index_order=options.index_order)
        elif sparsifier == "magnitude_outliers":
            deltas = magnitude_outliers(deltas, density, params["gamma"],
                                        counts=(params.get("density_count"), params.get("gamma_count")),
                                        rescale=options.rescale, ties=options.ties, rnd=rnd,
                                        index_order=options.index_order)
        elif sparsifier == "random":
            keys = _per_source_keys(key, K)
            deltas = rnd(jax.vmap(lambda d, p, k, s: bernoulli(d, p, k, options.rescale, s, work))(
                deltas, density, keys, stats))
        elif sparsifier == "della":
            keys = _per_source_keys(key, K)
            ranks, scales, sums = stats  # `della_stats`

            def prune(d, r, scale, p, e, k, s):
                return della_magprune(d, r.astype(jnp.float32) * scale, p, e, k, options.rescale, s, work)
            deltas = rnd(jax.vmap(prune)(deltas, ranks, scales, density, params["epsilon"], keys, sums))

        if sparsifier and options.compute_dtype not in (None, "float32"):  # held in the dtype: exact, half the bytes
            deltas = _materialized(deltas.astype(options.compute_dtype)).astype(jnp.float32)
        weights = rnd(params["weight"].astype(jnp.float32)).reshape((K,) + (1,) * (deltas.ndim - 1))
        # Rounded products, as mergekit sums them (an unrounded one flips the sign election
        # where the weighted task vectors cancel exactly).
        deltas = rnd(_product(deltas, weights))
        if options.consensus:
            majority = jnp.where(rnd(_sum_sources(deltas)) >= 0, 1.0, -1.0)
            agree = (jnp.sign(deltas) == majority).astype(jnp.float32)  # pruned entries: sign 0
            mixed = rnd(_sum_sources(deltas * agree))
            divisor = rnd(_sum_sources(weights * agree))
            divisor = jnp.where(divisor == 0, 1.0, divisor)
        else:
            mixed = rnd(_sum_sources(deltas))
            divisor = rnd(_sum_sources(weights))
            divisor = jnp.where(jnp.abs(divisor) < rnd(jnp.float32(1e-8)), 1.0, divisor)
        if options.normalize:
            mixed = rnd(_divide(mixed, divisor))
        scale = params.get("lambda", jnp.float32(1.0))
        mixed = jnp.where(scale == 1, mixed, rnd(_product(mixed, scale)))  # mergekit skips lambda == 1
        return rnd(x0 + mixed).astype(base.dtype)

    return merge


def _weighted_sum(weights: Array, xs: Array) -> Array:
    """sum_i w_i x_i over xs [K, *S] (float32), in torch's order and rounding: mergekit adds
    each term with addcmul_, one fused multiply-add per term on CPU. XLA's dot does that, in
    that order, except for a lone last element of a row (a tensor of 8n + 1 entries): padded."""
    flat = xs.reshape(xs.shape[0], -1)
    size = flat.shape[1]
    padded = jnp.pad(flat, ((0, 0), (0, -size % 8))) if size % 8 else flat
    return jnp.dot(weights, padded, precision=jax.lax.Precision.HIGHEST)[:size].reshape(xs.shape[1:])


def linear(base, sources, params, stats, key, options: Options) -> Array:
    """sum_i w_i x_i over all inputs (no base: a base model is one more input), divided
    by sum_i w_i if normalize. In float32 whatever the compute dtype, as mergekit's; the
    inputs and the result in it."""
    rnd = rounding(options.compute_dtype)
    weights = params["weight"].astype(jnp.float32)
    out = _weighted_sum(weights, as_computed(sources, options.compute_dtype))
    if options.normalize:
        out = _divide(out, _sum_sources(weights))
    return rnd(out).astype(sources.dtype)


def slerp(base, sources, params, stats, key, options: Options) -> Array:
    """Spherical interpolation from the base (t = 0) to the one other model (t = 1), over
    the whole flattened tensor; nearly parallel tensors interpolate linearly. In float32
    whatever the compute dtype, as mergekit's; the inputs and the result in it. (Norms and
    the dot product sum in XLA's order, not torch's: the coefficients can differ in their
    last bit, the results then by one ulp at some entries.)"""
    rnd = rounding(options.compute_dtype)
    t = params["t"].astype(jnp.float32)
    v0, v1 = as_computed(base, options.compute_dtype).ravel(), as_computed(sources[0], options.compute_dtype).ravel()
    n0, n1 = jnp.linalg.norm(v0), jnp.linalg.norm(v1)
    n0, n1 = jnp.where(n0 > 1e-8, n0, 1.0), jnp.where(n1 > 1e-8, n1, 1.0)
    dot = jnp.clip(jnp.dot(_divide(v0, n0), _divide(v1, n1)), -1.0, 1.0)
    parallel = jnp.abs(dot) > 0.9995
    theta = jnp.arccos(jnp.where(parallel, 0.0, dot))
    sin_theta = jnp.where(parallel, 1.0, jnp.sin(theta))
    c0 = jnp.where(parallel, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    c1 = jnp.where(parallel, t, jnp.sin(t * theta) / sin_theta)
    return rnd(_product(v0, c0) + _product(v1, c1)).reshape(base.shape).astype(base.dtype)


def model_stock_stats(base: Array, sources: Array, row_axis: int = -1,
                      compute_dtype: str | None = None) -> tuple[Array, Array]:
    """Model Stock's cos, the mean over pairs of sources of their task vectors' cosine: of the
    whole tensors [] and (filter_wise) of each row along `row_axis` (torch's last axis, -2 for
    a Flax kernel [in, out]; a vector is one row), that axis kept. Rows need the tensor's
    layout, which only `prepare` is given. In `compute_dtype` as mergekit computes them there:
    norms, products, dot products, quotients and the mean rounded to it (sums accumulated in
    float32, in XLA's order: a last float32 bit can differ from torch's)."""
    rnd = rounding(compute_dtype)
    offsets = task_vectors(base, sources, compute_dtype)  # [K, *S]
    K = offsets.shape[0]

    def cosine(a, b, axis):  # torch: (a * b).sum(axis) / (|a| |b|).clamp(min=1e-6), then clamp(-1, 1)
        norms = [rnd(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))) for x in (a, b)]
        dot = rnd(jnp.sum(rnd(_product(a, b)), axis=axis, keepdims=True))
        return jnp.clip(rnd(_divide(dot, jnp.maximum(rnd(norms[0] * norms[1]), rnd(jnp.float32(1e-6))))), -1.0, 1.0)

    def mean(values):  # torch's mean of the pairs: a float32 sum, divided, rounded once
        return rnd(_divide(_sum_sources(jnp.stack(values)), jnp.float32(len(values))))

    pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
    flat = offsets.reshape(K, -1)
    whole = mean([cosine(flat[i], flat[j], -1) for i, j in pairs]).reshape(())
    if base.ndim == 0:
        return whole, whole
    axis = row_axis % base.ndim
    return whole, mean([cosine(offsets[i], offsets[j], axis) for i, j in pairs])


def model_stock(base, sources, params, stats, key, options: Options) -> Array:
    """Model Stock: t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task
    vectors, of whole tensors or, with filter_wise, of each row (`model_stock_stats`);
    out = t mean(x_i) + (1 - t) x0 (the base where the denominator vanishes). In the compute
    dtype as mergekit computes it there: every step rounded to it."""
    rnd = rounding(options.compute_dtype)
    if stats is None:
        stats = model_stock_stats(base, sources, compute_dtype=options.compute_dtype)
    whole, rows = stats
    cos_theta = jnp.where(params["filter_wise"] != 0, rows, whole)
    x0 = as_computed(base, options.compute_dtype)
    xs = as_computed(sources, options.compute_dtype)
    K = xs.shape[0]
    denominator = rnd(1 + rnd(_product(cos_theta, K - 1)))
    singular = jnp.abs(denominator) < rnd(jnp.float32(1e-6))
    t = jnp.where(singular, 0.0, rnd(_divide(rnd(K * cos_theta), jnp.where(singular, 1.0, denominator))))
    total = xs[0]
    for x in xs[1:]:  # mergekit's sum(ws): each partial sum rounded
        total = rnd(total + x)
    average = rnd(_divide(total, jnp.float32(K)))
    out = rnd(rnd(_product(average, t)) + rnd(_product(x0, rnd(1 - t))))
    return out.astype(base.dtype)


def passthrough(base, sources, params, stats, key, options: Options) -> Array:
    """The one input, times an optional scale (rounded to the compute dtype)."""
    rnd = rounding(options.compute_dtype)
    return rnd(_product(rnd(sources[0].astype(jnp.float32)), params["scale"][0])).astype(sources.dtype)


# --------------------------------------------------------------------------- the built-in methods

_WEIGHT = Parameter("weight", per_source=True)
_DENSITY = Parameter("density", per_source=True, default=1.0)
_LAMBDA = Parameter("lambda", per_source=False, default=1.0)


def _task_vector_method(name, sparsifier, *, consensus, normalize, rescale, extra=()):
    # magnitude selections prepare nothing: radix passes per candidate, as the streamed merge's
    prepare = {"random": abs_sums, "della": della_stats}.get(sparsifier)
    parameters = (_WEIGHT, _LAMBDA) + ((_DENSITY,) if sparsifier else ()) + tuple(extra)
    counts = {"magnitude": ("density",), "magnitude_outliers": ("density", "gamma")}.get(sparsifier, ())
    return MergeMethod(
        name=name, parameters=parameters, merge=_task_arithmetic_family(sparsifier), base="required",
        default_options=Options(normalize=normalize, rescale="l1" if rescale else None, consensus=consensus),
        random=sparsifier in ("random", "della"), prepare=prepare, stats_required=sparsifier == "della",
        counts=counts,
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
    MergeMethod("model_stock", (Parameter("filter_wise", per_source=False, default=0.0),), model_stock,
                base="required", min_sources=2, prepare=model_stock_stats, stats_required=True),
    MergeMethod("passthrough", (Parameter("scale", per_source=True, default=1.0),), passthrough,
                base="none", max_sources=1),
]:
    register_method(_method)


def merge_tensor(method: MergeMethod | str, base: Array | None, sources: Array, params: dict,
                 key: Array | None = None, options: Options | None = None, stats=None) -> Array:
    """Merges one tensor. sources [K, *S]; params per `method.parameters` (defaults filled
    in); stats from `prepare_stats(method, base, sources)` when the caller reuses them."""
    method = get_method(method) if isinstance(method, str) else method
    options = method.default_options if options is None else options
    if stats is None and method.stats_required:
        stats = prepare_stats(method, base, sources, options=options)
    if method.random and key is None:
        raise ValueError(f"{method.name} is random: pass a PRNG key")
    return method.merge(base, sources, fill_defaults(method, params, sources.shape[0]), stats, key, options)


def prepare_stats(method: MergeMethod, base: Array | None, sources: Array, *, row_axis: int = -1,
                  options: Options | None = None):
    """`method.prepare(base, sources, row_axis=)`, given the options' compute dtype if it
    takes one (`compute_dtype=`: the statistics of the task vectors as that dtype rounds them)."""
    compute_dtype = None if options is None else options.compute_dtype
    takes_dtype = "compute_dtype" in inspect.signature(method.prepare).parameters
    extra = {"compute_dtype": compute_dtype} if compute_dtype is not None and takes_dtype else {}
    return method.prepare(base, sources, row_axis=row_axis, **extra)


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
