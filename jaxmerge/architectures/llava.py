"""LLaVA and LLaVA-NeXT: a CLIP vision tower, a projector and a registered text family
(Llama or Mistral) under other checkpoint prefixes; keys in transformers 4's layout and 5's."""

from __future__ import annotations

import functools
from typing import Any

from jaxmerge.architectures.config_fields import boolean, choice, integer, json_object, number
from jaxmerge.architectures.decoders import text_architecture, text_sizes
from jaxmerge.architectures.registry import Architecture, ParamPath, architecture_by_name, register_architecture
from jaxmerge.errors import CheckpointError
from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.llava import Llava, LlavaConfig
from jaxmerge.models.modules import ACTIVATIONS
from jaxmerge.models.vision import VISION_ACTIVATIONS, VisionConfig

# transformers' defaults for config fields that LLaVA checkpoints often leave out of
# their nested configs (llava-1.5's text_config names little more than its vocabulary).
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8),
}
_VISION_FIELDS = {  # VisionConfig field: (config.json name, transformers' CLIPVisionConfig default)
    "hidden_size": ("hidden_size", 768), "intermediate_size": ("intermediate_size", 3072),
    "num_layers": ("num_hidden_layers", 12), "num_heads": ("num_attention_heads", 12),
    "image_size": ("image_size", 224), "patch_size": ("patch_size", 32), "num_channels": ("num_channels", 3),
    "hidden_act": ("hidden_act", "quick_gelu"), "layer_norm_eps": ("layer_norm_eps", 1e-5),
}
_DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # transformers'


def _llava_config(hf: dict, source: str, *, is_next: bool) -> LlavaConfig:
    text_type, text_config = _text_config(hf, source)
    vision = _vision_config(hf, source)
    layer = _feature_layer(hf, vision.num_layers, source)
    token_field = "image_token_index" if "image_token_index" in hf else "image_token_id"
    token = hf.get(token_field)
    image_token_id = 32000 if token is None else integer(token, token_field, source, minimum=0)
    strategy = choice(hf.get("vision_feature_select_strategy", "default"), "vision_feature_select_strategy", source,
                      ("default", "full"))
    projector_act = choice(hf.get("projector_hidden_act", "gelu"), "projector_hidden_act", source, tuple(ACTIVATIONS))
    bias = hf.get("multimodal_projector_bias")
    projector_bias = True if bias is None else boolean(bias, "multimodal_projector_bias", source)
    grid = _grid_pinpoints(hf, source) if is_next else None
    try:
        return LlavaConfig(
            vision=vision, text=text_config, text_model_type=text_type, image_token_id=image_token_id,
            vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
            vision_feature_select_strategy=strategy, projector_hidden_act=projector_act,
            projector_bias=projector_bias, image_grid_pinpoints=grid,
        )
    except ValueError as e:  # LlavaConfig's own checks (pinpoints that fit the image size)
        raise CheckpointError(f"{source}: {e}") from None


def _text_config(hf: dict, source: str) -> tuple[str, TransformerConfig]:
    """The language model's model_type and config, read by its registered text family."""
    text = json_object(hf.get("text_config"), "text_config", source)
    text_type = choice(text.get("model_type", "llama"), "text_config.model_type", source, tuple(_TEXT_DEFAULTS))
    text = {**_TEXT_DEFAULTS[text_type], **{k: v for k, v in text.items() if v is not None}}
    arch = architecture_by_name(text_architecture(text_type))
    return text_type, arch.parse_config(text, f"{source} (text_config)")


def _vision_config(hf: dict, source: str) -> VisionConfig:
    vision = json_object(hf.get("vision_config"), "vision_config", source)
    choice(vision.get("model_type", "clip_vision_model"), "vision_config.model_type", source, ("clip_vision_model",))
    fields = {f: default if vision.get(name) is None else vision[name] for f, (name, default) in _VISION_FIELDS.items()}
    for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size",
              "num_channels"):
        integer(fields[f], f"vision_config.{_VISION_FIELDS[f][0]}", source)
    number(fields["layer_norm_eps"], "vision_config.layer_norm_eps", source)
    choice(fields["hidden_act"], "vision_config.hidden_act", source, tuple(VISION_ACTIVATIONS))
    if fields["hidden_size"] % fields["num_heads"]:
        raise CheckpointError(f"{source}: vision_config.hidden_size ({fields['hidden_size']}) is not a multiple of "
                              f"vision_config.num_attention_heads ({fields['num_heads']})")
    if fields["image_size"] % fields["patch_size"]:  # the patch embedding cuts whole patches only
        raise CheckpointError(f"{source}: vision_config.image_size ({fields['image_size']}) is not a multiple of "
                              f"vision_config.patch_size ({fields['patch_size']})")
    return VisionConfig(**fields)


def _feature_layer(hf: dict, num_layers: int, source: str) -> int | list[int]:
    """vision_feature_layer: the hidden state(s) the projector reads, as config.json gives them."""
    layer = hf.get("vision_feature_layer", -2)
    layers = layer if isinstance(layer, list) and layer else [layer]
    count = num_layers + 1  # hidden states: the embeddings, then each layer's output
    for i in layers:  # an index out of range would otherwise wrap around to another layer
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise CheckpointError(f"{source}: vision_feature_layer must be an integer in {-count}..{count - 1} "
                                  f"(or a non-empty list of them), got {layer!r}")
    return layer


def _grid_pinpoints(hf: dict, source: str) -> tuple[tuple[int, ...], ...]:
    """LLaVA-NeXT's anyres resolutions, [height, width] each."""
    pinpoints = hf.get("image_grid_pinpoints") or _DEFAULT_PINPOINTS
    if not isinstance(pinpoints, list) or not all(isinstance(p, list) and len(p) == 2 for p in pinpoints):
        raise CheckpointError(f"{source}: image_grid_pinpoints must be a list of [height, width], got {pinpoints!r}")
    return tuple(tuple(integer(x, "image_grid_pinpoints", source) for x in p) for p in pinpoints)


def _llava_sizes(hf: dict) -> list[tuple[str, Any, str, int | None]]:
    """The text and vision layer counts and embedding sizes, with the defaults `_llava_config` takes."""
    text = {} if hf.get("text_config") is None else hf["text_config"]
    vision = {} if hf.get("vision_config") is None else hf["vision_config"]
    sizes = []
    if isinstance(text, dict):
        text_type = text.get("model_type", "llama")
        defaults = _TEXT_DEFAULTS.get(text_type, {}) if isinstance(text_type, str) else {}
        sizes += text_sizes({**defaults, **{k: v for k, v in text.items() if v is not None}}, "text_config.",
                            "language_model.model.")
    if isinstance(vision, dict):
        layers = vision.get("num_hidden_layers")
        sizes.append(("vision_config.num_hidden_layers", _VISION_FIELDS["num_layers"][1] if layers is None else layers,
                      "vision_tower.vision_model.encoder.layers.", None))
    return sizes


def _llava_hf_config(config: LlavaConfig) -> dict:
    text_arch = architecture_by_name(text_architecture(config.text_model_type))
    v = config.vision
    layer = config.vision_feature_layer
    name, model_type = (("LlavaNextForConditionalGeneration", "llava_next") if config.is_next
                        else ("LlavaForConditionalGeneration", "llava"))
    extra = {"image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints]} if config.is_next else {}
    return dict(
        architectures=[name], model_type=model_type, **extra,
        image_token_index=config.image_token_id,
        vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act, multimodal_projector_bias=config.projector_bias,
        image_seq_length=config.image_features,
        text_config=text_arch.to_hf_config(config.text),
        vision_config={"model_type": "clip_vision_model",
                       **{name: getattr(v, f) for f, (name, _) in _VISION_FIELDS.items()}},
    )


def _llava_key(path: ParamPath) -> str:
    """transformers 4's layout, which transformers 5 also writes and reads."""
    head, rest = path[0], ".".join(path[1:])
    if head == "vision_tower":
        return "vision_tower.vision_model." + rest
    if head == "language_model":
        return "language_model." + ("" if path[1] == "lm_head" else "model.") + rest
    return ".".join(path)


def _llava_canonical_key(key: str) -> str:
    """transformers 5's layouts (in memory: model.language_model.*, model.vision_tower.*,
    lm_head.*; saved: vision_tower.* without vision_model) -> transformers 4's."""
    if key == "model.image_newline":
        return "image_newline"
    for new, old in (("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head.")):
        if key.startswith(new):
            return old + key[len(new):]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]  # as transformers 5 saves it
    return key


def _llava(name: str, model_type: str, *, is_next: bool) -> Architecture:
    return Architecture(
        name=name, model_type=model_type,
        parse_config=functools.partial(_llava_config, is_next=is_next),
        to_hf_config=_llava_hf_config,
        build=lambda config, *, dtype, rngs: Llava(config, dtype=dtype, rngs=rngs),
        key_of=_llava_key,
        ignored_keys=("rotary_emb.inv_freq", "position_ids"), canonical_key=_llava_canonical_key,
        claimed_sizes=_llava_sizes,
    )


register_architecture(_llava("LlavaForConditionalGeneration", "llava", is_next=False))
register_architecture(_llava("LlavaNextForConditionalGeneration", "llava_next", is_next=True))
