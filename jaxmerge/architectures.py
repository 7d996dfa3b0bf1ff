"""The registry of Hugging Face architectures jaxmerge can load and save.

An architecture says three things: how `config.json` becomes a frozen config, how to
build the Flax model, and how a parameter path of that model is named in the checkpoint.
Parameter paths map to checkpoint keys by joining their parts with dots, after a
per-architecture prefix; a path through a stacked `layers` module stands for one key per
layer (`...layers.{i}...`); a linear `kernel` [in, out] is the checkpoint's transposed
`weight` [out, in]. Adding Qwen2 (attention bias, its own defaults) or a LLaVA
model (other prefixes, a vision tower) is one more entry here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
from flax import nnx

from jaxmerge.errors import CheckpointError
from jaxmerge.models.config import RopeConfig, TransformerConfig
from jaxmerge.models.modules import ACTIVATIONS
from jaxmerge.models.transformer import Transformer

ParamPath = tuple[str, ...]

_LLAMA_LIKE_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # as in config.json "architectures"
    model_type: str  # as in config.json "model_type"
    parse_config: Callable[[dict, str], Any]  # (config dict, file name for errors) -> config
    to_hf_config: Callable[[Any], dict]  # config -> config.json fields
    build: Callable[..., nnx.Module]  # (config, dtype=, rngs=) -> model
    key_of: Callable[[ParamPath], str]  # checkpoint key of a parameter path (layer index inserted)
    ignored_keys: tuple[str, ...] = ()  # key suffixes that may be present and are not weights
    canonical_key: Callable[[str], str] = lambda key: key  # another layout's key -> the one key_of gives
    # Model state that is not a weight (a layer path's hops), from the config, as a pure dict.
    extra_state: Callable[[Any], dict] | None = None
    code_files: tuple[str, ...] = ()  # files of jaxmerge/models/ written beside the weights (modeling code)

    def checkpoint_keys(self, path: ParamPath, num_layers: int | None) -> list[str]:
        """Checkpoint keys of one parameter: one key, or one per layer if it is stacked."""
        if path[-1] == "kernel":
            path = path[:-1] + ("weight",)
        if "layers" not in path:
            return [self.key_of(path)]
        at = path.index("layers") + 1
        return [self.key_of(path[:at] + (str(i),) + path[at:]) for i in range(num_layers)]

    @staticmethod
    def is_transposed(path: ParamPath) -> bool:
        """A kernel is stored transposed in the checkpoint."""
        return path[-1] == "kernel"

    def is_ignored(self, key: str) -> bool:
        return any(key.endswith(suffix) for suffix in self.ignored_keys)


def _require(hf: dict, fields: tuple[str, ...], source: str) -> None:
    missing = [f for f in fields if hf.get(f) is None]
    if missing:
        raise CheckpointError(f"{source}: missing required config field(s): {', '.join(missing)}")


# config.json field checks. Each returns the value as the config holds it, or raises naming the
# file and field: a wrong type (a string, a bool, 3.5 for a count) must not reach int(), float()
# or bool() ("false" is truthy), nor fail later as a shape mismatch or a division by zero.


def _integer(value, field: str, source: str, minimum: int = 1) -> int:
    """An integer >= minimum (JSON true/false and floats are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise CheckpointError(f"{source}: {field} must be {wanted}, got {value!r}")
    return value


def _number(value, field: str, source: str, positive: bool = True) -> float:
    """A finite number (Python's json reads NaN and Infinity too), > 0 if positive."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (positive and value <= 0)):
        wanted = "a positive number" if positive else "a finite number"
        raise CheckpointError(f"{source}: {field} must be {wanted}, got {value!r}")
    return float(value)


def _boolean(value, field: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: {field} must be true or false, got {value!r}")
    return value


def _choice(value, field: str, source: str, supported) -> str:
    if not isinstance(value, str) or value not in supported:
        raise CheckpointError(f"{source}: {field} {value!r} is not supported (supported: {', '.join(supported)})")
    return value


def _object(value, field: str, source: str) -> dict:
    """A nested JSON object; null or absent is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: {field} must be a JSON object, got {value!r}")
    return value


def parse_rope(hf: dict, source: str) -> RopeConfig:
    """Reads RoPE from either layout: transformers 5 `rope_parameters` or the older
    top-level `rope_theta` with `rope_scaling`."""
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = _object(hf.get(where), where, source)
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: per-layer-type rope_parameters are not supported")
    theta_field = f"{where}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = _number(params.get("rope_theta", hf.get("rope_theta", 10_000.0)), theta_field, source)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in _SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(_SUPPORTED_ROPE_TYPES)})"
        )
    fields = dict(theta=theta, rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise CheckpointError(f"{source}: rope type {rope_type!r} needs field 'factor'")
        fields["factor"] = _number(params["factor"], f"{where}.factor", source)
    if rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor"):
            if name not in params:
                raise CheckpointError(f"{source}: rope type 'llama3' needs field {name!r}")
            fields[name] = _number(params[name], f"{where}.{name}", source)
        if fields["high_freq_factor"] <= fields["low_freq_factor"]:  # llama3 divides by their difference
            raise CheckpointError(f"{source}: {where}.high_freq_factor ({fields['high_freq_factor']}) must be greater "
                                  f"than low_freq_factor ({fields['low_freq_factor']})")
        name = "original_max_position_embeddings"
        fields[name] = _integer(params.get(name, hf.get("max_position_embeddings", 8192)),
                                f"{where}.{name}" if name in params else "max_position_embeddings", source)
    return RopeConfig(**fields)


def rope_to_hf(rope: RopeConfig) -> dict:
    params: dict = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type in ("linear", "llama3"):
        params["factor"] = rope.factor
    if rope.rope_type == "llama3":
        params.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    return params


def _llama_like_config(hf: dict, source: str, *, defaults: dict) -> TransformerConfig:
    _require(hf, _LLAMA_LIKE_REQUIRED, source)

    def get(name):  # a field left out (or null) takes transformers' default; sliding_window may be null
        if name in hf and (hf[name] is not None or name == "sliding_window"):
            return hf[name]
        return defaults.get(name)

    hidden_size = _integer(hf["hidden_size"], "hidden_size", source)
    num_heads = _integer(hf["num_attention_heads"], "num_attention_heads", source)
    num_kv_heads = get("num_key_value_heads")  # no default: as many as query heads (multi-head attention)
    num_kv_heads = num_heads if num_kv_heads is None else _integer(num_kv_heads, "num_key_value_heads", source)
    if num_heads % num_kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
        )
    if hf.get("head_dim") is None:
        if hidden_size % num_heads:
            raise CheckpointError(f"{source}: hidden_size ({hidden_size}) is not a multiple of num_attention_heads "
                                  f"({num_heads}) and no head_dim is given")
        head_dim = hidden_size // num_heads
    else:
        head_dim = _integer(hf["head_dim"], "head_dim", source)
    if head_dim % 2:  # RoPE rotates the two halves of each head
        raise CheckpointError(f"{source}: head_dim ({head_dim}) must be even for rotary position embeddings")
    window = get("sliding_window")
    return TransformerConfig(
        vocab_size=_integer(hf["vocab_size"], "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=_integer(hf["intermediate_size"], "intermediate_size", source),
        num_layers=_integer(hf["num_hidden_layers"], "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_number(get("rms_norm_eps"), "rms_norm_eps", source),
        rope=parse_rope(hf, source),
        sliding_window=None if window is None else _integer(window, "sliding_window", source),
        tie_word_embeddings=_boolean(get("tie_word_embeddings"), "tie_word_embeddings", source),
        hidden_act=_choice(get("hidden_act"), "hidden_act", source, tuple(ACTIVATIONS)),
        attention_bias=_boolean(get("attention_bias"), "attention_bias", source),
        mlp_bias=_boolean(get("mlp_bias"), "mlp_bias", source),
        max_position_embeddings=_integer(get("max_position_embeddings"), "max_position_embeddings", source),
    )


def _llama_like_hf_config(config: TransformerConfig, *, architecture: str, model_type: str) -> dict:
    rope = rope_to_hf(config.rope)
    fields = dict(
        architectures=[architecture],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        hidden_act=config.hidden_act,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        # Both layouts, so that transformers 4 and 5 read the same RoPE.
        rope_parameters=rope,
        rope_theta=config.rope.theta,
        rope_scaling=None if config.rope.rope_type == "default" else rope,
    )
    if model_type == "mistral":
        fields["sliding_window"] = config.sliding_window
    else:
        fields.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    return fields


def _causal_lm_key(path: ParamPath) -> str:
    return ("" if path[0] == "lm_head" else "model.") + ".".join(path)


def _llama_like(name: str, model_type: str, defaults: dict) -> Architecture:
    def parse(hf: dict, source: str) -> TransformerConfig:
        config = _llama_like_config(hf, source, defaults=defaults)
        if model_type == "llama":  # Llama has no sliding window whatever the config says
            config = dataclasses.replace(config, sliding_window=None)
        elif config.attention_bias or config.mlp_bias:
            raise CheckpointError(f"{source}: {name} has no attention_bias / mlp_bias")
        return config

    return Architecture(
        name=name,
        model_type=model_type,
        parse_config=parse,
        to_hf_config=lambda c: _llama_like_hf_config(c, architecture=name, model_type=model_type),
        build=lambda config, *, dtype, rngs: Transformer(config, dtype=dtype, rngs=rngs),
        key_of=_causal_lm_key,
        ignored_keys=("rotary_emb.inv_freq",),
    )


# Defaults are transformers' own for a field that config.json leaves out.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in [
        _llama_like(
            "MistralForCausalLM", "mistral",
            dict(num_key_value_heads=8, rms_norm_eps=1e-6, sliding_window=4096, tie_word_embeddings=False,
                 hidden_act="silu", attention_bias=False, mlp_bias=False, max_position_embeddings=4096 * 32),
        ),
        _llama_like(
            "LlamaForCausalLM", "llama",
            dict(rms_norm_eps=1e-6, sliding_window=None, tie_word_embeddings=False, hidden_act="silu",
                 attention_bias=False, mlp_bias=False, max_position_embeddings=2048),
        ),
    ]
}


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


def _llava_config(hf: dict, source: str, next_: bool = False):
    from jaxmerge.models.llava import LlavaConfig
    from jaxmerge.models.vision import VISION_ACTIVATIONS, VisionConfig

    text = _object(hf.get("text_config"), "text_config", source)
    text_type = _choice(text.get("model_type", "llama"), "text_config.model_type", source, tuple(_TEXT_DEFAULTS))
    text = {**_TEXT_DEFAULTS[text_type], **{k: v for k, v in text.items() if v is not None}}
    arch = ARCHITECTURES["MistralForCausalLM" if text_type == "mistral" else "LlamaForCausalLM"]
    text_config = arch.parse_config(text, f"{source} (text_config)")

    vision = _object(hf.get("vision_config"), "vision_config", source)
    _choice(vision.get("model_type", "clip_vision_model"), "vision_config.model_type", source, ("clip_vision_model",))
    fields = {f: default if vision.get(name) is None else vision[name] for f, (name, default) in _VISION_FIELDS.items()}
    for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size",
              "num_channels"):
        _integer(fields[f], f"vision_config.{_VISION_FIELDS[f][0]}", source)
    _number(fields["layer_norm_eps"], "vision_config.layer_norm_eps", source)
    _choice(fields["hidden_act"], "vision_config.hidden_act", source, tuple(VISION_ACTIVATIONS))
    if fields["hidden_size"] % fields["num_heads"]:
        raise CheckpointError(f"{source}: vision_config.hidden_size ({fields['hidden_size']}) is not a multiple of "
                              f"vision_config.num_attention_heads ({fields['num_heads']})")
    if fields["image_size"] % fields["patch_size"]:  # the patch embedding cuts whole patches only
        raise CheckpointError(f"{source}: vision_config.image_size ({fields['image_size']}) is not a multiple of "
                              f"vision_config.patch_size ({fields['patch_size']})")

    layer = hf.get("vision_feature_layer", -2)
    layers = layer if isinstance(layer, list) and layer else [layer]
    count = fields["num_layers"] + 1  # hidden states: the embeddings, then each layer's output
    for i in layers:  # an index out of range would otherwise wrap around to another layer
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise CheckpointError(f"{source}: vision_feature_layer must be an integer in {-count}..{count - 1} "
                                  f"(or a non-empty list of them), got {layer!r}")
    token_field = "image_token_index" if "image_token_index" in hf else "image_token_id"
    token = hf.get(token_field)
    image_token_id = 32000 if token is None else _integer(token, token_field, source, minimum=0)
    strategy = _choice(hf.get("vision_feature_select_strategy", "default"), "vision_feature_select_strategy", source,
                       ("default", "full"))
    projector_act = _choice(hf.get("projector_hidden_act", "gelu"), "projector_hidden_act", source, tuple(ACTIVATIONS))
    bias = hf.get("multimodal_projector_bias")
    projector_bias = True if bias is None else _boolean(bias, "multimodal_projector_bias", source)
    grid = None
    if next_:
        pinpoints = hf.get("image_grid_pinpoints") or _DEFAULT_PINPOINTS
        if not isinstance(pinpoints, list) or not all(isinstance(p, list) and len(p) == 2 for p in pinpoints):
            raise CheckpointError(f"{source}: image_grid_pinpoints must be a list of [height, width], "
                                  f"got {pinpoints!r}")
        grid = tuple(tuple(_integer(x, "image_grid_pinpoints", source) for x in p) for p in pinpoints)
    try:
        return LlavaConfig(
            vision=VisionConfig(**fields), text=text_config, text_model_type=text_type, image_token_id=image_token_id,
            vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
            vision_feature_select_strategy=strategy, projector_hidden_act=projector_act,
            projector_bias=projector_bias, image_grid_pinpoints=grid,
        )
    except ValueError as e:  # LlavaConfig's own checks (pinpoints that fit the image size)
        raise CheckpointError(f"{source}: {e}") from None


def _llava_hf_config(config) -> dict:
    text_arch = "MistralForCausalLM" if config.text_model_type == "mistral" else "LlamaForCausalLM"
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
        text_config=ARCHITECTURES[text_arch].to_hf_config(config.text),
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


def _build_llava(config, *, dtype, rngs):
    from jaxmerge.models.llava import Llava

    return Llava(config, dtype=dtype, rngs=rngs)


for _name, _type, _next in (("LlavaForConditionalGeneration", "llava", False),
                            ("LlavaNextForConditionalGeneration", "llava_next", True)):
    ARCHITECTURES[_name] = Architecture(
        name=_name, model_type=_type,
        parse_config=lambda hf, source, next_=_next: _llava_config(hf, source, next_),
        to_hf_config=_llava_hf_config, build=_build_llava, key_of=_llava_key,
        ignored_keys=("rotary_emb.inv_freq", "position_ids"), canonical_key=_llava_canonical_key,
    )


# A layer-path (DFS-merged) model: the stored layers under model.stored_layers.{i}, the
# path in config.json, and a PyTorch modeling file beside it (trust_remote_code).
LAYER_PATH_MODELING_FILE = "modeling_layer_path.py"


def _layer_path_config(hf: dict, source: str, text_type: str):
    from jaxmerge.models.layer_path import LayerPathConfig

    _require(hf, ("layer_path", "layer_scales", "num_stored_layers"), source)
    path, scales = hf["layer_path"], hf["layer_scales"]
    stored = _integer(hf["num_stored_layers"], "num_stored_layers", source)
    for name, value in (("layer_path", path), ("layer_scales", scales)):
        if not isinstance(value, list):
            raise CheckpointError(f"{source}: {name} must be a list, got {value!r}")
    if len(path) != len(scales) or not path:
        raise CheckpointError(f"{source}: layer_path ({len(path)} hops) and layer_scales ({len(scales)}) must be "
                              "non-empty and of one length")
    for i in path:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < stored:
            raise CheckpointError(f"{source}: layer_path holds {i!r}, not a stored layer (0..{stored - 1})")
    scales = [_number(x, "layer_scales", source, positive=False) for x in scales]
    text_arch = ARCHITECTURES["MistralForCausalLM" if text_type == "mistral" else "LlamaForCausalLM"]
    text = text_arch.parse_config({**hf, "num_hidden_layers": stored}, source)
    return LayerPathConfig(text, num_hops=len(path), text_model_type=text_type, path=tuple(zip(path, scales)))


def _layer_path_hf_config(config, name: str, model_type: str, text_type: str) -> dict:
    if config.path is None or len(config.path) != config.num_hops:
        raise ValueError("save a layer-path model after compact_path(model): its config must name every hop")
    text_arch = "MistralForCausalLM" if text_type == "mistral" else "LlamaForCausalLM"
    fields = ARCHITECTURES[text_arch].to_hf_config(config.text)
    return {**fields, "architectures": [name], "model_type": model_type,
            "num_hidden_layers": config.num_hops, "num_stored_layers": config.text.num_layers,
            "layer_path": [i for i, _ in config.path], "layer_scales": [s for _, s in config.path],
            "auto_map": {"AutoConfig": f"modeling_layer_path.LayerPath{text_type.capitalize()}Config",
                         "AutoModelForCausalLM": f"modeling_layer_path.{name}"}}


def _build_layer_path(config, *, dtype, rngs):
    from jaxmerge.models.layer_path import LayerPathTransformer

    return LayerPathTransformer(config, dtype=dtype, rngs=rngs)


def _layer_path_extra_state(config) -> dict:
    from jaxmerge.models.layer_path import hops_of_config

    return hops_of_config(config)


for _text_type in ("mistral", "llama"):
    _name = f"LayerPath{_text_type.capitalize()}ForCausalLM"
    ARCHITECTURES[_name] = Architecture(
        name=_name, model_type=f"layer_path_{_text_type}",
        parse_config=lambda hf, source, t=_text_type: _layer_path_config(hf, source, t),
        to_hf_config=lambda c, n=_name, t=_text_type: _layer_path_hf_config(c, n, f"layer_path_{t}", t),
        build=_build_layer_path,
        key_of=lambda path: _causal_lm_key(path).replace("model.layers.", "model.stored_layers.", 1),
        ignored_keys=("rotary_emb.inv_freq",), extra_state=_layer_path_extra_state,
        code_files=(LAYER_PATH_MODELING_FILE,),
    )


def architecture_of(hf: dict, source: str) -> Architecture:
    """The registry entry for a config.json, by its `architectures` list (or `model_type`)."""
    names = hf.get("architectures") or []  # empty: by model_type, as transformers' Auto classes do
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{source}: architectures must be a list of class names, got {names!r}")
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names:
        for arch in ARCHITECTURES.values():
            if arch.model_type == hf.get("model_type"):
                return arch
    found = names or hf.get("model_type") or "none given"
    raise CheckpointError(
        f"{source}: unsupported architecture {found} (supported: {', '.join(sorted(ARCHITECTURES))})"
    )


def architecture_by_name(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]


def parameter_count(model: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
