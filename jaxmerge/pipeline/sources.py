"""The models a run merges, loaded once: the sources (a VLM's language model in its place),
the base, the VLM hosting the merge if there is one, and the tokenizer; the sources as one
stack, in device memory (`load_sources`) or in host memory (`load_pool`, for a source pool),
each source's own arrays let go once the stack holds them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmerge import checkpoint
from jaxmerge.merge import flat_params
from jaxmerge.merge.tree import align_source, with_language_model_params, with_params
from jaxmerge.models.interfaces import CausalLM, VisionLanguageModel, language_model
from jaxmerge.parallel import Layout
from jaxmerge.pipeline.config import EvolveConfig, is_vlm_config
from jaxmerge.search.pool import source_axis, stack_in_host_memory


@dataclasses.dataclass(eq=False)
class Sources:
    """The loaded models: the language models merged (a VLM's in its place), the base, the
    VLM hosting the merge if there is one, and the tokenizer."""
    models: list[CausalLM]
    base: CausalLM
    names: list[str]
    paths: list[str]
    base_path: str
    host: VisionLanguageModel | None
    host_index: int | None
    tokenizer: object
    # The stacked sources (`stack_sources`'s layout; numpy arrays for a pool in host memory,
    # `load_pool`), and the models whose own arrays were let go for their rows there
    # ({index: {path: dtype}}; see `model`).
    stack: dict[str, np.ndarray | jax.Array] | None = None
    hollow: dict[int, dict] = dataclasses.field(default_factory=dict)

    def model(self, index: int) -> CausalLM:
        """Source `index`'s language model (one whose arrays went, rebuilt from its stack row)."""
        if index not in self.hollow:
            return self.models[index]
        dtypes = self.hollow[index]
        return with_params(self.models[index], {p: stack_row(x, index, source_axis(p)).astype(dtypes[p])
                                                for p, x in self.stack.items()})

    def scored_as_source(self, index: int):
        """Source `index` as the table scores it: an LLM in the VLM's place when there is one."""
        if self.host is None or index == self.host_index:
            return self.host if index == self.host_index else self.model(index)
        return with_language_model_params(self.host, flat_params(self.model(index)))

    def partner(self) -> int:
        """PS+DFS's model B by default: the first source that is not the VLM."""
        return next(i for i in range(len(self.models)) if i != self.host_index)

    def recipe_sources(self) -> list[str]:
        return [f"{p} (language model)" if i == self.host_index else p for i, p in enumerate(self.paths)]


def default_layout(layout: str | None) -> Layout | None:
    """The configured layout, or every device on the population axis when there are several."""
    if layout is not None:
        return Layout.parse(layout)
    return Layout(jax.device_count(), 1) if jax.device_count() > 1 else None


def vlm_index(config: EvolveConfig) -> int | None:
    """Which source is a VLM (from its config.json), if one is."""
    return next((i for i, m in enumerate(config.genome.models) if is_vlm_config(checkpoint.read_config(Path(m)))), None)


def tokenizer_dir(config: EvolveConfig) -> str:
    """The tokenizer's checkpoint: tokenizer_source, else the VLM's (its image token), else the base's (no base:
    the first model's)."""
    host = vlm_index(config)
    return config.genome.tokenizer_source or (config.genome.models[host] if host is not None
                                              else config.genome.base_model or config.genome.models[0])


def in_host_memory() -> contextlib.AbstractContextManager:
    """Arrays made inside go to host memory (the CPU backend): a pool's sources."""
    return jax.default_device(jax.devices("cpu")[0])


def stack_row(x, index: int, axis: int):
    """Source `index`'s row of a stacked array: taken where the array is (a device array's on
    its device, a pool's numpy array in host memory)."""
    if isinstance(x, jax.Array):
        return _row(x, index, axis)
    return jnp.asarray(np.take(x, index, axis))


@functools.partial(jax.jit, static_argnums=2)
def _row(x: jax.Array, index, axis: int) -> jax.Array:  # one program per shape, whichever row
    return jax.lax.dynamic_index_in_dim(x, index, axis, keepdims=False)


def hollowable(flat: dict, base_flat: dict) -> bool:
    """Whether a source's stack row is its own parameters: the base's paths and shapes (no
    vocabulary aligned), so that its model can let its arrays go (`hollowed`)."""
    return set(flat) == set(base_flat) and all(flat[p].shape == base_flat[p].shape for p in base_flat)


def load_sources(config: EvolveConfig, load, tokenizer) -> Sources:
    """The base and the sources, the sources stacked in device memory (`stack_sources`): each
    stacked path's source arrays let go as it is stacked and the models hollowed (rebuilt
    from their rows by `Sources.model`), so that the sources are held once, not twice. A
    VLM's language model, and a source whose vocabulary was aligned, keep their own arrays."""
    genome = config.genome
    base = load(genome.base_model)
    base_flat = flat_params(base)
    models, flats, hollow, host, host_index = [], [], {}, None, None
    for i, path in enumerate(genome.models):
        loaded = load(path)
        if isinstance(loaded, VisionLanguageModel) and host is None:
            host, host_index = loaded, i
        lm = language_model(loaded)
        flat = flat_params(lm)
        if i != host_index and hollowable(flat, base_flat):
            hollow[i] = {p: flat[p].dtype for p in base_flat}
            lm = hollowed(lm)
        models.append(lm)
        flats.append(align_source(base_flat, flat, i))
        del loaded, lm, flat
    stack = {}
    for path in sorted(base_flat):  # the last references to each path's source arrays popped as it is stacked
        stack[path] = jnp.stack([flat.pop(path) for flat in flats], axis=source_axis(path))
    return Sources(models, base, list(genome.source_names()), list(genome.models), genome.base_model, host,
                   host_index, tokenizer, stack=stack, hollow=hollow)


def hollowed(model):
    """`model` without its parameters' arrays (their shapes and dtypes kept)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    hollow = nnx.merge(graphdef, abstract, rest)
    hollow.origin = model.origin
    return hollow


def load_pool(config: EvolveConfig, load, tokenizer) -> Sources:
    """`load_sources` for a pool in host memory (`search.sources_on_host`): the sources loaded
    one at a time (unsharded, the CPU backend) into one stack (`Sources.stack`), each source's
    own arrays let go once its row holds them (its vocabulary the base's; a VLM's language
    model stays in its VLM), so host memory holds the pool once."""
    genome = config.genome
    base = load(genome.base_model)
    base_flat = flat_params(base)
    models, hollow, host, host_index = [], {}, None, None

    def rows():
        nonlocal host, host_index
        for i, path in enumerate(genome.models):
            with in_host_memory():
                loaded = load(path, sharding=None)
            if isinstance(loaded, VisionLanguageModel) and host is None:
                host, host_index = loaded, i
            lm = language_model(loaded)
            flat = flat_params(lm)
            yield flat
            if i != host_index and hollowable(flat, base_flat):
                hollow[i] = {p: flat[p].dtype for p in base_flat}
                lm = hollowed(lm)
            models.append(lm)

    with in_host_memory():
        stack = stack_in_host_memory(base_flat, rows(), len(genome.models))
    return Sources(models, base, list(genome.source_names()), list(genome.models), genome.base_model, host,
                   host_index, tokenizer, stack=stack, hollow=hollow)


def processor_for(config: EvolveConfig):
    """The VLM's transformers processor, where image rows are read from files."""
    from jaxmerge.eval.data import DataSource

    host = vlm_index(config)
    if host is None or not any(isinstance(getattr(t, s), DataSource) for t in config.tasks
                               for s in ("fitness", "validation", "test")):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(config.genome.models[host])


def loader(config: EvolveConfig, layout: Layout | None):
    """`jaxmerge.load` as the run loads every model: in the configured dtype, sharded over the
    layout's model axis if it has one."""
    genome = config.genome
    return functools.partial(checkpoint.load, dtype=genome.dtype, allow_non_finite=genome.allow_non_finite,
                             sharding=layout.mesh() if layout is not None and layout.model > 1 else None)


def load_models(config: EvolveConfig, layout: Layout | None, tokenizer) -> Sources:
    """The run's base and sources (`loader`); as a pool in host memory with `search.sources_on_host`."""
    return (load_pool if config.search.sources_on_host else load_sources)(config, loader(config, layout), tokenizer)
