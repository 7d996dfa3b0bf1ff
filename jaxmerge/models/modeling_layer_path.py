"""A layer-path (DFS-merged) Mistral or Llama model for transformers: saved by jaxmerge
beside the weights, opened with `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`. Standalone on purpose (imports only torch and transformers).

The checkpoint stores each layer the path uses once (`model.stored_layers.{i}`); the
config gives the path: `layer_path` (a stored layer per hop) and `layer_scales` (the
factor each hop multiplies its input by). `num_hidden_layers` is the number of hops, so
the KV cache holds one entry per hop (a layer used twice keeps two histories).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM


class _Hop:
    """One hop: a stored layer (not registered again, so its weights have one name) fed
    hidden * scale, with the KV-cache slot of this hop."""

    def __init__(self, layer: torch.nn.Module, hop: int, scale: float):
        self.layer, self.hop, self.scale = layer, hop, scale

    def __call__(self, hidden_states, *args, **kwargs):
        self.layer.self_attn.layer_idx = self.hop
        return self.layer(hidden_states * self.scale, *args, **kwargs)


def _path_init(self, config, base_class):
    hops = config.num_hidden_layers
    if len(config.layer_path) != hops or len(config.layer_scales) != hops:
        raise ValueError(f"layer_path ({len(config.layer_path)}) and layer_scales ({len(config.layer_scales)}) "
                         f"must both have num_hidden_layers = {hops} entries")
    config.num_hidden_layers = config.num_stored_layers  # build the stored layers
    base_class.__init__(self, config)
    config.num_hidden_layers = hops
    stored = self.model.layers
    del self.model.layers
    self.model.stored_layers = stored
    self.model.layers = [_Hop(stored[i], h, float(s)) for h, (i, s) in enumerate(zip(config.layer_path,
                                                                                      config.layer_scales))]


class _PathFields:
    """The path's config fields, before the base config's own."""

    def __init__(self, layer_path=(), layer_scales=(), num_stored_layers=0, **kwargs):
        self.layer_path, self.layer_scales = list(layer_path), list(layer_scales)
        self.num_stored_layers = num_stored_layers
        super().__init__(**kwargs)


class LayerPathMistralConfig(_PathFields, MistralConfig):
    model_type = "layer_path_mistral"


class LayerPathLlamaConfig(_PathFields, LlamaConfig):
    model_type = "layer_path_llama"


class LayerPathMistralForCausalLM(MistralForCausalLM):
    config_class = LayerPathMistralConfig

    def __init__(self, config):
        _path_init(self, config, MistralForCausalLM)


class LayerPathLlamaForCausalLM(LlamaForCausalLM):
    config_class = LayerPathLlamaConfig

    def __init__(self, config):
        _path_init(self, config, LlamaForCausalLM)
