"""The decoder families that share one Flax model (`models/transformer.py`).

A family is a `Family` (transformers' defaults for the config fields a checkpoint leaves out,
and the family's traits) registered under its config.json architecture name with
`register_family`; the registry then gives it its loader, saver and checkpoint keys. Another
package adds a family the same way, without editing this one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxmerge.architectures.config_fields import boolean, choice, integer, number, parse_rope, require, rope_to_hf
from jaxmerge.architectures.registry import ARCHITECTURES, Architecture, ParamPath, register_architecture
from jaxmerge.errors import CheckpointError
from jaxmerge.models.config import LAYER_TYPES, RopeConfig, TransformerConfig
from jaxmerge.models.modules import ACTIVATIONS
from jaxmerge.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Family:
    """How one family of decoders reads and writes config.json: transformers' defaults for
    fields a config leaves out, and the family's fixed traits (the flags of `TransformerConfig`
    its layers compute with). A new family whose layers are built from the blocks in
    `models/modules.py` is one `Family` and one `register_family` call; new computation is a flag there."""

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


def register_family(name: str, family: Family, *, replace: bool = False) -> Architecture:
    """Registers a decoder family under its config.json architecture name ("LlamaForCausalLM")."""
    return register_architecture(_decoder(name, family), replace=replace)


def text_architecture(model_type: str) -> str:
    """The registry name of a text family by its model_type ("qwen2" -> "Qwen2ForCausalLM")."""
    families = [arch for arch in ARCHITECTURES.values() if arch.family is not None]
    for arch in families:
        if arch.model_type == model_type:
            return arch.name
    raise KeyError(f"unknown text model_type {model_type!r} (supported: "
                   f"{', '.join(arch.model_type for arch in families)})")


def causal_lm_key(path: ParamPath) -> str:
    """transformers' causal-LM layout: the decoder under `model.`, the head beside it."""
    return ("" if path[0] == "lm_head" else "model.") + ".".join(path)


def text_sizes(hf: dict, where: str = "", prefix: str = "model.", layers_field: str = "num_hidden_layers",
               layers: str = "layers") -> list[tuple[str, Any, str, int | None]]:
    """A decoder's layer count and embedding sizes as config.json (or its text_config: `where`) claims them."""
    embedding = f"{prefix}embed_tokens.weight"
    return [(where + layers_field, hf.get(layers_field), f"{prefix}{layers}.", None),
            (where + "vocab_size", hf.get("vocab_size"), embedding, 0),
            (where + "hidden_size", hf.get("hidden_size"), embedding, 1)]


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
        key_of=causal_lm_key,
        ignored_keys=("rotary_emb.inv_freq",),
        claimed_sizes=text_sizes,
        family=family,
    )


# Reading config.json: the fields with transformers' defaults filled in, then each group of
# TransformerConfig fields in turn (head sizes, sliding layers, biases, soft-capping, RoPE).

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_NULL_MEANS_NONE = ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping")


def _with_defaults(hf: dict, family: Family) -> dict:
    """A field left out (or null) takes transformers' default; a null window or cap is "none"."""
    given = {name: value for name, value in hf.items() if value is not None or name in _NULL_MEANS_NONE}
    return {**family.defaults, **given}


def _decoder_config(hf: dict, source: str, family: Family) -> TransformerConfig:
    require(hf, _REQUIRED, source)
    fields = _with_defaults(hf, family)
    hidden_size, num_heads, num_kv_heads, head_dim = _head_sizes(hf, fields, source)
    num_layers = integer(hf["num_hidden_layers"], "num_hidden_layers", source)
    hf = {**hf, "head_dim": head_dim}  # longrope's factor lists are per rotating frequency
    window, layer_types = _sliding_layers(hf, fields, source, family, num_layers)
    computed = {**family.traits, "layer_types": layer_types, **_biases(fields, source, family),
                **_softcaps(fields, source, family), **_ropes(hf, source, family)}
    if fields.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention is not supported (a causal LM is)")
    activation = fields.get(family.activation_field)
    if activation is None and family.activation_field != "hidden_act":
        activation = fields.get("hidden_act")  # older Gemma configs
    return TransformerConfig(
        vocab_size=integer(hf["vocab_size"], "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=integer(hf["intermediate_size"], "intermediate_size", source),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=number(fields.get("rms_norm_eps"), "rms_norm_eps", source),
        sliding_window=window,
        tie_word_embeddings=boolean(fields.get("tie_word_embeddings"), "tie_word_embeddings", source),
        hidden_act=choice(activation, family.activation_field, source, tuple(ACTIVATIONS)),
        max_position_embeddings=integer(fields.get("max_position_embeddings"), "max_position_embeddings", source),
        **computed,
    )


def _head_sizes(hf: dict, fields: dict, source: str) -> tuple[int, int, int, int]:
    """hidden_size, num_heads, num_kv_heads and head_dim, consistent with one another."""
    hidden_size = integer(hf["hidden_size"], "hidden_size", source)
    num_heads = integer(hf["num_attention_heads"], "num_attention_heads", source)
    num_kv_heads = fields.get("num_key_value_heads")  # no default: as many as query heads (multi-head attention)
    num_kv_heads = num_heads if num_kv_heads is None else integer(num_kv_heads, "num_key_value_heads", source)
    if num_heads % num_kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
        )
    head_dim = fields.get("head_dim")
    if head_dim is None:
        if hidden_size % num_heads:
            raise CheckpointError(f"{source}: hidden_size ({hidden_size}) is not a multiple of num_attention_heads "
                                  f"({num_heads}) and no head_dim is given")
        head_dim = hidden_size // num_heads
    else:
        head_dim = integer(head_dim, "head_dim", source)
    if head_dim % 2:  # RoPE rotates the two halves of each head
        raise CheckpointError(f"{source}: head_dim ({head_dim}) must be even for rotary position embeddings")
    return hidden_size, num_heads, num_kv_heads, head_dim


def _sliding_layers(hf: dict, fields: dict, source: str, family: Family, num_layers: int
                    ) -> tuple[int | None, tuple[str, ...] | None]:
    """The sliding window and which layers use it (None: as the family's sliding rule says)."""
    window = fields.get("sliding_window")
    window = None if window is None else integer(window, "sliding_window", source)
    layer_types = None
    if family.sliding == "none":
        window = None
    elif family.sliding == "from_max_window_layers":  # Qwen: use_sliding_window gates it
        if not boolean(fields.get("use_sliding_window"), "use_sliding_window", source):
            window = None
        first = integer(fields.get("max_window_layers"), "max_window_layers", source, minimum=0)
        layer_types = [("sliding_attention" if window is not None and i >= first else "full_attention")
                       for i in range(num_layers)]
    elif family.sliding == "types":
        pattern = hf.get(family.sliding_pattern_field) if family.sliding_pattern_field else None
        pattern = family.default_sliding_pattern if pattern is None else integer(
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
    return window, None if layer_types is None else tuple(layer_types)


def _biases(fields: dict, source: str, family: Family) -> dict:
    biases = {}
    if "attention_bias" in family.defaults:
        bias = boolean(fields.get("attention_bias"), "attention_bias", source)
        biases.update(qkv_bias=bias, o_bias=bias)
    if "mlp_bias" in family.defaults:
        biases["mlp_bias"] = boolean(fields.get("mlp_bias"), "mlp_bias", source)
    if family.bias == "qkv":
        biases.update(qkv_bias=True, o_bias=False)
    return biases


def _softcaps(fields: dict, source: str, family: Family) -> dict:
    if not family.softcaps:
        return {}
    caps = {"query_pre_attn_scalar": number(fields.get("query_pre_attn_scalar"), "query_pre_attn_scalar", source)}
    for name, field in (("attn_logit_softcapping", "attn_logit_softcap"),
                        ("final_logit_softcapping", "final_logit_softcap")):
        if name not in family.defaults:  # the family's transformers class never applies it
            continue
        value = fields.get(name)
        caps[field] = None if value is None else number(value, name, source)
    return caps


def _ropes(hf: dict, source: str, family: Family) -> dict:
    if family.local_rope:
        return {"rope": _local_rope(hf, source, "full_attention"),
                "rope_local": _local_rope(hf, source, "sliding_attention")}
    return {"rope": parse_rope(hf, source, default_theta=family.default_theta)}


def _local_rope(hf: dict, source: str, layer_type: str) -> RopeConfig:
    """Gemma 3's RoPE for one layer type: transformers 5's nested rope_parameters, or the
    older rope_theta + rope_scaling (global layers) and rope_local_base_freq (local ones)."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and any(k in LAYER_TYPES for k in params):
        theta = {"full_attention": hf.get("rope_theta", 1_000_000.0),
                 "sliding_attention": hf.get("rope_local_base_freq", 10_000.0)}[layer_type]
        return parse_rope({**hf, "rope_theta": theta}, source, layer_type=layer_type)
    if layer_type == "sliding_attention":
        theta = hf.get("rope_local_base_freq")
        return RopeConfig(theta=10_000.0 if theta is None else number(theta, "rope_local_base_freq", source))
    return parse_rope(hf, source, default_theta=1_000_000.0)


def _check_biases(config: TransformerConfig, family: Family, source: str) -> None:
    """A checkpoint flag the family's transformers class would ignore is refused, not dropped."""
    if family.bias == "all" and config.qkv_bias != config.o_bias:
        raise CheckpointError(f"{source}: {family.model_type} puts attention_bias on q, k, v and o alike")


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
    fields.update(_rope_hf_fields(config, family))
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


def _rope_hf_fields(config: TransformerConfig, family: Family) -> dict:
    """RoPE in both layouts, so that transformers 4 and 5 read the same: 5's rope_parameters
    (nested per layer type for Gemma 3), 4's rope_theta and rope_scaling."""
    if family.local_rope:
        local = config.rope_local or config.rope
        return dict(rope_parameters={"full_attention": rope_to_hf(config.rope), "sliding_attention": rope_to_hf(local)},
                    rope_theta=config.rope.theta, rope_local_base_freq=local.theta,
                    rope_scaling=None if config.rope.rope_type == "default" else rope_to_hf(config.rope))
    rope = rope_to_hf(config.rope)
    fields = dict(rope_parameters=rope, rope_theta=config.rope.theta,
                  rope_scaling=None if config.rope.rope_type == "default" else rope)
    if config.rope.partial_rotary_factor != 1.0:
        fields["partial_rotary_factor"] = config.rope.partial_rotary_factor
    if config.rope.rope_type in ("llama3", "yarn", "longrope") and family.model_type == "phi3":
        fields["original_max_position_embeddings"] = config.rope.original_max_position_embeddings
    return fields


# The families jaxmerge ships. Defaults are transformers' own for a field that config.json leaves out.

_GEMMA_TRAITS = dict(gemma_norm=True, sandwich_norms=True, scale_embeddings=True)

MISTRAL = Family(
    "mistral", dict(num_key_value_heads=8, rms_norm_eps=1e-6, sliding_window=4096, tie_word_embeddings=False,
                    hidden_act="silu", max_position_embeddings=4096 * 32))
LLAMA = Family(
    "llama", dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
                  mlp_bias=False, max_position_embeddings=2048), sliding="none")
QWEN2 = Family(
    "qwen2", dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    bias="qkv", sliding="from_max_window_layers")
QWEN3 = Family(
    "qwen3", dict(head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                  max_position_embeddings=32768, attention_bias=False, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
    traits=dict(qk_norm=True), sliding="from_max_window_layers")
GEMMA2 = Family(
    "gemma2", dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                   tie_word_embeddings=True, max_position_embeddings=8192, attention_bias=False,
                   query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    traits=_GEMMA_TRAITS, activation_field="hidden_activation", sliding="types", softcaps=True)
# transformers' Gemma 3 reads attn_logit_softcapping but never applies it: left out here too.
GEMMA3 = Family(
    "gemma3_text", dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                        tie_word_embeddings=True, max_position_embeddings=131072, attention_bias=False,
                        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None),
    traits=dict(_GEMMA_TRAITS, qk_norm=True), activation_field="hidden_activation", sliding="types",
    softcaps=True, local_rope=True, sliding_pattern_field="sliding_window_pattern", default_sliding_pattern=6)
PHI3 = Family(
    "phi3", dict(rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=4096,
                 sliding_window=None),
    traits=dict(fused_projections=True))

register_family("MistralForCausalLM", MISTRAL)
register_family("LlamaForCausalLM", LLAMA)
register_family("Qwen2ForCausalLM", QWEN2)
register_family("Qwen3ForCausalLM", QWEN3)
register_family("Gemma2ForCausalLM", GEMMA2)
register_family("Gemma3ForCausalLM", GEMMA3)
register_family("Phi3ForCausalLM", PHI3)
