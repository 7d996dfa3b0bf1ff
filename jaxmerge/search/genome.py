"""Genomes: a flat vector that decodes to the parameters of a merge.

A genome holds, for each evolved parameter (by default weight and density), one value
per source model and per layer group; with tensor families (mergekit-evolve's `filters`,
e.g. "self_attn" and "mlp"), one such block per family besides the block of every other
tensor. With one group (the granularity of the reported
EvoLLM-JP recipe: 6 numbers for 3 models) every tensor shares a source's value; with
several, the stacked layers are split into contiguous groups and the non-layer tensors
(embeddings, final norm, output head) get a group of their own, as in the paper's
per-layer search. Values are bounded by a clip or a sigmoid; the paper's defaults apply
(every value starts at 0.5, sigma 1/6, population 4 + floor(3 ln n)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.merge.methods import Options, get_method
from jaxmerge.merge.plan import MergePlan
from jaxmerge.merge.tree import is_stacked

DEFAULT_BOUNDS = {"weight": (0.0, 2.0), "density": (0.01, 1.0), "t": (0.0, 1.0), "gamma": (0.0, 0.2),
                  "epsilon": (0.0, 0.2), "scale": (0.0, 2.0), "gate": (0.0, 1.0)}


class SearchSpace(Protocol):
    """What the search needs of a genome space (`GenomeSpace` for parameter-space merges,
    `PathSpace` for layer paths): a flat genome of `num_dims` numbers, its starting point,
    a pure decoding to the merge's parameters, and plain-number reports."""

    @property
    def num_dims(self) -> int: ...

    def initial(self) -> jax.Array: ...

    def decode(self, genome: jax.Array, paths) -> dict: ...

    def describe(self, genome) -> dict: ...

    def summary(self) -> dict: ...

    def cost(self, genome: jax.Array) -> jax.Array: ...


def default_population_size(num_dims: int) -> int:
    return 4 + int(math.floor(3 * math.log(num_dims)))


@dataclasses.dataclass(frozen=True)
class GenomeSpace:
    method: str
    num_sources: int
    num_layers: int
    evolve: tuple[str, ...] = ("weight", "density")
    layer_groups: int = 1  # 1: one value per source; num_layers: one per source per layer
    bounds: tuple[tuple[str, float, float], ...] = ()  # overrides of DEFAULT_BOUNDS
    transform: str = "clip"  # "clip" | "sigmoid"
    initial_value: float = 0.5
    initial_values: tuple[tuple[str, float], ...] = ()  # per-parameter overrides of initial_value
    fixed: tuple[tuple[str, float], ...] = ()  # other method parameters, held constant
    families: tuple[str, ...] = ()  # tensor-name filters with values of their own (first match wins)
    normalize: bool | None = None  # None: the method's default (mergekit's `normalize`)
    # One gate per source: a source whose gate is below 1/2 is absent (its weights are 0), so
    # the search chooses which sources of a pool enter the merge.
    gates: bool = False
    gate_initial: float = 0.6  # every source starts present, one sigma (1/6) from absent
    # Fitness each present source costs (a sparsity prior on the gates): of two merges that
    # score alike, the one with fewer sources wins, so sources that do not help drop out.
    source_cost: float = 0.0
    # At most this many sources in a merge (those with the highest open gates; ties to the
    # lower index): a budget for the merge, and what a pool kept in host memory puts on the
    # device per candidate (`jaxmerge.search.pool`).
    max_sources: int | None = None

    def __post_init__(self):
        method = get_method(self.method)
        for name in self.evolve:
            method.parameter(name)  # raises, naming the method's parameters
        given = set(self.evolve) | {n for n, _ in self.fixed}
        missing = [p.name for p in method.parameters if p.default is None and p.name not in given]
        if missing:
            raise ValueError(f"{self.method} needs {', '.join(missing)}: evolve or fix it")
        if not 1 <= self.layer_groups <= self.num_layers:
            raise ValueError(f"layer_groups must be in [1, {self.num_layers}], got {self.layer_groups}")
        unknown = [n for n, _ in self.initial_values if n not in self.evolve]
        if unknown:
            raise ValueError(f"initial_values for {', '.join(unknown)}, which are not evolved ({self.evolve})")
        if len(set(self.families)) != len(self.families) or "" in self.families:
            raise ValueError(f"families must be distinct, non-empty filters, got {self.families}")
        if self.gates and "weight" not in self.evolve:
            raise ValueError(f"gates switch sources off through their weights: evolve {self.method}'s weight "
                             f"(evolved: {', '.join(self.evolve) or 'nothing'})")
        if self.max_sources is not None and not (self.gates and 1 <= self.max_sources <= self.num_sources):
            raise ValueError(f"max_sources caps the sources gates let in: it needs gates=True and a number in "
                             f"[1, {self.num_sources}], got {self.max_sources} (gates={self.gates})")
        if self.source_cost and not self.gates:
            raise ValueError("source_cost prices the sources a gate lets in: it needs gates=True")
        if not (math.isfinite(self.source_cost) and self.source_cost >= 0):
            raise ValueError(f"source_cost must be a finite number >= 0, got {self.source_cost}")
        if self.transform not in ("clip", "sigmoid"):
            raise ValueError(f"transform must be 'clip' or 'sigmoid', got {self.transform!r}")

    @property
    def num_groups(self) -> int:
        """Layer groups, plus one for the non-layer tensors when layers are split."""
        return self.layer_groups + (1 if self.layer_groups > 1 else 0)

    @property
    def keys(self) -> tuple[str, ...]:
        """The genome's blocks: "weight", "density", then "weight[mlp]"... per family."""
        return tuple(self.evolve) + tuple(f"{n}[{f}]" for f in self.families for n in self.evolve)

    @property
    def num_dims(self) -> int:
        return len(self.keys) * self.num_sources * self.num_groups + (self.num_sources if self.gates else 0)

    def options(self) -> Options:
        """The method's static options, with `normalize` as configured."""
        options = get_method(self.method).default_options
        return options if self.normalize is None else dataclasses.replace(options, normalize=self.normalize)

    def family_of(self, path: str) -> str | None:
        """The first family whose filter occurs in the tensor's path (mergekit's filters)."""
        return next((f for f in self.families if f in path), None)

    def bound(self, name: str) -> tuple[float, float]:
        for n, lo, hi in self.bounds:
            if n == name:
                return lo, hi
        return DEFAULT_BOUNDS.get(name, (0.0, 1.0))

    def _to_value(self, raw: jax.Array, name: str) -> jax.Array:
        lo, hi = self.bound(name)
        if self.transform == "clip":
            return jnp.clip(raw, lo, hi)
        return lo + (hi - lo) * jax.nn.sigmoid(raw)

    def _to_raw(self, value: float, name: str) -> float:
        lo, hi = self.bound(name)
        if self.transform == "clip":
            return float(np.clip(value, lo, hi))
        fraction = np.clip((value - lo) / (hi - lo), 1e-6, 1 - 1e-6)
        return float(np.log(fraction / (1 - fraction)))

    def initial(self) -> jax.Array:
        """The starting mean: every evolved value at `initial_value` (or its override)."""
        shape = (self.num_sources, self.num_groups)
        start = {**{n: self.initial_value for n in self.evolve}, **dict(self.initial_values)}
        blocks = [jnp.full(shape, self._to_raw(start[self._parameter(k)], self._parameter(k))).ravel()
                  for k in self.keys]
        if self.gates:
            blocks.append(jnp.full((self.num_sources,), self._to_raw(self.gate_initial, "gate")))
        return jnp.concatenate(blocks)

    @staticmethod
    def _parameter(key: str) -> str:
        return key.split("[")[0]

    def values(self, genome: jax.Array) -> dict[str, jax.Array]:
        """{block key: [K, groups]} in bounds (see `keys`); with gates, the weights of absent
        sources are 0 and "present" [K, 1] says which sources are in (1) or out (0)."""
        per = self.num_sources * self.num_groups
        values = {key: self._to_value(genome[i * per:(i + 1) * per], self._parameter(key))
                  .reshape(self.num_sources, self.num_groups) for i, key in enumerate(self.keys)}
        if not self.gates:
            return values
        present = self.sources_used(genome).astype(jnp.float32)[:, None]  # [K, 1]
        gated = {key: v * present if self._parameter(key) == "weight" else v for key, v in values.items()}
        return {**gated, "present": present}

    def gates_of(self, genome: jax.Array) -> jax.Array:
        """The gate values [K], in bounds."""
        return self._to_value(genome[-self.num_sources:], "gate")

    def sources_used(self, genome: jax.Array) -> jax.Array:
        """Which sources enter the merge [K] (bool): all without gates; else those whose gate
        is at least 1/2, the `max_sources` highest of them."""
        if not self.gates:
            return jnp.ones((self.num_sources,), bool)
        gate = self.gates_of(genome)  # [K]
        used = gate >= 0.5
        if self.max_sources is not None:
            rank = jnp.zeros((self.num_sources,), jnp.int32).at[jnp.argsort(-gate, stable=True)].set(
                jnp.arange(self.num_sources, dtype=jnp.int32))  # 0: the highest gate
            used = used & (rank < self.max_sources)
        return used

    def cost(self, genome: jax.Array) -> jax.Array:
        """What the genome's fitness loses before selection: `source_cost` per present source at
        its gate's threshold, rising to twice that at a fully open gate. The rise pulls the gates
        of sources that do not earn their price down to the threshold, where the search's samples
        cross it; a step alone leaves a converged search no sample on the other side."""
        if not self.source_cost:
            return jnp.float32(0.0)
        return self.source_cost * jnp.sum(jnp.where(self.sources_used(genome), 2.0 * self.gates_of(genome), 0.0))

    def layer_group_index(self) -> np.ndarray:
        """The group of each layer [L]: contiguous, as equal as possible."""
        return (np.arange(self.num_layers) * self.layer_groups) // self.num_layers

    @staticmethod
    def rounded(genome) -> jax.Array:
        """The genome with its values rounded to the six decimals a recipe is written with, so
        that a checkpoint merged from it is the one its recipe rebuilds."""
        return jnp.asarray(np.round(np.asarray(genome, np.float64), 6), jnp.float32)

    def plan(self, genome: jax.Array, paths) -> MergePlan:
        """The merge the genome stands for, over the Flax `paths`. Pure: jit / vmap it."""
        return MergePlan(self.method, self.options(), self.decode(genome, paths))

    def decode(self, genome: jax.Array, paths) -> dict:
        """The values of its `plan`, {path: {parameter: array}}: [K, L] for stacked paths, [K]
        otherwise, plus the fixed parameters. Pure: jit / vmap it."""
        values = self.values(genome)
        layers = jnp.asarray(self.layer_group_index())
        other = self.num_groups - 1  # the non-layer group (group 0 when there is one group)
        method = get_method(self.method)
        held = {p.name: p.default for p in method.parameters if p.name not in self.evolve}
        held.update(dict(self.fixed))
        fixed = {name: jnp.full((self.num_sources,), v, jnp.float32) if method.parameter(name).per_source
                 else jnp.float32(v) for name, v in held.items()}
        # A merge-wide parameter (slerp's t) reads its first source row's genes: one value per group.
        rows = {name: slice(None) if method.parameter(name).per_source else 0 for name in self.evolve}
        params = {}
        for path in paths:
            family = self.family_of(path)
            block = {name: values[name if family is None else f"{name}[{family}]"] for name in self.evolve}
            groups = layers if is_stacked(path) else other
            p = {name: v[rows[name], groups] for name, v in block.items()}
            params[path] = {**p, **fixed}
        return params

    def summary(self) -> dict:
        """What results.json says of the space."""
        return {"method": self.method, "layer_groups": self.layer_groups, "families": list(self.families),
                "dims": self.num_dims, "gates": self.gates,
                **({"source_cost": self.source_cost} if self.source_cost else {}),
                **({"max_sources": self.max_sources} if self.max_sources is not None else {})}

    def describe(self, genome) -> dict:
        """Plain numbers for logs and reports: {parameter: [[per group] per source]}."""
        return {name: np.asarray(v).round(4).tolist() for name, v in genome_values(self, jnp.asarray(genome)).items()}

    def group_labels(self) -> list[str]:
        """Each layer group's column title: "layers 0-7", ..., and "other" for the non-layer tensors."""
        if self.num_groups == 1:
            return ["all tensors"]
        index = self.layer_group_index()
        spans = [np.flatnonzero(index == g) for g in range(self.layer_groups)]
        return [f"layer {s[0]}" if len(s) == 1 else f"layers {s[0]}-{s[-1]}" for s in spans] + ["other"]

    def table(self, genome, source_names: list[str] | None = None) -> str:
        """The genome as a Markdown table: a row per source and parameter (a merge-wide one,
        such as slerp's t, once), a column per layer group, 3 significant digits; with gates,
        a column saying which sources are in the merge."""
        values = {k: np.asarray(v) for k, v in genome_values(self, jnp.asarray(genome)).items()}
        present = values.pop("present", None)
        names = source_names or [f"source {i}" for i in range(self.num_sources)]
        method = get_method(self.method)
        head = ["source", "parameter", *self.group_labels()] + (["in the merge"] if present is not None else [])
        lines = ["| " + " | ".join(head) + " |",
                 "|---|---|" + "---:|" * len(self.group_labels()) + ("---|" if present is not None else "")]
        for i, name in enumerate(names):
            for key, block in values.items():
                per_source = method.parameter(self._parameter(key)).per_source
                if not per_source and i:
                    continue
                cells = [name if per_source else "(all sources)", key, *(f"{v:.3g}" for v in block[i])]
                if present is not None:
                    cells.append("yes" if present[i, 0] else "no")
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def genome_values(space: GenomeSpace, genome: jax.Array) -> dict[str, jax.Array]:
    """`space.values(genome)` as one program (a search's log describes every generation's leader),
    in its order (a jitted dict comes back with its keys sorted)."""
    values = _values_program(space, genome)
    return {key: values[key] for key in (*space.keys, "present") if key in values}


@functools.partial(jax.jit, static_argnums=0)
def _values_program(space: GenomeSpace, genome: jax.Array) -> dict[str, jax.Array]:
    return space.values(genome)
