"""Layer-path (DFS-merged) models: one architecture over each shipped text family's layers.

The stored layers are saved under model.stored_layers.{i}, the path (a stored layer and a
scale per hop) in config.json, and a PyTorch modeling file beside the weights, which
transformers opens with trust_remote_code.
"""

from __future__ import annotations

from jaxmerge.architectures.config_fields import integer, number, require
from jaxmerge.architectures.decoders import causal_lm_key, text_sizes
from jaxmerge.architectures.registry import Architecture, ParamPath, architecture_by_name, register_architecture
from jaxmerge.errors import CheckpointError
from jaxmerge.models.layer_path import LayerPathConfig, LayerPathTransformer, hops_of_config

LAYER_PATH_MODELING_FILE = "modeling_layer_path.py"


def layer_path_architecture(text_architecture: str) -> str:
    """The layer-path architecture over one family's layers: "Qwen2ForCausalLM" -> "LayerPathQwen2ForCausalLM"."""
    return "LayerPath" + text_architecture


def _layer_path_config(hf: dict, source: str, *, text_architecture: str) -> LayerPathConfig:
    require(hf, ("layer_path", "layer_scales", "num_stored_layers"), source)
    path, scales = hf["layer_path"], hf["layer_scales"]
    stored = integer(hf["num_stored_layers"], "num_stored_layers", source)
    for name, value in (("layer_path", path), ("layer_scales", scales)):
        if not isinstance(value, list):
            raise CheckpointError(f"{source}: {name} must be a list, got {value!r}")
    if len(path) != len(scales) or not path:
        raise CheckpointError(f"{source}: layer_path ({len(path)} hops) and layer_scales ({len(scales)}) must be "
                              "non-empty and of one length")
    for i in path:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < stored:
            raise CheckpointError(f"{source}: layer_path holds {i!r}, not a stored layer (0..{stored - 1})")
    scales = [number(x, "layer_scales", source, positive=False) for x in scales]
    # layer_types is per hop (what transformers' cache and masks read); stored_layer_types per stored layer.
    text_arch = architecture_by_name(text_architecture)
    text = text_arch.parse_config({**hf, "num_hidden_layers": stored, "layer_types": hf.get("stored_layer_types")},
                                  source)
    return LayerPathConfig(text, num_hops=len(path), text_model_type=text_arch.model_type,
                           path=tuple(zip(path, scales, strict=True)))


def _layer_path_hf_config(config: LayerPathConfig, *, text_architecture: str) -> dict:
    if config.path is None or len(config.path) != config.num_hops:
        raise ValueError("save a layer-path model after compact_path(model): its config must name every hop")
    name = layer_path_architecture(text_architecture)
    text_arch = architecture_by_name(text_architecture)
    fields = text_arch.to_hf_config(config.text)
    stored_types = fields.pop("layer_types", None)
    family = name.removeprefix("LayerPath").removesuffix("ForCausalLM")
    fields.update(architectures=[name], model_type=f"layer_path_{text_arch.model_type}",
                  num_hidden_layers=config.num_hops, num_stored_layers=config.text.num_layers,
                  layer_path=[i for i, _ in config.path], layer_scales=[s for _, s in config.path],
                  auto_map={"AutoConfig": f"modeling_layer_path.LayerPath{family}Config",
                            "AutoModelForCausalLM": f"modeling_layer_path.{name}"})
    if stored_types is not None:
        fields.update(stored_layer_types=stored_types, layer_types=[stored_types[i] for i, _ in config.path])
    return fields


def _layer_path_key(path: ParamPath) -> str:
    return causal_lm_key(path).replace("model.layers.", "model.stored_layers.", 1)


def _layer_path_sizes(hf: dict):
    return text_sizes(hf, layers_field="num_stored_layers", layers="stored_layers")


def _layer_path(text_architecture: str) -> Architecture:
    """The layer-path architecture over a registered text family, which modeling_layer_path.py must
    also know (it subclasses the family's transformers class)."""
    return Architecture(
        name=layer_path_architecture(text_architecture),
        model_type=f"layer_path_{architecture_by_name(text_architecture).model_type}",
        parse_config=lambda hf, source: _layer_path_config(hf, source, text_architecture=text_architecture),
        to_hf_config=lambda config: _layer_path_hf_config(config, text_architecture=text_architecture),
        build=lambda config, *, dtype, rngs: LayerPathTransformer(config, dtype=dtype, rngs=rngs),
        key_of=_layer_path_key,
        ignored_keys=("rotary_emb.inv_freq",),
        extra_state=hops_of_config,
        code_files=(LAYER_PATH_MODELING_FILE,),
        claimed_sizes=_layer_path_sizes,
    )


register_architecture(_layer_path("MistralForCausalLM"))
register_architecture(_layer_path("LlamaForCausalLM"))
register_architecture(_layer_path("Qwen2ForCausalLM"))
register_architecture(_layer_path("Qwen3ForCausalLM"))
register_architecture(_layer_path("Gemma2ForCausalLM"))
register_architecture(_layer_path("Gemma3ForCausalLM"))
register_architecture(_layer_path("Phi3ForCausalLM"))
