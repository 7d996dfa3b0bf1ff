"""The registry of Hugging Face architectures jaxmerge can load and save.

An architecture says three things: how `config.json` becomes a frozen config, how to
build the Flax model, and how a parameter path of that model is named in the checkpoint.
Parameter paths map to checkpoint keys by joining their parts with dots, after a
per-architecture prefix; a path through a stacked `layers` module stands for one key per
layer (`...layers.{i}...`); a linear `kernel` [in, out] is the checkpoint's transposed
`weight` [out, in]. The text families (Mistral, Llama, Qwen2, Qwen3, Gemma 2, Gemma 3,
Phi-3) share one Flax model: each is a `Family` (transformers' defaults and the family's
traits) and one entry here; every text family gets its layer-path (DFS) entry with it.
A LLaVA model (other prefixes, a vision tower) is one more entry too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
from flax import nnx

from jaxmerge.errors import CheckpointError
from jaxmerge.models.config import LAYER_TYPES, RopeConfig, TransformerConfig
from jaxmerge.models.modules import ACTIVATIONS
from jaxmerge.models.transformer import Transformer

ParamPath = tuple[str, ...]

_LLAMA_LIKE_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


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
    # What config.json claims that the checkpoint's tensors show, as (field, value, key, axis): axis
    # None, a layer count, `key` the prefix of layer i's tensors ("model.layers." for model.layers.{i}.*);
    # else the size of dimension `axis` of tensor `key`. Values as config.json holds them, unchecked.
    claimed_sizes: Callable[[dict], list[tuple[str, Any, str, int | None]]] = lambda hf: []

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


def _rope_params(params: dict, where: str, hf: dict, source: str, *, default_theta: float = 10_000.0) -> RopeConfig:
    """One RoPE parameter dict (rope_parameters, rope_scaling, or one layer type's entry) -> RopeConfig.
    Top-level fields (rope_theta, partial_rotary_factor, original_max_position_embeddings) fill
    what the dict leaves out, as transformers' standardize_rope_params does."""
    theta_field = f"{where}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = _number(params.get("rope_theta", hf.get("rope_theta", default_theta)), theta_field, source)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "su":  # Phi-3's old name
        rope_type = "longrope"
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{source}: {where}.rope_type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    fields: dict = dict(theta=theta, rope_type=rope_type)
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None:
        fields["partial_rotary_factor"] = _number(partial, "partial_rotary_factor", source)
        if fields["partial_rotary_factor"] > 1:
            raise CheckpointError(f"{source}: partial_rotary_factor must be in (0, 1], got {partial!r}")
    max_positions = hf.get("max_position_embeddings")
    if rope_type in ("llama3", "yarn", "longrope"):  # Phi-3 keeps the original length at the top level
        name = "original_max_position_embeddings"
        value = hf.get(name) if hf.get(name) is not None else params.get(name, max_positions)
        if value is None:
            raise CheckpointError(f"{source}: rope type {rope_type!r} needs {name} (or max_position_embeddings)")
        fields[name] = _integer(value, f"{where}.{name}" if name in params else name, source)
    if rope_type in ("linear", "llama3", "dynamic") or (rope_type == "yarn" and params.get("factor") is not None):
        if params.get("factor") is None:
            raise CheckpointError(f"{source}: rope type {rope_type!r} needs field {where}.factor")
        fields["factor"] = _number(params["factor"], f"{where}.factor", source)
    if rope_type == "yarn" and "factor" not in fields:  # transformers: the length ratio
        fields["factor"] = _integer(max_positions, "max_position_embeddings", source) / fields[
            "original_max_position_embeddings"]
    if rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor"):
            if name not in params:
                raise CheckpointError(f"{source}: rope type 'llama3' needs field {name!r}")
            fields[name] = _number(params[name], f"{where}.{name}", source)
        if fields["high_freq_factor"] <= fields["low_freq_factor"]:  # llama3 divides by their difference
            raise CheckpointError(f"{source}: {where}.high_freq_factor ({fields['high_freq_factor']}) must be greater "
                                  f"than low_freq_factor ({fields['low_freq_factor']})")
    if rope_type == "yarn":
        for name in ("beta_fast", "beta_slow"):  # 0 or null: transformers' default
            if params.get(name):
                fields[name] = _number(params[name], f"{where}.{name}", source)
        for name in ("mscale", "mscale_all_dim"):
            if params.get(name) is not None:
                fields[name] = _number(params[name], f"{where}.{name}", source, positive=False)
        if params.get("truncate") is not None:
            fields["truncate"] = _boolean(params["truncate"], f"{where}.truncate", source)
    if rope_type in ("yarn", "longrope") and params.get("attention_factor") is not None:
        fields["attention_factor"] = _number(params["attention_factor"], f"{where}.attention_factor", source)
    if rope_type == "dynamic":
        fields["max_position_embeddings"] = _integer(max_positions, "max_position_embeddings", source)
    if rope_type == "longrope":
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        half = int(head_dim * fields.get("partial_rotary_factor", 1.0)) // 2
        for name in ("short_factor", "long_factor"):
            value = params.get(name)
            if (not isinstance(value, list) or len(value) != half
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
                raise CheckpointError(f"{source}: {where}.{name} must be a list of {half} numbers, got {value!r}")
            fields[name] = tuple(float(x) for x in value)
        if params.get("factor") is not None and "attention_factor" not in fields:  # else from the lengths
            factor = _number(params["factor"], f"{where}.factor", source)
            original = fields["original_max_position_embeddings"]
            fields["attention_factor"] = (1.0 if factor <= 1
                                          else math.sqrt(1 + math.log(factor) / math.log(original)))
    return RopeConfig(**fields)


def parse_rope(hf: dict, source: str, *, layer_type: str | None = None, default_theta: float = 10_000.0
               ) -> RopeConfig:
    """Reads RoPE from either layout: transformers 5 `rope_parameters` or the older
    top-level `rope_theta` with `rope_scaling`. layer_type: the entry of per-layer-type
    parameters to read (Gemma 3's "full_attention" / "sliding_attention")."""
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = _object(hf.get(where), where, source)
    nested = any(isinstance(v, dict) or v is None for k, v in params.items() if k in LAYER_TYPES)
    if nested:
        if layer_type is None:
            raise CheckpointError(f"{source}: per-layer-type {where} are not supported for this architecture")
        where = f"{where}.{layer_type}"
        params = _object(params.get(layer_type), where, source)
    elif any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: {where} holds nested entries other than {', '.join(LAYER_TYPES)}")
    return _rope_params(params, where, hf, source, default_theta=default_theta)


def rope_to_hf(rope: RopeConfig) -> dict:
    params: dict = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = rope.partial_rotary_factor
    if rope.rope_type in ("linear", "llama3", "yarn", "dynamic"):
        params["factor"] = rope.factor
    if rope.rope_type in ("llama3", "yarn", "longrope"):
        params["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.rope_type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.rope_type == "yarn":
        params.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        params.update({k: getattr(rope, k) for k in ("mscale", "mscale_all_dim") if getattr(rope, k) is not None})
    if rope.rope_type in ("yarn", "longrope") and rope.attention_factor is not None:
        params["attention_factor"] = rope.attention_factor
    if rope.rope_type == "longrope":
        params.update(short_factor=list(rope.short_factor), long_factor=list(rope.long_factor))
    return params


@dataclasses.dataclass(frozen=True)
class Family:
    """How one family of decoders reads and writes config.json: transformers' defaults for
    fields a config leaves out, and the family's fixed traits (the flags of `TransformerConfig`
    its layers compute with). A new family whose layers are built from the blocks in
    `models/modules.py` is one `Family` and one registry entry; new computation is a flag there."""

    model_type: str
    defaults: dict  # config.json field -> transformers' default
    traits: dict = dataclasses.field(default_factory=dict)  # TransformerConfig fields fixed for the family
    activation_field: str = "hidden_act"  # Gemma calls it hidden_activation
    # How attention_bias (if the family has it) maps to biases: "all" q/k/v/o, "qkv" always on q/k/v only.
    bias: str = "all"
    sliding: str = "all"  # which layers slide: "all" (Mistral), "none", "from_max_window_layers" (Qwen), "types"
    softcaps: bool = False  # reads attn_logit_softcapping / final_logit_softcapping / query_pre_attn_scalar
    local_rope: bool = False  # per-layer-type RoPE (Gemma 3)
    default_theta: float = 10_000.0
    sliding_pattern_field: str | None = None  # default layer_types from a pattern (Gemma)
    default_sliding_pattern: int = 2


_NULL_MEANS_NONE = ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping")


def _decoder_config(hf: dict, source: str, family: Family) -> TransformerConfig:
    _require(hf, _LLAMA_LIKE_REQUIRED, source)

    def get(name):  # a field left out (or null) takes transformers' default; a null window or cap is "none"
        if name in hf and (hf[name] is not None or name in _NULL_MEANS_NONE):
            return hf[name]
        return family.defaults.get(name)

    hidden_size = _integer(hf["hidden_size"], "hidden_size", source)
    num_heads = _integer(hf["num_attention_heads"], "num_attention_heads", source)
    num_kv_heads = get("num_key_value_heads")  # no default: as many as query heads (multi-head attention)
    num_kv_heads = num_heads if num_kv_heads is None else _integer(num_kv_heads, "num_key_value_heads", source)
    if num_heads % num_kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
        )
    head_dim = get("head_dim")
    if head_dim is None:
        if hidden_size % num_heads:
            raise CheckpointError(f"{source}: hidden_size ({hidden_size}) is not a multiple of num_attention_heads "
                                  f"({num_heads}) and no head_dim is given")
        head_dim = hidden_size // num_heads
    else:
        head_dim = _integer(head_dim, "head_dim", source)
    if head_dim % 2:  # RoPE rotates the two halves of each head
        raise CheckpointError(f"{source}: head_dim ({head_dim}) must be even for rotary position embeddings")
    num_layers = _integer(hf["num_hidden_layers"], "num_hidden_layers", source)
    hf = {**hf, "head_dim": head_dim}  # longrope's factor lists are per rotating frequency
    fields: dict = dict(family.traits)

    window = get("sliding_window")
    window = None if window is None else _integer(window, "sliding_window", source)
    layer_types = None
    if family.sliding == "none":
        window = None
    elif family.sliding == "from_max_window_layers":  # Qwen: use_sliding_window gates it
        if not _boolean(get("use_sliding_window"), "use_sliding_window", source):
            window = None
        first = _integer(get("max_window_layers"), "max_window_layers", source, minimum=0)
        layer_types = [("sliding_attention" if window is not None and i >= first else "full_attention")
                       for i in range(num_layers)]
    elif family.sliding == "types":
        pattern = hf.get(family.sliding_pattern_field) if family.sliding_pattern_field else None
        pattern = family.default_sliding_pattern if pattern is None else _integer(
            pattern, family.sliding_pattern_field, source)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if family.sliding in ("from_max_window_layers", "types") and hf.get("layer_types") is not None:
        layer_types = hf["layer_types"]  # transformers 5 writes them out; they win
        if (not isinstance(layer_types, list) or len(layer_types) != num_layers
                or not all(t in LAYER_TYPES for t in layer_types)):
            raise CheckpointError(f"{source}: layer_types must be a list of {num_layers} entries, each one of "
                                  f"{', '.join(LAYER_TYPES)}; got {layer_types!r}")
    if layer_types is not None and "sliding_attention" in layer_types and window is None:
        layer_types = None  # no window: every layer attends globally
    fields["layer_types"] = None if layer_types is None else tuple(layer_types)

    if "attention_bias" in family.defaults:
        bias = _boolean(get("attention_bias"), "attention_bias", source)
        fields.update(qkv_bias=bias, o_bias=bias)
    if "mlp_bias" in family.defaults:
        fields["mlp_bias"] = _boolean(get("mlp_bias"), "mlp_bias", source)
    if family.bias == "qkv":
        fields.update(qkv_bias=True, o_bias=False)
    if family.softcaps:
        scalar = get("query_pre_attn_scalar")
        fields["query_pre_attn_scalar"] = _number(scalar, "query_pre_attn_scalar", source)
        for name, field in (("attn_logit_softcapping", "attn_logit_softcap"),
                            ("final_logit_softcapping", "final_logit_softcap")):
            if name not in family.defaults:  # the family's transformers class never applies it
                continue
            value = get(name)
            fields[field] = None if value is None else _number(value, name, source)
    if family.local_rope:
        fields["rope"] = _local_rope(hf, source, "full_attention", family)
        fields["rope_local"] = _local_rope(hf, source, "sliding_attention", family)
    else:
        fields["rope"] = parse_rope(hf, source, default_theta=family.default_theta)
    if get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention is not supported (a causal LM is)")
    activation = get(family.activation_field)
    if activation is None and family.activation_field != "hidden_act":
        activation = get("hidden_act")  # older Gemma configs
    return TransformerConfig(
        vocab_size=_integer(hf["vocab_size"], "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=_integer(hf["intermediate_size"], "intermediate_size", source),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_number(get("rms_norm_eps"), "rms_norm_eps", source),
        sliding_window=window,
        tie_word_embeddings=_boolean(get("tie_word_embeddings"), "tie_word_embeddings", source),
        hidden_act=_choice(activation, family.activation_field, source, tuple(ACTIVATIONS)),
        max_position_embeddings=_integer(get("max_position_embeddings"), "max_position_embeddings", source),
        **fields,
    )


def _local_rope(hf: dict, source: str, layer_type: str, family: Family) -> RopeConfig:
    """Gemma 3's RoPE for one layer type: transformers 5's nested rope_parameters, or the
    older rope_theta + rope_scaling (global layers) and rope_local_base_freq (local ones)."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and any(k in LAYER_TYPES for k in params):
        theta = {"full_attention": hf.get("rope_theta", 1_000_000.0),
                 "sliding_attention": hf.get("rope_local_base_freq", 10_000.0)}[layer_type]
        return parse_rope({**hf, "rope_theta": theta}, source, layer_type=layer_type)
    if layer_type == "sliding_attention":
        theta = hf.get("rope_local_base_freq")
        return RopeConfig(theta=10_000.0 if theta is None else _number(theta, "rope_local_base_freq", source))
    return parse_rope(hf, source, default_theta=1_000_000.0)


def _decoder_hf_config(config: TransformerConfig, *, architecture: str, family: Family) -> dict:
    fields = dict(
        architectures=[architecture],
        model_type=family.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
    )
    fields[family.activation_field] = config.hidden_act
    if family.local_rope:  # both layouts: transformers 5's nested dict, 4's separate fields
        fields["rope_parameters"] = {"full_attention": rope_to_hf(config.rope),
                                     "sliding_attention": rope_to_hf(config.rope_local or config.rope)}
        fields.update(rope_theta=config.rope.theta, rope_local_base_freq=(config.rope_local or config.rope).theta,
                      rope_scaling=None if config.rope.rope_type == "default" else rope_to_hf(config.rope))
    else:  # both layouts, so that transformers 4 and 5 read the same RoPE
        rope = rope_to_hf(config.rope)
        fields.update(rope_parameters=rope, rope_theta=config.rope.theta,
                      rope_scaling=None if config.rope.rope_type == "default" else rope)
        if config.rope.partial_rotary_factor != 1.0:
            fields["partial_rotary_factor"] = config.rope.partial_rotary_factor
        if config.rope.rope_type in ("llama3", "yarn", "longrope") and family.model_type == "phi3":
            fields["original_max_position_embeddings"] = config.rope.original_max_position_embeddings
    if family.sliding != "none":
        fields["sliding_window"] = config.sliding_window
    if family.sliding == "from_max_window_layers":
        fields.update(use_sliding_window=config.sliding_window is not None,
                      max_window_layers=config.sliding_layers.index(True) if any(config.sliding_layers)
                      else config.num_layers)
    if family.sliding in ("from_max_window_layers", "types"):
        fields["layer_types"] = ["sliding_attention" if s else "full_attention" for s in config.sliding_layers]
    if "attention_bias" in family.defaults:
        fields["attention_bias"] = config.qkv_bias
    if "mlp_bias" in family.defaults:
        fields["mlp_bias"] = config.mlp_bias
    if family.softcaps:
        scalar = config.query_pre_attn_scalar  # transformers' strict config wants an int where it is one
        fields.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                      final_logit_softcapping=config.final_logit_softcap)
        if "attn_logit_softcapping" in family.defaults:
            fields["attn_logit_softcapping"] = config.attn_logit_softcap
    return fields


def _check_biases(config: TransformerConfig, family: Family, source: str) -> None:
    """A checkpoint flag the family's transformers class would ignore is refused, not dropped."""
    if family.bias == "all" and config.qkv_bias != config.o_bias:
        raise CheckpointError(f"{source}: {family.model_type} puts attention_bias on q, k, v and o alike")


def _text_sizes(hf: dict, where: str = "", prefix: str = "model.", layers_field: str = "num_hidden_layers",
                layers: str = "layers") -> list[tuple[str, Any, str, int | None]]:
    """A decoder's layer count and embedding sizes as config.json (or its text_config: `where`) claims them."""
    embedding = f"{prefix}embed_tokens.weight"
    return [(where + layers_field, hf.get(layers_field), f"{prefix}{layers}.", None),
            (where + "vocab_size", hf.get("vocab_size"), embedding, 0),
            (where + "hidden_size", hf.get("hidden_size"), embedding, 1)]


def _causal_lm_key(path: ParamPath) -> str:
    return ("" if path[0] == "lm_head" else "model.") + ".".join(path)


def _decoder(name: str, family: Family) -> Architecture:
    def parse(hf: dict, source: str) -> TransformerConfig:
        config = _decoder_config(hf, source, family)
        _check_biases(config, family, source)
        return config

    return Architecture(
        name=name,
        model_type=family.model_type,
        parse_config=parse,
        to_hf_config=lambda c: _decoder_hf_config(c, architecture=name, family=family),
        build=lambda config, *, dtype, rngs: Transformer(config, dtype=dtype, rngs=rngs),
        key_of=_causal_lm_key,
        ignored_keys=("rotary_emb.inv_freq",),
        claimed_sizes=_text_sizes,
    )


_GEMMA_TRAITS = dict(gemma_norm=True, sandwich_norms=True, scale_embeddings=True)

# Defaults are transformers' own for a field that config.json leaves out.
FAMILIES: dict[str, Family] = {
    "MistralForCausalLM": Family(
        "mistral", dict(num_key_value_heads=8, rms_norm_eps=1e-6, sliding_window=4096, tie_word_embeddings=False,
                        hidden_act="silu", max_position_embeddings=4096 * 32)),
    "LlamaForCausalLM": Family(
        "llama", dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
                      mlp_bias=False, max_position_embeddings=2048), sliding="none"),
    "Qwen2ForCausalLM": Family(
        "qwen2", dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768,
                      use_sliding_window=False, sliding_window=4096, max_window_layers=28),
        bias="qkv", sliding="from_max_window_layers"),
    "Qwen3ForCausalLM": Family(
        "qwen3", dict(head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                      max_position_embeddings=32768, attention_bias=False, use_sliding_window=False,
                      sliding_window=4096, max_window_layers=28),
        traits=dict(qk_norm=True), sliding="from_max_window_layers"),
    "Gemma2ForCausalLM": Family(
        "gemma2", dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=8192, attention_bias=False,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0),
        traits=_GEMMA_TRAITS, activation_field="hidden_activation", sliding="types", softcaps=True),
    # transformers' Gemma 3 reads attn_logit_softcapping but never applies it: left out here too.
    "Gemma3ForCausalLM": Family(
        "gemma3_text", dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                            tie_word_embeddings=True, max_position_embeddings=131072, attention_bias=False,
                            query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None),
        traits=dict(_GEMMA_TRAITS, qk_norm=True), activation_field="hidden_activation", sliding="types",
        softcaps=True, local_rope=True, sliding_pattern_field="sliding_window_pattern", default_sliding_pattern=6),
    "Phi3ForCausalLM": Family(
        "phi3", dict(rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=4096,
                     sliding_window=None),
        traits=dict(fused_projections=True)),
}
ARCHITECTURES: dict[str, Architecture] = {name: _decoder(name, family) for name, family in FAMILIES.items()}


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
    text_config = ARCHITECTURES[text_architecture(text_type)].parse_config(text, f"{source} (text_config)")

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


def _llava_sizes(hf: dict) -> list[tuple[str, Any, str, int | None]]:
    """The text and vision layer counts and embedding sizes, with the defaults `_llava_config` takes."""
    text = {} if hf.get("text_config") is None else hf["text_config"]
    vision = {} if hf.get("vision_config") is None else hf["vision_config"]
    sizes = []
    if isinstance(text, dict):
        text_type = text.get("model_type", "llama")
        defaults = _TEXT_DEFAULTS.get(text_type, {}) if isinstance(text_type, str) else {}
        sizes += _text_sizes({**defaults, **{k: v for k, v in text.items() if v is not None}}, "text_config.",
                             "language_model.model.")
    if isinstance(vision, dict):
        layers = vision.get("num_hidden_layers")
        sizes.append(("vision_config.num_hidden_layers", _VISION_FIELDS["num_layers"][1] if layers is None else layers,
                      "vision_tower.vision_model.encoder.layers.", None))
    return sizes


def _llava_hf_config(config) -> dict:
    text_arch = text_architecture(config.text_model_type)
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
        claimed_sizes=_llava_sizes,
    )


# A layer-path (DFS-merged) model: the stored layers under model.stored_layers.{i}, the
# path in config.json, and a PyTorch modeling file beside it (trust_remote_code).
LAYER_PATH_MODELING_FILE = "modeling_layer_path.py"


def layer_path_architecture(text_architecture: str) -> str:
    """The layer-path architecture over one family's layers: "Qwen2ForCausalLM" -> "LayerPathQwen2ForCausalLM"."""
    return "LayerPath" + text_architecture


def _layer_path_config(hf: dict, source: str, text_architecture: str):
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
    # layer_types is per hop (what transformers' cache and masks read); stored_layer_types per stored layer.
    text = ARCHITECTURES[text_architecture].parse_config(
        {**hf, "num_hidden_layers": stored, "layer_types": hf.get("stored_layer_types")}, source)
    return LayerPathConfig(text, num_hops=len(path), text_model_type=FAMILIES[text_architecture].model_type,
                           path=tuple(zip(path, scales)))


def _layer_path_hf_config(config, text_architecture: str) -> dict:
    if config.path is None or len(config.path) != config.num_hops:
        raise ValueError("save a layer-path model after compact_path(model): its config must name every hop")
    name = layer_path_architecture(text_architecture)
    fields = ARCHITECTURES[text_architecture].to_hf_config(config.text)
    stored_types = fields.pop("layer_types", None)
    family = name.removeprefix("LayerPath").removesuffix("ForCausalLM")
    fields.update(architectures=[name], model_type=f"layer_path_{FAMILIES[text_architecture].model_type}",
                  num_hidden_layers=config.num_hops, num_stored_layers=config.text.num_layers,
                  layer_path=[i for i, _ in config.path], layer_scales=[s for _, s in config.path],
                  auto_map={"AutoConfig": f"modeling_layer_path.LayerPath{family}Config",
                            "AutoModelForCausalLM": f"modeling_layer_path.{name}"})
    if stored_types is not None:
        fields.update(stored_layer_types=stored_types, layer_types=[stored_types[i] for i, _ in config.path])
    return fields


def _build_layer_path(config, *, dtype, rngs):
    from jaxmerge.models.layer_path import LayerPathTransformer

    return LayerPathTransformer(config, dtype=dtype, rngs=rngs)


def _layer_path_extra_state(config) -> dict:
    from jaxmerge.models.layer_path import hops_of_config

    return hops_of_config(config)


for _text in FAMILIES:
    _name = layer_path_architecture(_text)
    ARCHITECTURES[_name] = Architecture(
        name=_name, model_type=f"layer_path_{FAMILIES[_text].model_type}",
        parse_config=lambda hf, source, t=_text: _layer_path_config(hf, source, t),
        to_hf_config=lambda c, t=_text: _layer_path_hf_config(c, t),
        build=_build_layer_path,
        key_of=lambda path: _causal_lm_key(path).replace("model.layers.", "model.stored_layers.", 1),
        ignored_keys=("rotary_emb.inv_freq",), extra_state=_layer_path_extra_state,
        code_files=(LAYER_PATH_MODELING_FILE,),
        claimed_sizes=lambda hf: _text_sizes(hf, layers_field="num_stored_layers", layers="stored_layers"),
    )


def text_architecture(model_type: str) -> str:
    """The registry name of a text family by its model_type ("qwen2" -> "Qwen2ForCausalLM")."""
    for name, family in FAMILIES.items():
        if family.model_type == model_type:
            return name
    raise KeyError(f"unknown text model_type {model_type!r} (supported: "
                   f"{', '.join(f.model_type for f in FAMILIES.values())})")


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
