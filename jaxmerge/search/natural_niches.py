"""Natural niches (M2N2): model fusion by an archive that competes for items and mates by attraction.

Abrantes, Lange, Tang (Sakana AI), "Competition and Attraction Improve Model Fusion",
GECCO 2025; the semantics are those of its released code (SakanaAI/natural_niches), on
jaxmerge's models (flat dicts `path -> array`) instead of one flat vector. The pure core, with
no run loop: everything here is a jit-friendly function of arrays.

    config   = NicheConfig(archive_size=N, alpha=1.0, matchmaker=True, splitpoint=True)
    order    = parameter_order(model_flat)                   # static: the blocks, layer-major
    state, archive = empty_archive(config, num_items=I, model=model_flat)
    for k, (source, scores) in enumerate(sources):            # the sources, one by one
        state, archive, slot = update_archive(state, archive, scores, source, k, config.alpha)
    children = sample_children(key, state, config, P, order)  # all from the archive before the step
    make     = functools.partial(child_params, order=order, config=config)
    params   = jax.vmap(make, (None, 0, 0, 0, 0, 0))(archive, children.a, children.b, children.w,
                   children.block, children.position)         # {path: [P, ...]}: evaluate as a batch
    state, archive, slots = update_archive_in_order(state, archive, child_scores, params, child_ids,
                                                      config.alpha)

**Resource sharing** (competition): each item's reward is shared by the members that solve it.
With scores s [N, I] in [0, 1] (the paper's are 0/1), z_j = (sum_i s_ij) ** alpha (1 where no
member scores on item j), fitness_i = sum_j s_ij / z_j. Parent A is drawn with probability
fitness_i / sum(fitness).

**Attraction** (the matchmaker): parent B is drawn with probability proportional to
sum_j max(0, s_ij / z_j - s_Aj / z_j): B is strong where A is weak. Without the matchmaker,
both parents are drawn from A's probabilities. Where a sum of fitness or attraction is 0 (no
member scores anything; A dominates every member), the released code divides by zero (NaN);
here the draw falls back to uniform over the filled members. Empty slots are never drawn.
Before the first insertion there is nothing to draw from: sample only from a filled archive.

**The child**: w ~ U[0, 1), a split point t uniform over the n parameters of the order below;
each parameter's mixing value is v = w before t and 1 - w from t on, and the child is
`slerp(v, A, B)` with the norm of A, of B and their dot product taken over the WHOLE model
(the released code's `slerp_w_splitpoint`): omega = arccos(<A, B> / (|A| |B|)),
child = sin((1 - v) omega) / sin(omega) A + sin(v omega) / sin(omega) B, or the linear
(1 - v) A + v B where sin(omega) <= 1e-6 (also where a parent is all zeros, where the
released code gives NaN). `interpolation="linear"` is always the linear form (no global
reductions). `splitpoint=False` is the released `crossover_without_splitpoint`: v = w
everywhere (represented as the split point t = n). Computed in float32, the child cast to
the archive's dtype.

**The archive update**: the child's scores are appended to the members' ([N + 1, I]), the
shared fitness recomputed over the N + 1 rows, and the row of least fitness removed (the
first such row on a tie, as jnp.argmin; the child is the last row, so it is dropped only
when strictly worse than every member). An empty slot counts as worse than any member, so
empty slots fill first, in order (the released code's empty rows have fitness 0, which ties
with a member that solves nothing: such a member could be evicted while a slot stays empty;
where every member solves something the two agree). The archive starts empty and the sources
enter one by one through the same update, as in the released code. A step's children are
all drawn from the archive as it was before the step, then inserted in order.

**Parameter order** (`parameter_order`): the parameters form blocks, each one non-stacked leaf
or one layer's slice of a stacked leaf ([L, ...], `jaxmerge.merge.tree.is_stacked`), each
flattened in C order; the blocks are ordered layer-major, so a split point can fall inside a
layer and everything before it is "earlier in the network":

1. the non-stacked leaves whose path names an input embedding (a module named `*embed*`:
   `embed_tokens.weight`, a vision tower's `embeddings.*`), sorted by path;
2. each stack (the leaves sharing a prefix up to `layers.`: `layers.` for an LLM,
   `language_model.layers.` and `vision_tower.encoder.layers.` for a whole LLaVA), in sorted
   prefix order, layer-major: layer 0's slice of each of its leaves in sorted path order,
   then layer 1, ... (stacks of different depths follow one another, each in its own order);
3. the remaining non-stacked leaves (final norm, output head, a VLM's projector), sorted.

n exceeds 2^31 on a 7B model while JAX computes in int32, so a split point is a pair
(block, position in block) with each block under 2^31 elements; it is drawn exactly uniformly
over the n parameters (a uniform 64-bit index by rejection, from pairs of 32-bit words, placed
among the blocks' cumulative ends); `global_split_index` turns pairs into int64 indices on the
host. The masks are computed in jit from the blocks' ids (static data): new w, block or
position never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxmerge.merge.tree import is_stacked

Array = jax.Array
Flat = dict[str, Array]
INTERPOLATIONS = ("slerp", "linear")
LINEAR_BELOW = 1e-6  # sin(omega) at or below which slerp is the linear interpolation (the released code's)
MAX_BLOCK_SIZE = 2**31 - 1  # a position within a block is an int32


@dataclasses.dataclass(frozen=True)
class NicheConfig:
    archive_size: int  # N members
    alpha: float = 1.0  # the resource sharing's exponent: z_j = (sum_i s_ij) ** alpha
    matchmaker: bool = True  # parent B by attraction (False: like parent A)
    splitpoint: bool = True  # False: one mixing value w for every parameter
    interpolation: str = "slerp"  # "slerp" | "linear"

    def __post_init__(self):
        if not (isinstance(self.archive_size, int) and self.archive_size >= 1):
            raise ValueError(f"NicheConfig.archive_size must be an integer >= 1, got {self.archive_size!r}")
        if not (isinstance(self.alpha, (int, float)) and np.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"NicheConfig.alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"NicheConfig.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")


@struct.dataclass
class ArchiveState:
    """The archive's bookkeeping; its parameters live beside it as a Flat dict {path: [N, ...]}
    ([N, L, ...] for stacked leaves), too large to copy with the state."""
    scores: Array  # [N, I] float32 per-item scores of each member in [0, 1]; 0 in empty slots
    filled: Array  # [N] bool: the slot holds a member
    member_ids: Array  # [N] int32 the caller's id of each member (a source's index, a child's number); -1 empty


@struct.dataclass
class Children:
    """A step's children, as drawn: parent slots, mixing value and split point (block, position)."""
    a: Array  # [P] int32 slot of parent A
    b: Array  # [P] int32 slot of parent B
    w: Array  # [P] float32 mixing value in [0, 1)
    block: Array  # [P] int32 split block (num_blocks: no split, v = w everywhere)
    position: Array  # [P] int32 split position within the block


@dataclasses.dataclass(frozen=True)
class ParameterOrder:
    """The parameters' order as blocks (static, hashable: pass it to jit as a static argument).
    blocks[k] = (path, layer): a non-stacked leaf (layer -1) or a stacked leaf's layer slice."""
    blocks: tuple[tuple[str, int], ...]
    sizes: tuple[int, ...]  # elements per block, each < 2^31

    @functools.cached_property
    def starts(self) -> np.ndarray:
        """[num_blocks + 1] int64: the global index of each block's first parameter, then n."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.sizes, np.int64))])

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_params(self) -> int:  # n
        return int(self.starts[-1])

    @functools.cached_property
    def _ids(self) -> dict[str, np.ndarray]:
        ids: dict[str, list[int]] = {}
        for k, (path, _) in enumerate(self.blocks):
            ids.setdefault(path, []).append(k)
        return {path: np.asarray(k, np.int32) for path, k in ids.items()}

    def block_ids(self, path: str) -> np.ndarray:
        """[L] int32 the blocks of a stacked leaf's layers, [1] those of a non-stacked leaf."""
        return self._ids[path]


def _names_input_embedding(path: str) -> bool:
    return any("embed" in part for part in path.split(".")[:-1])


def _stack_prefix(path: str) -> str:
    """`...layers.` the path's stack: what its layer axis is shared with."""
    at = 0 if path.startswith("layers.") else path.index(".layers.") + 1
    return path[:at + len("layers.")]


def _layer_blocks(prefix: str, members: list[str], shapes: dict) -> list[tuple[tuple[str, int], int]]:
    """A stack's blocks, layer-major: ((path, layer), size) for each layer, each leaf."""
    depths = {shapes[p][0] if shapes[p] else None for p in members}
    if len(depths) != 1 or None in depths:
        raise ValueError(f"{members[0]}: the stack {prefix!r} has leaves of different layer counts "
                         f"({sorted(d for d in depths if d is not None)})")
    return [((p, layer), int(np.prod(shapes[p][1:], dtype=np.int64)))
            for layer in range(depths.pop()) for p in members]


def parameter_order(model: Mapping[str, Any]) -> ParameterOrder:
    """The layer-major order of one model's parameters (see the module's docstring); `model`
    maps paths to arrays or anything with a `.shape` (jax.ShapeDtypeStruct)."""
    shapes = {path: tuple(v.shape) for path, v in model.items()}
    if not shapes:
        raise ValueError("parameter_order: the model has no parameters")
    paths = sorted(shapes)
    stacks: dict[str, list[str]] = {}
    for p in paths:
        if is_stacked(p):
            stacks.setdefault(_stack_prefix(p), []).append(p)
    whole = [p for p in paths if not is_stacked(p)]
    embeddings = [p for p in whole if _names_input_embedding(p)]
    rest = [p for p in whole if not _names_input_embedding(p)]
    entries = [((p, -1), int(np.prod(shapes[p], dtype=np.int64))) for p in embeddings]
    for prefix in sorted(stacks):
        entries += _layer_blocks(prefix, stacks[prefix], shapes)
    entries += [((p, -1), int(np.prod(shapes[p], dtype=np.int64))) for p in rest]
    for (path, _), size in entries:
        if size > MAX_BLOCK_SIZE:
            raise ValueError(f"{path}: a block of {size} parameters (a leaf, or a stacked leaf's layer) "
                             f"exceeds 2^31 - 1, which the split position cannot index")
    if sum(size for _, size in entries) >= 2**63:
        raise ValueError("parameter_order: the parameters' count exceeds int64")
    return ParameterOrder(tuple(block for block, _ in entries), tuple(size for _, size in entries))


def global_split_index(order: ParameterOrder, block, position) -> np.ndarray:
    """int64 global split indices (into the order's n parameters; n: no split) of split points
    (block, position), computed on the host: for a provenance record."""
    block, position = np.asarray(block, np.int64), np.asarray(position, np.int64)
    if np.any(block < 0) or np.any(block > order.num_blocks):
        raise ValueError(f"global_split_index: block out of [0, {order.num_blocks}]")
    return order.starts[block] + position


def child_records(children: Children, member_ids, order: ParameterOrder) -> list[dict]:
    """One provenance record per child (host values): its parents' member ids (taken from
    `member_ids` [N], the archive's before the step), w, and the int64 split index as an int."""
    a, b = np.asarray(children.a), np.asarray(children.b)
    ids = np.asarray(member_ids)
    split = global_split_index(order, np.asarray(children.block), np.asarray(children.position))
    return [{"parent_a": int(ids[i]), "parent_b": int(ids[j]), "w": float(w), "split": int(s)}
            for i, j, w, s in zip(a, b, np.asarray(children.w), split, strict=True)]


# --- selection ---------------------------------------------------------------------------------------------

def shared_fitness(scores: Array, filled: Array, alpha: float) -> tuple[Array, Array]:
    """(fitness matrix [N, I], fitness [N]): each item's score shared among the members that
    score on it, s_ij / (sum_i s_ij) ** alpha; empty slots' rows are 0."""
    scores = jnp.where(filled[:, None], scores.astype(jnp.float32), 0.0)  # [N, I]
    total = jnp.sum(scores, axis=0)  # [I]
    share = jnp.where(total > 0, total, 1.0) ** alpha  # [I]
    matrix = scores / share[None, :]  # [N, I]
    return matrix, jnp.sum(matrix, axis=1)


def _normalised_or_uniform(weights: Array, filled: Array) -> Array:
    """weights / sum(weights) [N], or uniform over the filled slots where the sum is 0."""
    weights = jnp.where(filled, weights, 0.0)
    total = jnp.sum(weights)
    uniform = filled.astype(jnp.float32) / jnp.maximum(jnp.sum(filled), 1)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), uniform)


def parent_probabilities(scores: Array, filled: Array, alpha: float) -> Array:
    """[N] parent A's probabilities: the shared fitness, normalised."""
    return _normalised_or_uniform(shared_fitness(scores, filled, alpha)[1], filled)


def attraction_probabilities(scores: Array, filled: Array, alpha: float, parent_a: Array) -> Array:
    """[N] parent B's probabilities given parent A's slot: how much each member's shared
    fitness exceeds A's, summed over the items."""
    matrix, _ = shared_fitness(scores, filled, alpha)  # [N, I]
    attraction = jnp.sum(jnp.maximum(0.0, matrix - matrix[parent_a][None, :]), axis=1)  # [N]
    return _normalised_or_uniform(attraction, filled)


def _sample_split(key: Array, order: ParameterOrder) -> tuple[Array, Array]:
    """(block, position) int32 of a split point uniform over the order's n parameters.

    An index r uniform in [0, n) as two uint32 words (hi, lo), by rejection from
    [0, 2^ceil(log2 n)) (under 2 draws on average); its block is the number of block ends
    <= r, its position r - start (< 2^31, so the low words' difference mod 2^32)."""
    n = order.num_params
    bits = (n - 1).bit_length()
    hi_mask = np.uint32((1 << max(bits - 32, 0)) - 1)
    lo_mask = np.uint32((1 << min(bits, 32)) - 1)
    n_hi, n_lo = np.uint32(n >> 32), np.uint32(n & 0xFFFFFFFF)
    ends, starts = order.starts[1:], order.starts[:-1]  # [B] int64
    ends_hi, ends_lo = jnp.asarray(ends >> 32, jnp.uint32), jnp.asarray(ends & 0xFFFFFFFF, jnp.uint32)
    starts_lo = jnp.asarray(starts & 0xFFFFFFFF, jnp.uint32)

    def draw(carry):
        key, _, _ = carry
        key, sub = jax.random.split(key)
        words = jax.random.bits(sub, (2,), jnp.uint32)
        return key, words[0] & hi_mask, words[1] & lo_mask

    def rejected(carry):
        _, hi, lo = carry
        return ~((hi < n_hi) | ((hi == n_hi) & (lo < n_lo)))

    _, hi, lo = jax.lax.while_loop(rejected, draw, draw((key, jnp.uint32(0), jnp.uint32(0))))
    passed = (ends_hi < hi) | ((ends_hi == hi) & (ends_lo <= lo))  # [B] block ends at or before r
    block = jnp.sum(passed, dtype=jnp.int32)
    position = (lo - starts_lo[block]).astype(jnp.int32)
    return block, position


def sample_children(key: Array, state: ArchiveState, config: NicheConfig, num_children: int,
                    order: ParameterOrder) -> Children:
    """P children's parents, mixing values and split points, all drawn from `state` (the
    archive before the step). Jit with config, num_children and order static."""
    def one(key):
        k_a, k_b, k_w, k_split = jax.random.split(key, 4)
        probs_a = parent_probabilities(state.scores, state.filled, config.alpha)  # [N]
        a = jax.random.choice(k_a, config.archive_size, p=probs_a)
        probs_b = (attraction_probabilities(state.scores, state.filled, config.alpha, a) if config.matchmaker
                   else probs_a)
        b = jax.random.choice(k_b, config.archive_size, p=probs_b)
        w = jax.random.uniform(k_w, dtype=jnp.float32)
        if config.splitpoint:
            block, position = _sample_split(k_split, order)
        else:  # the split point at n: v = w for every parameter
            block, position = jnp.int32(order.num_blocks), jnp.int32(0)
        return Children(a.astype(jnp.int32), b.astype(jnp.int32), w, block, position)

    return jax.vmap(one)(jax.random.split(key, num_children))


# --- the child ---------------------------------------------------------------------------------------------

def _before_split(path: str, shape: tuple[int, ...], block: Array, position: Array, order: ParameterOrder) -> Array:
    """bool [*shape] (per model leaf): the parameter lies before the split point (block, position)."""
    ids = order.block_ids(path)  # [L] or [1]
    if is_stacked(path):  # one block per layer: [L, *S]
        layer_shape = shape[1:]
        ids = jnp.asarray(ids).reshape((-1,) + (1,) * len(layer_shape))  # [L, 1, ...]
        within = jnp.arange(int(np.prod(layer_shape, dtype=np.int64)), dtype=jnp.int32).reshape((1,) + layer_shape)
    else:
        ids = jnp.int32(ids[0])
        within = jnp.arange(int(np.prod(shape, dtype=np.int64)), dtype=jnp.int32).reshape(shape)
    return (ids < block) | ((ids == block) & (within < position))


def _slerp_scales(value: Array, omega: Array, sin_omega: Array) -> tuple[Array, Array]:
    """(scale of A, scale of B) for a mixing value (B's share): the released code's slerp."""
    spherical = sin_omega > LINEAR_BELOW
    safe_sin = jnp.where(spherical, sin_omega, 1.0)
    scale_a = jnp.where(spherical, jnp.sin((1.0 - value) * omega) / safe_sin, 1.0 - value)
    scale_b = jnp.where(spherical, jnp.sin(value * omega) / safe_sin, value)
    return scale_a, scale_b


def child_params(archive: Mapping[str, Array], a: Array, b: Array, w: Array, block: Array, position: Array,
                 order: ParameterOrder, config: NicheConfig, base: Mapping[str, Array] | None = None) -> Flat:
    """One child {path: [...]} of the members in slots a and b of `archive` {path: [N, ...]}:
    v = w before the split point (block, position), 1 - w from it on, slerp (or lerp) of A
    toward B by v. With a `base` {path: [...]}, task-arithmetic children: A - base and B - base
    fused so, plus the base (with linear interpolation the same child; with slerp the angle is
    the task vectors'). Pure: jit with order and config static (a, b, w, block, position are
    data); vmap over children with the archive unbatched."""
    # With a base: the parents' task vectors are fused (slerp's angle is theirs), the base added back.
    def shift(x, p, sign):
        return x if base is None else x + sign * base[p].astype(jnp.float32)
    parent_a = {p: shift(archive[p][a].astype(jnp.float32), p, -1) for p in archive}  # {path: [...]}
    parent_b = {p: shift(archive[p][b].astype(jnp.float32), p, -1) for p in archive}
    w = jnp.asarray(w, jnp.float32)
    if config.interpolation == "slerp":
        norm_a = jnp.sqrt(sum(jnp.sum(x * x) for x in parent_a.values()))
        norm_b = jnp.sqrt(sum(jnp.sum(x * x) for x in parent_b.values()))
        dot = sum(jnp.sum(parent_a[p] * parent_b[p]) for p in archive)
        nonzero = (norm_a > 0) & (norm_b > 0)  # a zero parent: linear (the released code: NaN)
        cosine = jnp.where(nonzero, dot / jnp.where(nonzero, norm_a * norm_b, 1.0), 1.0)
        omega = jnp.arccos(jnp.clip(cosine, -1.0, 1.0))
        sin_omega = jnp.sin(omega)
        before_a, before_b = _slerp_scales(w, omega, sin_omega)  # v = w before the split
        after_a, after_b = _slerp_scales(1.0 - w, omega, sin_omega)  # v = 1 - w from it on
    else:
        before_a, before_b, after_a, after_b = 1.0 - w, w, w, 1.0 - w
    child = {}
    for p in archive:
        before = _before_split(p, parent_a[p].shape, block, position, order)
        scale_a = jnp.where(before, before_a, after_a)
        scale_b = jnp.where(before, before_b, after_b)
        child[p] = shift(scale_a * parent_a[p] + scale_b * parent_b[p], p, 1).astype(archive[p].dtype)
    return child


# --- the archive -------------------------------------------------------------------------------------------

def empty_archive(config: NicheConfig, num_items: int, model: Mapping[str, Any]) -> tuple[ArchiveState, Flat]:
    """An empty archive: its state and zero parameters {path: [N, ...]} shaped and typed as `model`."""
    state = ArchiveState(scores=jnp.zeros((config.archive_size, num_items), jnp.float32),
                         filled=jnp.zeros((config.archive_size,), bool),
                         member_ids=jnp.full((config.archive_size,), -1, jnp.int32))
    archive = {p: jnp.zeros((config.archive_size, *v.shape), v.dtype) for p, v in model.items()}
    return state, archive


def update_archive(state: ArchiveState, archive: Mapping[str, Array], child_scores: Array,
                   child: Mapping[str, Array], child_id: Array, alpha: float
                   ) -> tuple[ArchiveState, Flat, Array]:
    """(state, archive, slot): the child enters in place of the least fit of the members and
    itself (shared fitness over the N + 1 rows; an empty slot first), or not at all (slot -1)."""
    size = state.filled.shape[0]
    scores = jnp.concatenate([state.scores, child_scores.astype(jnp.float32)[None]], axis=0)  # [N + 1, I]
    filled = jnp.concatenate([state.filled, jnp.ones((1,), bool)])  # [N + 1]
    _, fitness = shared_fitness(scores, filled, alpha)  # [N + 1]
    worst = jnp.argmin(jnp.where(filled, fitness, -jnp.inf))
    replace = worst < size
    slot = jnp.minimum(worst, size - 1)
    new_state = ArchiveState(
        scores=state.scores.at[slot].set(jnp.where(replace, scores[-1], state.scores[slot])),
        filled=state.filled.at[slot].set(state.filled[slot] | replace),
        member_ids=state.member_ids.at[slot].set(jnp.where(replace, jnp.asarray(child_id, jnp.int32),
                                                           state.member_ids[slot])))
    new_archive = {p: leaf.at[slot].set(jnp.where(replace, child[p].astype(leaf.dtype), leaf[slot]))
                   for p, leaf in archive.items()}
    return new_state, new_archive, jnp.where(replace, slot, -1).astype(jnp.int32)


def update_archive_in_order(state: ArchiveState, archive: Mapping[str, Array], child_scores: Array,
                            children: Mapping[str, Array], child_ids: Array, alpha: float
                            ) -> tuple[ArchiveState, Flat, Array]:
    """`update_archive` for P children in order: child_scores [P, I], children {path: [P, ...]},
    child_ids [P]; returns the slots [P] (-1: not inserted). A later child competes with the
    earlier ones already inserted."""
    def step(carry, child):
        scores, params, child_id = child
        state, archive, slot = update_archive(*carry, scores, params, child_id, alpha)
        return (state, archive), slot

    (state, archive), slots = jax.lax.scan(step, (state, dict(archive)), (child_scores, dict(children), child_ids))
    return state, archive, slots


def coverage(state: ArchiveState) -> Array:
    """[I] the best score of any member on each item (0 in an empty archive)."""
    return jnp.max(jnp.where(state.filled[:, None], state.scores, 0.0), axis=0)
