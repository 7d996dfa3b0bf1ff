"""Devices and hosts: a mesh with a population axis and a model axis.

    layout = Layout(population=8, model=1)   # small models: replicate them, split the population
    layout = Layout(population=1, model=8)   # 7B models: shard every parameter, candidates in turn
    mesh = layout.mesh()                     # jax.sharding.Mesh over all devices of all hosts

`run_search(..., config=SearchConfig(layout=...))` evaluates each generation's population
on the mesh: its candidates split over the "population" axis (`shard_map`), every array of
the models and merge statistics sharded over the "model" axis on its largest dimension
that divides evenly (FSDP-like: XLA gathers what a step needs), replicated otherwise.
`jaxmerge.plan` (`jaxmerge plan`) measures which layouts fit the devices' memory.
Multi-host (TPU pods, several GPU hosts): call `initialize()` first in every process;
everything else is the same program on every host.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

POPULATION, MODEL = "population", "model"

# Memory per device, GiB (what a plan compares against). TPU v4: one device per chip (v4-8 has 4).
DEVICE_MEMORY_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "a100-40": 40, "a100-80": 80, "h100": 80,
                     "h200": 141, "cpu": 16}


@dataclasses.dataclass(frozen=True)
class Layout:
    population: int = 1  # devices the population is split over
    model: int = 1  # devices every parameter is sharded over

    def __post_init__(self):
        if self.population < 1 or self.model < 1:
            raise ValueError(f"layout axes must be positive, got population={self.population}, model={self.model}")

    @property
    def devices(self) -> int:
        return self.population * self.model

    def mesh(self, devices=None) -> Mesh:
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) < self.devices:
            raise ValueError(f"layout population={self.population} x model={self.model} needs {self.devices} "
                             f"devices; {len(devices)} available")
        return Mesh(np.array(devices[:self.devices]).reshape(self.population, self.model), (POPULATION, MODEL))

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """"8x1" (population x model), as the command lines take it."""
        try:
            population, model = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"layout {text!r} is not POPULATIONxMODEL, e.g. 8x1 or 1x8") from None
        return cls(population, model)

    def __str__(self):
        return f"{self.population}x{self.model}"


def model_spec(shape: tuple[int, ...], model_devices: int) -> P:
    """Shard an array over the model axis on its largest dimension that divides evenly
    (ties: the later dimension, the output side of a kernel); replicate small ones."""
    if model_devices == 1 or not shape:
        return P()
    choices = [(size, axis) for axis, size in enumerate(shape) if size % model_devices == 0 and size >= model_devices]
    if not choices:
        return P()
    _, axis = max(choices)
    return P(*([None] * axis + [MODEL]))


def shard_data(data, mesh: Mesh):
    """Places a pytree of arrays on the mesh: sharded over the model axis (see model_spec),
    replicated over the population axis. Works across hosts: every process passes the
    same values and keeps only its devices' parts."""
    model_devices = mesh.shape[MODEL]

    def place(x):
        if not hasattr(x, "shape"):
            return x
        sharding = NamedSharding(mesh, model_spec(tuple(x.shape), model_devices))
        return global_array(x, sharding)
    return jax.tree.map(place, data)


def global_array(x, sharding: NamedSharding) -> jax.Array:
    """An array with `sharding` from a value every process holds whole."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(x))
        return jax.random.wrap_key_data(global_array(data, NamedSharding(sharding.mesh, P(*sharding.spec, None))),
                                        impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def initialize() -> None:
    """Joins the processes of a multi-host run (before any other JAX call). On TPU pods
    and in SLURM/Open MPI jobs JAX finds the coordinator itself; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. On CPUs, collectives
    across processes go through gloo."""
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def is_primary() -> bool:
    """The process that writes logs and results (checkpoints: every process takes part)."""
    return jax.process_index() == 0
