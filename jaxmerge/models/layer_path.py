"""A layer-path model: data-flow-space (DFS) merging's network, in Flax NNX.

The transformer layers of several models with the same layer shapes are stacked as one
layer pytree [M, ...]; a token's path through them is a padded sequence of hops, each hop
one stored layer applied to the hidden state times the hop's input scale:

    x = embed(ids);  for each valid hop h:  x = layers[hop_layer[h]](x * hop_scale[h])
    logits = head(norm(x))

The hops are data (nnx Variables of type `Hops`, not structure): `lax.scan` runs over
all `num_hops` slots and a slot whose `hop_valid` is false passes the state through
(`lax.cond`: skipped at run time unless vmapped), so a new path or new scales never
recompile. Each hop has its own KV-cache entry (a layer
used twice attends to two different key/value histories, as in the reference).
Embeddings, final norm and head are model A's (its tokenizer too). A hop runs its stored
layer as that layer ran in its model: a sliding layer of Gemma slides on any hop.
Axis names: B batch, T tokens, S cache length, H hops, M stored layers, D hidden size.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.modules import Embedding, Linear, causal_mask
from jaxmerge.models.transformer import (
    KVCache,
    Transformer,
    embed,
    final_norm,
    output_logits,
    positions_from_mask,
    stacked_blocks,
)


class Hops(nnx.Variable):
    """A layer path's per-hop data (never a merge or training parameter)."""


@dataclasses.dataclass(frozen=True)
class LayerPathConfig:
    text: TransformerConfig  # model A's, with num_layers = M stored layers (and their layer_types)
    num_hops: int  # the padded path length H (the longest path a search may produce)
    text_model_type: str = "mistral"  # the layers' architecture: an HF model_type ("mistral", "qwen2", ...)
    # A saved model's path, (stored layer, input scale) per hop; None while a search sets the hops as data.
    path: tuple[tuple[int, float], ...] | None = None

    @property
    def num_layers(self) -> int:  # what PS merging and DFS see: the stored layers
        return self.text.num_layers


def hops_of_config(config: LayerPathConfig) -> dict[str, jax.Array]:
    """The hop arrays of a config's path (all padding when it names none)."""
    H, path = config.num_hops, list(config.path or ())
    layer = [i for i, _ in path] + [0] * (H - len(path))
    scale = [s for _, s in path] + [1.0] * (H - len(path))
    valid = [True] * len(path) + [False] * (H - len(path))
    return {"hop_layer": jnp.asarray(layer, jnp.int32), "hop_scale": jnp.asarray(scale, jnp.float32),
            "hop_valid": jnp.asarray(valid, bool)}


class LayerPathTransformer(nnx.Module):
    """`model(input_ids)` -> logits [B, T, V], through the hops' path."""

    def __init__(self, config: LayerPathConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config.text
        self.config = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = stacked_blocks(c, dtype, rngs)  # [M, ...]
        self.norm = final_norm(c, dtype)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.hidden_size, c.vocab_size, bias=False,
                                                                 dtype=dtype, rngs=rngs)
        hops = hops_of_config(config)
        self.hop_layer = Hops(hops["hop_layer"])  # [H] index into the stored layers
        self.hop_scale = Hops(hops["hop_scale"])  # [H] input scale
        self.hop_valid = Hops(hops["hop_valid"])  # [H] false: the slot is padding

    @property
    def dtype(self):
        return self.embed_tokens.weight[...].dtype

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 logits_last: int | None = None) -> jax.Array:
        B, T = input_ids.shape
        self.config.text.check_token_ids(input_ids)  # NaN logits otherwise (concrete ids only)
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        mask = causal_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), attention_mask)
        logits, _ = self.forward(input_ids, positions_from_mask(attention_mask), mask, logits_last=logits_last)
        return logits

    def forward(self, input_ids, positions, mask, kv_cache: KVCache | None = None, cache_index=0,
                inputs_embeds=None, logits_last: int | None = None, layers: None = None):
        """layers: None only (`split_layers` has nothing to split: the hops pick layers by data);
        accepted so that a VLM passes its language model's split layers whatever they are."""
        if layers is not None:
            raise ValueError("a layer path's layers are picked by its hops: they cannot be split")
        c = self.config.text
        x = embed(self.embed_tokens, input_ids, c) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        graphdef, stored = nnx.split(self.layers)
        sliding = jnp.asarray(c.sliding_layers)  # [M] per stored layer

        def hop(x, inputs):
            index, scale, valid, cache = inputs

            def run(x, cache):
                params = jax.tree.map(lambda p: p[index], stored)  # one stored layer
                return nnx.merge(graphdef, params)(x * scale.astype(x.dtype), positions, mask, cache, cache_index,
                                                   sliding[index])

            # A padding hop passes through without computing (unless vmapped: then both run, one is kept).
            return jax.lax.cond(valid, run, lambda x, cache: (x, cache), x, cache)

        hops = (self.hop_layer[...], self.hop_scale[...], self.hop_valid[...], kv_cache)
        x, kv_cache = jax.lax.scan(hop, x, hops)
        x = x if logits_last is None else x[:, -logits_last:]  # the head only where logits are read
        return output_logits(self.norm(x), self.embed_tokens, self.lm_head, c), kv_cache

    def split_layers(self) -> None:
        """None: a layer path picks its layers by data (the evolved hops), so they stay stacked."""
        return None

    def init_cache(self, batch_size: int, length: int) -> KVCache:
        c = self.config.text
        shape = (self.config.num_hops, batch_size, length, c.num_kv_heads, c.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    @property
    def path(self) -> list[tuple[int, float]]:
        """The valid hops as (stored layer, input scale), in order."""
        hops = zip(self.hop_layer[...], self.hop_scale[...], self.hop_valid[...], strict=True)
        return [(int(i), float(s)) for i, s, v in hops if v]


class LayerPool(NamedTuple):
    layers: nnx.State  # the stored layers [M, ...]
    layer_types: tuple[str, ...] | None  # per stored layer (None: all alike, as the first model's config says)


def layer_pool(models: list[Transformer]) -> LayerPool:
    """The stored layers of `models`, stacked in order: A's layers, then B's, ... [M, ...].
    The models must agree on everything a layer computes but its type: where layers have
    types (Gemma, Qwen), each stored layer keeps its own (sliding or global); where every
    layer of a model is alike (Mistral, Llama), the attention window, a mask and not a
    weight, is A's for every hop."""
    first = models[0].config
    per_layer = any(m.config.layer_types is not None for m in models)
    not_compared = {"vocab_size", "num_layers", "layer_types", "tie_word_embeddings", "final_logit_softcap",
                    "scale_embeddings", "max_position_embeddings"} | (set() if per_layer else {"sliding_window"})
    for i, m in enumerate(models[1:], 1):
        c = m.config
        differ = [f.name for f in dataclasses.fields(c)
                  if f.name not in not_compared and getattr(c, f.name) != getattr(first, f.name)]
        if differ:
            raise ValueError(f"model {i}'s layers differ from model 0's in {', '.join(differ)}: "
                             "a layer path needs layers of one shape and kind")
    states = [nnx.state(m.layers) for m in models]
    types = None
    if per_layer:
        types = tuple("sliding_attention" if s else "full_attention" for m in models for s in m.config.sliding_layers)
    return LayerPool(jax.tree.map(lambda *xs: jnp.concatenate(xs), *states), types)


def path_model(a: Transformer, pool: LayerPool, num_hops: int, text_model_type: str = "mistral"
               ) -> LayerPathTransformer:
    """A layer-path model with A's embeddings, norm and head over the stored layers `pool`
    (from `layer_pool`), its hops all padding until set with `with_hops`."""
    num_layers = jax.tree.leaves(pool.layers)[0].shape[0]
    config = LayerPathConfig(dataclasses.replace(a.config, num_layers=num_layers, layer_types=pool.layer_types),
                             num_hops, text_model_type)
    model = nnx.eval_shape(lambda: LayerPathTransformer(config, dtype=a.dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    source = nnx.state(a)
    for name in ("embed_tokens", "norm") + (("lm_head",) if a.lm_head is not None else ()):
        state[name] = source[name]
    state["layers"] = pool.layers
    H = num_hops
    state["hop_layer"] = Hops(jnp.zeros((H,), jnp.int32))
    state["hop_scale"] = Hops(jnp.ones((H,), jnp.float32))
    state["hop_valid"] = Hops(jnp.zeros((H,), bool))
    return nnx.merge(graphdef, state)


def compact_path(model: LayerPathTransformer) -> LayerPathTransformer:
    """The model as it is saved: only the stored layers its valid hops use (in first-use
    order), exactly as many hops as the path has, and the path in the config."""
    path = model.path
    used = list(dict.fromkeys(i for i, _ in path))
    renumber = {layer: new for new, layer in enumerate(used)}
    types = model.config.text.layer_types
    text = dataclasses.replace(model.config.text, num_layers=len(used),
                               layer_types=None if types is None else tuple(types[i] for i in used))
    config = dataclasses.replace(model.config, text=text, num_hops=len(path),
                                 path=tuple((renumber[i], s) for i, s in path))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LayerPathTransformer(config, dtype=model.dtype,
                                                                              rngs=nnx.Rngs(0))))
    source = nnx.state(model)
    for name in ("embed_tokens", "norm") + (("lm_head",) if model.lm_head is not None else ()):
        state[name] = source[name]
    index = jnp.asarray(used)
    state["layers"] = jax.tree.map(lambda p: p[index], source["layers"])
    for name, value in hops_of_config(config).items():
        state[name] = Hops(value)
    return nnx.merge(graphdef, state)


def split_hops(model: nnx.Module):
    """(graphdef, state without the hops, rebuild): rebuild(state, layer, scale, valid) is
    `model` (or a module holding one layer path, such as a VLM) on another path, built from
    fresh hop arrays (never by mutation, so it works at any trace level: jit, vmap, map)."""
    graphdef, hops, rest = nnx.split(model, Hops, ...)
    treedef = jax.tree.structure(hops)
    if treedef.num_leaves != 3:
        raise ValueError(f"expected one layer path in {type(model).__name__}, found {treedef.num_leaves} hop arrays")

    def rebuild(state, layer, scale, valid):  # the leaves sort as hop_layer, hop_scale, hop_valid
        fresh = jax.tree.unflatten(treedef, [jnp.asarray(layer, jnp.int32), jnp.asarray(scale, jnp.float32),
                                             jnp.asarray(valid, bool)])
        return nnx.merge(graphdef, fresh, state)
    return graphdef, rest, rebuild


def with_hops(model: nnx.Module, layer, scale, valid) -> nnx.Module:
    """A copy of the model (or of a module holding one layer path) on another path:
    layer [H] int, scale [H], valid [H] bool. Pure (jit it)."""
    _, rest, rebuild = split_hops(model)
    return rebuild(rest, layer, scale, valid)
