"""The data-flow-space (DFS) genome: which layer slots a token passes, and how each hop
scales its input (the paper's indicator array I and scaling matrix W).

Slots: the M stored layers (model A's, then model B's, ...) repeated r times, T = M x r.
Slot t is on when I_t > 0. The path is A's first layer, the on slots in order, A's last
layer; the first repetition's copies of those two are always off (they are the path's
fixed ends, so the initial genome, A's first repetition on, is exactly model A). A hop
from stored layer i to stored layer j multiplies its input by W[i, j] ("matrix": M x M
numbers), by 1 + f(i, j, hop) for a small tanh network f ("network", for large M), or by
nothing ("none", the paper's ablation).

`decode(genome)` -> {"layer": [H], "scale": [H], "valid": [H]} with H = T hops, padding
at the end: pure, jit- and vmap-able, the same shapes for every genome.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NETWORK_HIDDEN = 8


@dataclasses.dataclass(frozen=True)
class PathSpace:
    layers_per_model: tuple[int, ...]  # (L_A, L_B, ...): the stored layers, A's first
    repeats: int = 3
    scales: str = "matrix"  # "matrix" | "network" | "none"
    on_init: float = 1 / 3  # A's first repetition starts here (the paper: 2 sigma, sigma 1/6)
    off_init: float = 0.0  # every other slot (the paper: 0)

    def __post_init__(self):
        if self.scales not in ("matrix", "network", "none"):
            raise ValueError(f"scales must be 'matrix', 'network' or 'none', got {self.scales!r}")
        if len(self.layers_per_model) < 2 or min(self.layers_per_model) < 2:
            raise ValueError(f"a layer path needs two or more models of two or more layers, got "
                             f"{self.layers_per_model}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")

    @property
    def num_layers(self) -> int:  # M
        return sum(self.layers_per_model)

    @property
    def num_slots(self) -> int:  # T
        return self.num_layers * self.repeats

    @property
    def num_hops(self) -> int:  # H: the longest path (every slot on but the two fixed ends, plus the ends)
        return self.num_slots

    @property
    def num_scale_dims(self) -> int:
        M = self.num_layers
        return {"matrix": M * M, "network": 3 * NETWORK_HIDDEN + 2 * NETWORK_HIDDEN + 1, "none": 0}[self.scales]

    @property
    def num_dims(self) -> int:
        return self.num_slots + self.num_scale_dims

    @property
    def _fixed_ends(self) -> tuple[int, int]:
        return 0, self.layers_per_model[0] - 1  # A's first and last layer (and slot, in repetition 1)

    def initial(self) -> jax.Array:
        indicator = np.full(self.num_slots, self.off_init, np.float32)
        indicator[:self.layers_per_model[0]] = self.on_init
        scales = np.ones(self.num_scale_dims, np.float32) if self.scales == "matrix" else \
            np.zeros(self.num_scale_dims, np.float32)
        return jnp.asarray(np.concatenate([indicator, scales]))

    def _scale(self, genome, previous, layer, hop):
        M, H = self.num_layers, self.num_hops
        weights = genome[self.num_slots:]
        if self.scales == "matrix":
            return weights.reshape(M, M)[previous, layer]
        if self.scales == "none":
            return jnp.ones(layer.shape, jnp.float32)
        n = NETWORK_HIDDEN
        w1, b1 = weights[:3 * n].reshape(3, n), weights[3 * n:4 * n]
        w2, b2 = weights[4 * n:5 * n], weights[5 * n]
        features = jnp.stack([previous / M, layer / M, hop / H], axis=-1)  # [H, 3]
        return 1.0 + jnp.tanh(features @ w1 + b1) @ w2 + b2

    def decode(self, genome: jax.Array, paths=None) -> dict[str, jax.Array]:
        """{"layer": [H] int32, "scale": [H] float32, "valid": [H] bool}. (`paths` is unused;
        it keeps the signature of the parameter-space genome, so one search loop serves both.)"""
        T, M, H = self.num_slots, self.num_layers, self.num_hops
        first, last = self._fixed_ends
        slot = jnp.arange(T)
        on = (genome[:T] > 0) & (slot != first) & (slot != last)  # [T]
        order = jnp.argsort(jnp.where(on, slot, T + slot))  # on slots first, in slot order
        count = jnp.sum(on)
        hop = jnp.arange(H)
        middle = (order[jnp.clip(hop - 1, 0, T - 1)] % M).astype(jnp.int32)
        layer = jnp.where(hop == 0, first, jnp.where(hop <= count, middle, jnp.where(hop == count + 1, last, 0)))
        valid = hop <= count + 1
        previous = jnp.concatenate([jnp.zeros((1,), layer.dtype), layer[:-1]])
        scale = jnp.where(hop == 0, 1.0, self._scale(genome, previous, layer, hop))
        return {"layer": layer.astype(jnp.int32), "scale": scale.astype(jnp.float32), "valid": valid}

    def cost(self, genome: jax.Array) -> jax.Array:
        """Nothing: every path is priced by its fitness alone."""
        return jnp.float32(0.0)

    def summary(self) -> dict:
        """What results.json says of the space."""
        return {"method": "layer path (DFS)", "layers_per_model": list(self.layers_per_model),
                "repeats": self.repeats, "scales": self.scales, "dims": self.num_dims}

    def describe(self, genome) -> dict:
        """The path as plain numbers: {"path": [[stored layer, input scale], ...]}."""
        hops = jax.tree.map(np.asarray, self.decode(jnp.asarray(genome)))
        return {"path": [[int(i), round(float(s), 4)]
                         for i, s, v in zip(hops["layer"], hops["scale"], hops["valid"], strict=True) if v]}

    def layer_name(self, index: int) -> str:
        """"A3", "B0", ...: a stored layer by model letter and its layer number there."""
        for model, count in enumerate(self.layers_per_model):
            if index < count:
                return f"{chr(ord('A') + model)}{index}"
            index -= count
        raise IndexError(index)
