"""A layer-path (DFS-merged) model for transformers: saved by jaxmerge beside the weights,
opened with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
Standalone on purpose (imports only torch and transformers). Families: Mistral, Llama,
Qwen2, Qwen3, Gemma2, Gemma3 (text), Phi3. Written for transformers 5 (its dataclass
configs, and model loops that take a layer's type from `config.layer_types[i]`).

The checkpoint stores each layer the path uses once (`model.stored_layers.{i}`); the
config gives the path: `layer_path` (a stored layer per hop) and `layer_scales` (the
factor each hop multiplies its input by). `num_hidden_layers` is the number of hops, so
the KV cache holds one entry per hop (a layer used twice keeps two histories).

Layer types (sliding-window or full attention; Gemma3 also picks the RoPE by type): a
hop runs its stored layer as that layer ran in its model. `stored_layer_types` has one
entry per stored layer, `layer_types` one per hop (the type of the stored layer the hop
runs), so everything the family reads per layer index i, `config.layer_types[i]` in the
model's loop (mask, RoPE) and in the KV cache (a sliding cache per sliding hop), is the
hop's. The stored layers are built with the stored types (an attention layer keeps its
sliding window from construction). Either list may be absent: the per-hop list is
derived from the stored one and the path, the stored one from the per-hop one, and
with neither the family derives the stored layers' types as it does for an ordinary
model of `num_stored_layers` layers (e.g. Qwen2's max_window_layers). Families with no
layer types (Mistral, Llama, Phi3) need neither.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


class _Hop:
    """One hop: a stored layer (not registered again, so its weights have one name) fed
    hidden * scale, with the KV-cache slot of this hop. Any other attribute a model's
    loop reads off its decoder layer is the stored layer's (the hop has its type)."""

    def __init__(self, layer: torch.nn.Module, hop: int, scale: float, attention_type: str | None):
        self.layer, self.hop, self.scale = layer, hop, scale
        if attention_type is not None:
            self.attention_type = attention_type  # the per-layer type, as older model loops read it

    def __getattr__(self, name):
        if name == "layer":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __call__(self, hidden_states, *args, **kwargs):
        self.layer.self_attn.layer_idx = self.hop  # the cache slot the attention reads and writes
        if hasattr(self.layer, "layer_idx"):  # Gemma3's decoder layer keeps one too
            self.layer.layer_idx = self.hop
        return self.layer(hidden_states * self.scale, *args, **kwargs)


def _path_init(self, config, base_class):
    hops, hop_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    stored_types = getattr(config, "stored_layer_types", None)
    if len(config.layer_path) != hops or len(config.layer_scales) != hops:
        raise ValueError(f"layer_path ({len(config.layer_path)}) and layer_scales ({len(config.layer_scales)}) "
                         f"must both have num_hidden_layers = {hops} entries")
    if hop_types is not None and (stored_types is None or len(stored_types) != config.num_stored_layers):
        raise ValueError(f"stored_layer_types must give the type of each of the {config.num_stored_layers} stored "
                         f"layers, got {stored_types}")
    # Build the stored layers as the layers of an ordinary model of num_stored_layers layers
    # (an attention layer reads its type, hence its sliding window, from layer_types[layer_idx]).
    config.num_hidden_layers = config.num_stored_layers
    if hop_types is not None:
        config.layer_types = list(stored_types)
    try:
        base_class.__init__(self, config)
    finally:
        config.num_hidden_layers = hops
        if hop_types is not None:
            config.layer_types = hop_types
    stored = self.model.layers
    del self.model.layers
    self.model.stored_layers = stored
    types = hop_types if hop_types is not None else [None] * hops
    self.model.layers = [_Hop(stored[i], h, float(s), t)
                         for h, (i, s, t) in enumerate(zip(config.layer_path, config.layer_scales, types, strict=True))]
    if hasattr(self.model, "has_sliding_layers"):  # Qwen2/3 build a sliding mask only when a hop slides
        self.model.has_sliding_layers = "sliding_attention" in (hop_types or ())


def _resolve_path(config, kwargs: dict, base_post_init) -> None:
    """Sets the path's fields from `kwargs` (popped), and `layer_types` per hop and
    `stored_layer_types` per stored layer, running the family's own `__post_init__` as for
    an ordinary model of the stored layers."""
    hops = config.num_hidden_layers
    path = kwargs.pop("layer_path", None)
    scales = kwargs.pop("layer_scales", None)
    num_stored = kwargs.pop("num_stored_layers", None)
    stored_types = kwargs.pop("stored_layer_types", None)
    hop_types = kwargs.pop("layer_types", None)  # families with no layer_types field get it here
    if hop_types is None:
        hop_types = getattr(config, "layer_types", None)
    if path is None:  # a config made with no path (e.g. transformers' defaults): the identity path
        path = list(range(hops))
    path = [int(i) for i in path]
    scales = [1.0] * len(path) if scales is None else [float(s) for s in scales]
    if num_stored is None:
        num_stored = max(path, default=-1) + 1
    _check_path(path, scales, num_stored, hops, hop_types)
    stored_types = _stored_types(stored_types, hop_types, path, num_stored)

    # The family's own post-init, as for a model of the stored layers (its layer_types then is
    # the stored layers', given or derived by the family's rule).
    config.num_hidden_layers = num_stored
    if stored_types is not None or "layer_types" in getattr(config, "__dataclass_fields__", {}):
        config.layer_types = None if stored_types is None else list(stored_types)
    base_post_init(**kwargs)
    stored_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = hops
    config.layer_path, config.layer_scales, config.num_stored_layers = path, scales, num_stored
    if stored_types is not None:
        per_hop = [stored_types[i] for i in path]
        if hop_types is not None and list(hop_types) != per_hop:
            raise ValueError(f"layer_types {list(hop_types)} (per hop) is not the types of the stored layers "
                             f"the hops run: {per_hop} (stored_layer_types {list(stored_types)}, path {path})")
        config.stored_layer_types = list(stored_types)
        config.layer_types = per_hop


def _check_path(path: list[int], scales: list[float], num_stored: int, hops: int, hop_types) -> None:
    """One layer, scale (and type, if given) per hop; every hop's layer one of the stored ones."""
    if len(path) != hops or len(scales) != hops:
        raise ValueError(f"layer_path ({len(path)}) and layer_scales ({len(scales)}) must both have "
                         f"num_hidden_layers = {hops} entries")
    if any(not 0 <= i < num_stored for i in path):
        raise ValueError(f"layer_path {path} names a layer outside the {num_stored} stored layers")
    if hop_types is not None and len(hop_types) != hops:
        raise ValueError(f"layer_types has {len(hop_types)} entries, one per hop wanted ({hops})")


def _stored_types(stored_types, hop_types, path: list[int], num_stored: int):
    """The stored layers' types as given, else (when the hops have types) the type of a hop
    that runs each; checked to be one per stored layer."""
    if stored_types is None and hop_types is not None:
        stored_types = ["full_attention"] * num_stored  # a stored layer no hop runs: any type
        for h, i in enumerate(path):
            stored_types[i] = hop_types[h]
    if stored_types is not None and len(stored_types) != num_stored:
        raise ValueError(f"stored_layer_types has {len(stored_types)} entries, "
                         f"num_stored_layers = {num_stored} wanted")
    return stored_types


class _PathFields:
    """The path's config fields (`layer_path`, `layer_scales`, `num_stored_layers`,
    `stored_layer_types`), read before the family's own config is set up."""

    def __post_init__(self, **kwargs):  # transformers' dataclass configs pass keys that are not fields here
        _resolve_path(self, kwargs, super().__post_init__)


class LayerPathMistralConfig(_PathFields, MistralConfig):
    model_type = "layer_path_mistral"


class LayerPathLlamaConfig(_PathFields, LlamaConfig):
    model_type = "layer_path_llama"


class LayerPathQwen2Config(_PathFields, Qwen2Config):
    model_type = "layer_path_qwen2"


class LayerPathQwen3Config(_PathFields, Qwen3Config):
    model_type = "layer_path_qwen3"


class LayerPathGemma2Config(_PathFields, Gemma2Config):
    model_type = "layer_path_gemma2"


class LayerPathGemma3Config(_PathFields, Gemma3TextConfig):
    model_type = "layer_path_gemma3_text"


class LayerPathPhi3Config(_PathFields, Phi3Config):
    model_type = "layer_path_phi3"


class LayerPathMistralForCausalLM(MistralForCausalLM):
    config_class = LayerPathMistralConfig

    def __init__(self, config):
        _path_init(self, config, MistralForCausalLM)


class LayerPathLlamaForCausalLM(LlamaForCausalLM):
    config_class = LayerPathLlamaConfig

    def __init__(self, config):
        _path_init(self, config, LlamaForCausalLM)


class LayerPathQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = LayerPathQwen2Config

    def __init__(self, config):
        _path_init(self, config, Qwen2ForCausalLM)


class LayerPathQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = LayerPathQwen3Config

    def __init__(self, config):
        _path_init(self, config, Qwen3ForCausalLM)


class LayerPathGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = LayerPathGemma2Config

    def __init__(self, config):
        _path_init(self, config, Gemma2ForCausalLM)


class LayerPathGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = LayerPathGemma3Config

    def __init__(self, config):
        _path_init(self, config, Gemma3ForCausalLM)


class LayerPathPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = LayerPathPhi3Config

    def __init__(self, config):
        _path_init(self, config, Phi3ForCausalLM)
