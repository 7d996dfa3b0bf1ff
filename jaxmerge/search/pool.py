"""A pool of source models kept in host memory, a few of them on the device at a time.

With a pool of many checkpoints (issue #17: N up to ~16 7B models, 224 GB in bfloat16) the
stacked sources do not fit an accelerator, while each candidate merges only the few its
gates let in (`GenomeSpace.max_sources`). `SourcePool` keeps every source's arrays (the
stacked weights, and the merge method's per-source statistics) in host memory. A
generation's candidates are grouped by the sources they merge; for each group those
sources are stacked on the device in `capacity` slots, in ascending order (the rest
empty; those the previous group had are taken from the device, the others copied), and
its candidates merge from there with their parameters picked for the slots
(`jaxmerge.merge.tree.select_sources`). On the device: `capacity` sources' arrays instead
of N (twice for a moment while the slots change).
A deterministic method merges the same tensors as from the whole pool (an absent source
adds exact zeros; tested); a random one (DARE) draws its masks per slot, which depend on
the candidate's own sources alone (the same in the search and in the final merge).

    pool = SourcePool.from_arrays({"sources": stacked, "stats": stats}, capacity=3)
    groups = pool.groups(used)           # used [P, N] bool -> [(candidates, slots [capacity])]
    resident = pool.resident(slots)      # {"sources": [capacity...], "stats": ..., "slots": slots}
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.merge.tree import align_source, is_stacked


def source_axis(path: str) -> int:
    """Where a path's arrays stack the sources: [K, *S], or [L, K, *S] for stacked layers."""
    return 1 if is_stacked(path) else 0


def stack_in_host_memory(base: dict, sources: Iterable[dict], count: int) -> dict[str, np.ndarray]:
    """`stack_sources(base, list(sources))` as numpy arrays, filled one source at a time:
    each source's own arrays may go as soon as they are in, so a pool takes host memory once
    (the values and dtypes are `stack_sources`'s: mixed dtypes promote as `jnp.stack` does)."""
    stacked: dict[str, np.ndarray] = {}
    for i, source in enumerate(sources):
        for path, value in align_source(base, source, i).items():
            value, axis = np.asarray(value), source_axis(path)
            if path not in stacked:
                stacked[path] = np.empty(value.shape[:axis] + (count,) + value.shape[axis:], value.dtype)
            dtype = jnp.promote_types(stacked[path].dtype, value.dtype)
            if dtype != stacked[path].dtype:
                stacked[path] = stacked[path].astype(dtype)
            stacked[path][(slice(None),) * axis + (i,)] = value
    return stacked


@dataclasses.dataclass(eq=False)
class SourcePool:
    """Per-source arrays in host memory: {name: {path: array or pytree of arrays}}, each
    leaf with the sources on `source_axis(path)`; at most `capacity` of them on the device."""
    arrays: dict[str, dict[str, Any]]
    capacity: int
    num_sources: int
    _resident: tuple[tuple[int, ...], dict | None] = dataclasses.field(default=((), None), repr=False)
    transfers: int = 0  # sources copied from host memory to the device so far

    @classmethod
    def from_arrays(cls, arrays: dict[str, dict[str, Any]], capacity: int) -> SourcePool:
        """The arrays as numpy, in host memory (arrays of the CPU backend without a copy), and
        checks that their source axes agree."""
        host = jax.tree.map(np.asarray, arrays)
        counts = {leaf.shape[source_axis(path)] for tree in host.values() for path, sub in tree.items()
                  for leaf in jax.tree.leaves(sub)}
        if len(counts) != 1:
            raise ValueError(f"the pool's arrays disagree on the number of sources: {sorted(counts)}")
        num_sources = counts.pop()
        if not 1 <= capacity <= num_sources:
            raise ValueError(f"capacity must be in [1, {num_sources}] (the pool's sources), got {capacity}")
        return cls(host, capacity, num_sources)

    def nbytes(self, sources: int | None = None) -> int:
        """Bytes of `sources` sources' arrays (default: the whole pool)."""
        total = sum(leaf.nbytes for tree in self.arrays.values() for leaf in jax.tree.leaves(tree))
        return total * (self.num_sources if sources is None else sources) // self.num_sources

    def groups(self, used: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Candidates [P, N] (which sources each merges, at most `capacity`) grouped by their
        sources: [(candidate indices, slots [capacity]: the group's sources in ascending
        order, then -1 for empty slots)], in order of the sources. A candidate's slots depend
        on its own sources alone, so a random method's masks (drawn per slot) are the same
        whichever population it is scored in, and in its final merge."""
        used = np.asarray(used, bool)
        if used.ndim != 2 or used.shape[1] != self.num_sources:
            raise ValueError(f"used must be [candidates, {self.num_sources}], got {used.shape}")
        if used.sum(1).max(initial=0) > self.capacity:
            raise ValueError(f"a candidate merges {used.sum(1).max()} sources; the device holds {self.capacity}")
        by_sources: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(used):
            by_sources.setdefault(tuple(np.flatnonzero(row).tolist()), []).append(i)
        return [(np.asarray(members), self.slots(sources)) for sources, members in sorted(by_sources.items())]

    def slots(self, sources) -> np.ndarray:
        """[capacity]: `sources` in ascending order, then -1."""
        slots = np.full(self.capacity, -1, np.int32)
        slots[:len(sources)] = sorted(sources)
        return slots

    def resident_for(self, used) -> dict:
        """`resident` for one candidate: which sources it merges [N] (bool)."""
        return self.resident(self.slots(np.flatnonzero(np.asarray(used))))

    def resident(self, slots: np.ndarray, place: Callable = jax.device_put) -> dict:
        """The slots' arrays on the device ({name: {path: ...}} as `arrays`, and "slots"); an
        empty slot repeats the first one's arrays, which a zero weight leaves out. Sources
        the previous slots held are taken from the device, the others copied from host
        memory; then the previous slots are let go (for that moment two stacks are on the
        device). The same slots again copy nothing. `place` puts an array on the device(s)
        (a mesh's sharding, say)."""
        slots = np.asarray(slots, np.int32)
        if not (slots >= 0).any():  # a merge of no source (the base alone): any source, at weight 0
            slots = np.where(np.arange(len(slots)) == 0, 0, slots).astype(np.int32)
        key = tuple(int(s) for s in slots)
        previous, old = self._resident
        if key == previous:
            return old
        held = {s: j for j, s in enumerate(previous) if s >= 0}
        fill = [s if s >= 0 else key[0] for s in key]

        def stacked(axis, host, current):  # one array: [.., capacity, ..] on `axis`
            # each source once (empty slots repeat the first): taken from the device, or copied
            parts = {s: jax.lax.index_in_dim(current, held[s], axis, keepdims=False) if s in held
                     else place(np.take(host, s, axis)) for s in set(fill)}
            return jnp.stack([parts[s] for s in fill], axis)

        resident = {}
        for name, tree in self.arrays.items():
            resident[name] = {}
            for path, sub in tree.items():
                current = old[name][path] if old is not None else jax.tree.map(lambda _: None, sub)
                resident[name][path] = jax.tree.map(functools.partial(stacked, source_axis(path)), sub, current,
                                                    is_leaf=lambda x: x is None)
        resident["slots"] = place(slots)
        self.transfers += len({s for s in fill if s not in held})
        self._resident = (key, resident)
        return resident
