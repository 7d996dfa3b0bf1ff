"""Merging whole models: a method mapped over every parameter, layer-wise.

Models are handled as flat dicts from a dotted parameter path to an array
(`"layers.mlp.up_proj.kernel"`), the same paths as `nnx.split`'s state. Stacked
parameters (paths under `layers.`) carry a leading layer axis [L, ...]; a merge
parameter may then be given per layer, and the method runs per layer under `jax.vmap`.
Their sources stack layer-major, [L, K, *S]: each layer's K inputs lie together, so the
per-layer merge reads them without a transpose (which kept XLA from fusing TIES into one
pass: 5x slower on CPU).

    base     = flat_params(base_model)                      # {path: [*S]}
    sources  = stack_sources(base, [flat_params(m) for m in models])  # {path: [K, *S] or [L, K, *S]}
    stats    = prepare(method, base, sources)               # once, shared by all candidates
    merged   = merge_params(method, base, sources, params, stats=stats, key=key)  # jit/vmap me
    merged   = merge_plan(plan, base, sources, stats=stats, key=key)  # the same, from a `MergePlan`
    model    = with_params(base_model, merged)

`params` maps each path to {parameter name: array}: per-source parameters [K] or, for a
stacked path, [K, L]; merge-wide ones [] or [L]. `broadcast_params` builds it from one
value (or one value per source) for every path.

Merges compute in float32 and keep, among entries tied at TIES' or breadcrumbs' cut, the
first in flat order (`Options`' defaults, the search's); options with a compute dtype round
every step as mergekit computes in its `dtype:` (`prepare` then ranks the rounded task
vectors: pass it the same options).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.merge.methods import MergeMethod, Options, fill_defaults, get_method, prepare_stats
from jaxmerge.merge.plan import MergePlan
from jaxmerge.models.interfaces import language_model

Array = jax.Array
Flat = dict[str, Array]
# Parameters whose leading rows (or, for an untied output kernel [D, V], columns) are tokens.
VOCAB_AXES = {"embed_tokens.weight": 0, "lm_head.kernel": 1}


def flat_params(model: nnx.Module) -> Flat:
    """{dotted path: array} of a model's parameters."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(str(p) for p in path): v[...] for path, v in flat}


def with_params(model: nnx.Module, flat: Mapping[str, Array]) -> nnx.Module:
    """A new model with `model`'s structure (and origin) and the given parameters."""
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    for path, value in flat.items():
        node = pure
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        if node[leaf].shape != value.shape:
            raise ValueError(f"{path}: merged shape {value.shape} != model shape {node[leaf].shape}")
        node[leaf] = value
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def is_stacked(path: str) -> bool:
    return path.startswith("layers.") or ".layers." in path


def _align_vocab(path: str, base: Array, source: Array, index: int) -> Array:
    """A source's embedding rows matched to the base's count: extra rows dropped, missing
    rows taken from the base (a zero task vector)."""
    if source.shape == base.shape:
        return source
    axis = VOCAB_AXES.get(path)
    other = [d for i, d in enumerate(source.shape) if i != axis] if axis is not None else None
    if axis is None or other != [d for i, d in enumerate(base.shape) if i != axis]:
        raise ValueError(f"{path}: source {index} has shape {tuple(source.shape)}, "
                         f"the base {tuple(base.shape)}")
    rows = min(source.shape[axis], base.shape[axis])
    common = jax.lax.slice_in_dim(source, 0, rows, axis=axis)
    rest = jax.lax.slice_in_dim(base, rows, base.shape[axis], axis=axis)
    return jnp.concatenate([common, rest.astype(source.dtype)], axis=axis)


def align_source(base: Flat, source: Flat, index: int) -> Flat:
    """Source `index`'s parameters matched to the base's paths, vocabularies aligned."""
    missing = [p for p in base if p not in source]
    if missing:
        raise ValueError(f"{missing[0]}: missing from source {index}")
    return {p: _align_vocab(p, base[p], source[p], index) for p in base}


def stack_sources(base: Flat, sources: list[Flat]) -> Flat:
    """{path: [K, *S]}, stacked layers [L, K, *S]: the sources stacked once, vocabularies
    aligned to the base."""
    aligned = [align_source(base, s, i) for i, s in enumerate(sources)]
    return {p: jnp.stack([a[p] for a in aligned], axis=1 if is_stacked(p) else 0) for p in base}


def _row_axis(path: str) -> int:
    return -2 if path.endswith("kernel") else -1


def prepare(method: MergeMethod | str, base: Flat, sources: Flat, *, options: Options | None = None) -> dict:
    """What the method precomputes from the sources alone ({} if nothing), per path; for the
    merges' `options` (their compute dtype, if any, rounds the task vectors it ranks)."""
    method = get_method(method) if isinstance(method, str) else method
    if method.prepare is None:
        return {}
    out = {}
    for path, b in base.items():
        fn = functools.partial(prepare_stats, method, row_axis=_row_axis(path), options=options)
        fn = jax.vmap(fn) if is_stacked(path) else fn
        out[path] = jax.jit(fn)(b, sources[path])
    return out


def broadcast_params(method: MergeMethod | str, base: Flat, num_sources: int, **values) -> dict:
    """The same parameter values for every path: scalars, or one value per source."""
    method = get_method(method) if isinstance(method, str) else method
    filled = fill_defaults(method, values, num_sources)
    return {path: dict(filled) for path in base}


def select_sources(method: MergeMethod | str, params: dict, slots: Array) -> dict:
    """`params` for the sources held in `slots` [R] (pool indices; -1: an empty slot): each
    per-source parameter [K, ...] becomes [R, ...], an empty slot's weight 0 (so that its
    arrays, whatever they hold, add nothing). For merging from a few sources of a pool
    (`jaxmerge.search.pool`)."""
    method = get_method(method) if isinstance(method, str) else method
    per_source = {p.name for p in method.parameters if p.per_source}
    index, filled = jnp.maximum(slots, 0), slots >= 0  # [R]

    def pick(name, value):
        if name not in per_source:
            return value
        picked = value[index]
        if name != "weight":
            return picked
        return jnp.where(filled.reshape((-1,) + (1,) * (picked.ndim - 1)), picked, 0.0)

    return {path: {name: pick(name, v) for name, v in p.items()} for path, p in params.items()}


_TEMPORARY_BYTES = 1 << 30  # float32 temporaries one step of a stacked merge may hold


def layers_per_step(num_layers: int, layer_temporaries: int) -> int:
    """How many stacked layers merge at once: all of them if their float32 temporaries fit
    `_TEMPORARY_BYTES` (one fused pass: XLA-CPU runs a loop over layers ~20x slower than the
    same work as one tensor), else the largest divisor of num_layers that fits (at least 1)."""
    fits = max(1, _TEMPORARY_BYTES // max(1, layer_temporaries))
    return max(d for d in range(1, num_layers + 1) if num_layers % d == 0 and d <= fits)


def merge_leaf(method: MergeMethod, stacked: bool, base, sources, params, stats, key, options,
               layer_by_layer: bool = False):
    """One parameter: base [*S] (or [L, *S] if stacked), sources [K, *S] ([L, K, *S]).
    Stacked layers merge as a batch of per-layer merges (each layer its own thresholds,
    parameters and key), in steps of `layers_per_step` layers: a merge's temporaries
    (deltas, masks, votes in float32) then take a bounded amount of memory, not the model's.
    layer_by_layer: steps of one layer (a layer's sums reduced as a lone tensor's are)."""
    if not stacked:
        return method.merge(base, sources, params, stats, key, options)
    num_layers, num_sources = sources.shape[:2]
    per_source = {p.name for p in method.parameters if p.per_source}

    def layer_axis(name, value):  # which axis of a parameter runs over layers, if any
        layered = value.ndim == (2 if name in per_source else 1)
        return (1 if name in per_source else 0) if layered else None

    param_axes = {name: layer_axis(name, v) for name, v in params.items()}
    keys = None if key is None else jax.random.split(key, num_layers)
    stats_axes = None if stats is None else 0

    def block(base, sources, params, stats, keys):  # base [n, *S], sources [n, K, *S]
        def one(b, s, p, st, k):
            return method.merge(b, s, p, st, k, options)
        return jax.vmap(one, in_axes=(0, 0, param_axes, stats_axes, None if keys is None else 0))(
            base, sources, params, stats, keys)

    step = 1 if layer_by_layer else layers_per_step(num_layers, 4 * num_sources * base[0].size)
    if step == num_layers:
        return block(base, sources, params, stats, keys)

    def take(x, axis, i):
        return x if axis is None else jax.lax.dynamic_slice_in_dim(x, i * step, step, axis)

    def one_step(i):
        return block(take(base, 0, i), take(sources, 0, i),
                     {name: take(v, param_axes[name], i) for name, v in params.items()},
                     None if stats is None else jax.tree.map(lambda x: take(x, 0, i), stats),
                     None if keys is None else take(keys, 0, i))
    merged = jax.lax.map(one_step, jnp.arange(num_layers // step))  # [L / step, step, *S]
    return merged.reshape(base.shape)


def _leaf_options(method: MergeMethod, path: str, base: Array, options: Options) -> Options:
    """A kernel's entries count column by column where a method selects by rank (ties kept in
    torch's order, `Options.index_order`), so that `jaxmerge merge` of an exported recipe
    keeps the same ones."""
    shape = base.shape[1:] if is_stacked(path) else base.shape
    if not method.counts or _row_axis(path) != -2 or len(shape) != 2:
        return options
    return dataclasses.replace(options, index_order=tuple(shape))


def merge_params(method: MergeMethod | str, base: Flat, sources: Flat, params: dict,
                 *, stats: dict | None = None, key: Array | None = None,
                 options: Options | None = None) -> Flat:
    """Merges every parameter. Pure: jit it, vmap it over a population of `params`.
    stats: `prepare(method, base, sources)`, computed once when many candidates are merged
    (a search); None for a one-off merge."""
    method = get_method(method) if isinstance(method, str) else method
    options = method.default_options if options is None else options
    if stats is None:
        stats = prepare(method, base, sources, options=options) if method.stats_required else {}
    if method.random and key is None:
        raise ValueError(f"{method.name} is random: pass a PRNG key")
    merged = {}
    for i, path in enumerate(sorted(base)):
        leaf_key = None if key is None else jax.random.fold_in(key, i)
        merged[path] = merge_leaf(method, is_stacked(path), base[path], sources[path], params[path],
                                  stats.get(path), leaf_key, _leaf_options(method, path, base[path], options))
    return merged


def merge_plan(plan: MergePlan, base: Flat, sources: Flat, *, stats: dict | None = None,
               key: Array | None = None) -> Flat:
    """Runs a plan over Flax paths (a genome's: `GenomeSpace.plan`) in memory: `merge_params`
    with the plan's method, options and values. Pure: jit it, vmap it over plans (a
    deterministic method's; a random one's runs eagerly, see below: it makes the checkpoint
    that is exported, not the search's candidates).

    A random method (DARE, DELLA) merges as `jaxmerge merge` merges the plan's recipe, so that
    the recipe with its seed rebuilds this merge bit for bit (`merge.recipe._jobs` derives the
    same keys): each linear kernel in the checkpoint's layout [out, in] (materialised, outside
    jit: the masks are drawn over its elements in that order and the sums reduce in it), the
    layers one at a time (XLA-CPU orders a reduction by the batch it is in), statistics made
    as the streamed merge makes them (`stats` unused), an elementwise method's tensors flat as
    it merges them. A search's candidates, merged by `merge_params`, are unaffected."""
    if not plan.merge_method.random:
        return merge_params(plan.method, base, sources, plan.params, stats=stats, key=key, options=plan.options)
    method, options = plan.merge_method, plan.options
    if key is None:
        raise ValueError(f"{method.name} is random: pass a PRNG key")
    prepared = functools.partial(prepare_stats, method, row_axis=-1, options=options)  # as stream.py prepares them
    merged = {}
    for i, path in enumerate(sorted(base)):
        b, s, stacked = base[path], sources[path], is_stacked(path)
        transposed = path.endswith("kernel") and b.ndim == 2 + stacked
        if transposed:
            b, s = _swap_last_axes(b), _swap_last_axes(s)
        leaf_stats = None
        if method.stats_required:
            leaf_stats = jax.lax.map(lambda layer: prepared(*layer), (b, s)) if stacked else prepared(b, s)
        shape = b.shape
        if not method.stats_required:  # elementwise: merged flat, as the streamed merge merges it
            lead = 1 if stacked else 0
            b, s = b.reshape(b.shape[:lead] + (-1,)), s.reshape(s.shape[:lead + 1] + (-1,))
        out = merge_leaf(method, stacked, b, s, plan.params[path], leaf_stats, jax.random.fold_in(key, i), options,
                         layer_by_layer=True).reshape(shape)
        merged[path] = _swap_last_axes(out) if transposed else out
    return merged


@jax.jit
def _swap_last_axes(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


# ----------------------------------------------------------------------------- VLMs
# A VLM (LLaVA) merges only its language model, with LLMs of the same architecture; the
# vision tower and projector pass through unchanged, as in EvoVLM-JP.


def with_language_model_params(model: nnx.Module, flat: Mapping[str, Array]) -> nnx.Module:
    """`model` with its language model's parameters replaced by `flat` (LLM paths). Token
    rows the VLM has beyond the merged vocabulary (image tokens) keep the VLM's values."""
    current = flat_params(language_model(model))
    fitted = {}
    for path, value in flat.items():
        target = current[path]
        axis = VOCAB_AXES.get(path)
        if value.shape != target.shape and axis is not None and value.shape[axis] < target.shape[axis]:
            extra = jax.lax.slice_in_dim(target, value.shape[axis], target.shape[axis], axis=axis)
            value = jnp.concatenate([value, extra.astype(value.dtype)], axis=axis)
        fitted[path] = value
    if language_model(model) is model:
        return with_params(model, fitted)
    return with_params(model, {f"language_model.{p}": v for p, v in fitted.items()})


def with_language_model(model: nnx.Module, lm: nnx.Module) -> nnx.Module:
    """A copy of the VLM `model` whose language model is `lm` (a layer path, say); vision
    tower and projector shared."""
    copy = nnx.merge(*nnx.split(model))
    copy.language_model = lm
    return copy
