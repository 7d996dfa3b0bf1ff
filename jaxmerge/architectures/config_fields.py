"""config.json field checks and RoPE parameters, shared by every architecture's config parser.

Each check returns the value as the config holds it, or raises naming the file and field: a
wrong type (a string, a bool, 3.5 for a count) must not reach int(), float() or bool()
("false" is truthy), nor fail later as a shape mismatch or a division by zero.
"""

from __future__ import annotations

import math

from jaxmerge.errors import CheckpointError
from jaxmerge.models.config import LAYER_TYPES, RopeConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def require(hf: dict, fields: tuple[str, ...], source: str) -> None:
    """Every one of `fields` is present and not null."""
    missing = [f for f in fields if hf.get(f) is None]
    if missing:
        raise CheckpointError(f"{source}: missing required config field(s): {', '.join(missing)}")


def integer(value, field: str, source: str, minimum: int = 1) -> int:
    """An integer >= minimum (JSON true/false and floats are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise CheckpointError(f"{source}: {field} must be {wanted}, got {value!r}")
    return value


def number(value, field: str, source: str, positive: bool = True) -> float:
    """A finite number (Python's json reads NaN and Infinity too), > 0 if positive."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (positive and value <= 0)):
        wanted = "a positive number" if positive else "a finite number"
        raise CheckpointError(f"{source}: {field} must be {wanted}, got {value!r}")
    return float(value)


def boolean(value, field: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: {field} must be true or false, got {value!r}")
    return value


def choice(value, field: str, source: str, supported) -> str:
    if not isinstance(value, str) or value not in supported:
        raise CheckpointError(f"{source}: {field} {value!r} is not supported (supported: {', '.join(supported)})")
    return value


def json_object(value, field: str, source: str) -> dict:
    """A nested JSON object; null or absent is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: {field} must be a JSON object, got {value!r}")
    return value


def parse_rope(hf: dict, source: str, *, layer_type: str | None = None, default_theta: float = 10_000.0
               ) -> RopeConfig:
    """Reads RoPE from either layout: transformers 5 `rope_parameters` or the older
    top-level `rope_theta` with `rope_scaling`. layer_type: the entry of per-layer-type
    parameters to read (Gemma 3's "full_attention" / "sliding_attention")."""
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = json_object(hf.get(where), where, source)
    nested = any(isinstance(v, dict) or v is None for k, v in params.items() if k in LAYER_TYPES)
    if nested:
        if layer_type is None:
            raise CheckpointError(f"{source}: per-layer-type {where} are not supported for this architecture")
        where = f"{where}.{layer_type}"
        params = json_object(params.get(layer_type), where, source)
    elif any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: {where} holds nested entries other than {', '.join(LAYER_TYPES)}")
    return _rope_params(params, where, hf, source, default_theta=default_theta)


def _rope_params(params: dict, where: str, hf: dict, source: str, *, default_theta: float) -> RopeConfig:
    """One RoPE parameter dict (rope_parameters, rope_scaling, or one layer type's entry) -> RopeConfig.
    Top-level fields (rope_theta, partial_rotary_factor, original_max_position_embeddings) fill
    what the dict leaves out, as transformers' standardize_rope_params does."""
    theta_field = f"{where}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = number(params.get("rope_theta", hf.get("rope_theta", default_theta)), theta_field, source)
    rope_type = _rope_type(params, where, source)
    fields: dict = dict(theta=theta, rope_type=rope_type)
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None:
        fields["partial_rotary_factor"] = number(partial, "partial_rotary_factor", source)
        if fields["partial_rotary_factor"] > 1:
            raise CheckpointError(f"{source}: partial_rotary_factor must be in (0, 1], got {partial!r}")
    fields.update(_length_scaling(params, where, hf, source, rope_type))
    if rope_type == "llama3":
        fields.update(_llama3_fields(params, where, source))
    if rope_type == "yarn":
        fields.update(_yarn_fields(params, where, source))
    if rope_type in ("yarn", "longrope") and params.get("attention_factor") is not None:
        fields["attention_factor"] = number(params["attention_factor"], f"{where}.attention_factor", source)
    if rope_type == "dynamic":
        fields["max_position_embeddings"] = integer(hf.get("max_position_embeddings"), "max_position_embeddings",
                                                    source)
    if rope_type == "longrope":
        fields.update(_longrope_fields(params, where, hf, source, fields))
    return RopeConfig(**fields)


def _rope_type(params: dict, where: str, source: str) -> str:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "su":  # Phi-3's old name
        rope_type = "longrope"
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{source}: {where}.rope_type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return rope_type


def _length_scaling(params: dict, where: str, hf: dict, source: str, rope_type: str) -> dict:
    """original_max_position_embeddings and factor: the context length a type scales from, and by how much."""
    fields: dict = {}
    if rope_type in ("llama3", "yarn", "longrope"):
        fields["original_max_position_embeddings"] = _original_length(params, where, hf, source, rope_type)
    if rope_type in ("linear", "llama3", "dynamic") or (rope_type == "yarn" and params.get("factor") is not None):
        if params.get("factor") is None:
            raise CheckpointError(f"{source}: rope type {rope_type!r} needs field {where}.factor")
        fields["factor"] = number(params["factor"], f"{where}.factor", source)
    if rope_type == "yarn" and "factor" not in fields:  # transformers: the length ratio
        fields["factor"] = integer(hf.get("max_position_embeddings"), "max_position_embeddings", source) / fields[
            "original_max_position_embeddings"]
    return fields


def _original_length(params: dict, where: str, hf: dict, source: str, rope_type: str) -> int:
    """The pre-training context length that llama3, yarn and longrope scale from."""
    name = "original_max_position_embeddings"  # Phi-3 keeps it at the top level
    value = hf.get(name) if hf.get(name) is not None else params.get(name, hf.get("max_position_embeddings"))
    if value is None:
        raise CheckpointError(f"{source}: rope type {rope_type!r} needs {name} (or max_position_embeddings)")
    return integer(value, f"{where}.{name}" if name in params else name, source)


def _llama3_fields(params: dict, where: str, source: str) -> dict:
    fields = {}
    for name in ("low_freq_factor", "high_freq_factor"):
        if name not in params:
            raise CheckpointError(f"{source}: rope type 'llama3' needs field {name!r}")
        fields[name] = number(params[name], f"{where}.{name}", source)
    if fields["high_freq_factor"] <= fields["low_freq_factor"]:  # llama3 divides by their difference
        raise CheckpointError(f"{source}: {where}.high_freq_factor ({fields['high_freq_factor']}) must be greater "
                              f"than low_freq_factor ({fields['low_freq_factor']})")
    return fields


def _yarn_fields(params: dict, where: str, source: str) -> dict:
    fields = {}
    for name in ("beta_fast", "beta_slow"):  # 0 or null: transformers' default
        if params.get(name):
            fields[name] = number(params[name], f"{where}.{name}", source)
    for name in ("mscale", "mscale_all_dim"):
        if params.get(name) is not None:
            fields[name] = number(params[name], f"{where}.{name}", source, positive=False)
    if params.get("truncate") is not None:
        fields["truncate"] = boolean(params["truncate"], f"{where}.truncate", source)
    return fields


def _longrope_fields(params: dict, where: str, hf: dict, source: str, parsed: dict) -> dict:
    """One factor per rotating frequency, short and long; the attention factor from the lengths
    unless given. `parsed`: the fields read so far (partial rotary factor, original length)."""
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    half = int(head_dim * parsed.get("partial_rotary_factor", 1.0)) // 2
    fields = {}
    for name in ("short_factor", "long_factor"):
        value = params.get(name)
        if (not isinstance(value, list) or len(value) != half
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
            raise CheckpointError(f"{source}: {where}.{name} must be a list of {half} numbers, got {value!r}")
        fields[name] = tuple(float(x) for x in value)
    if params.get("factor") is not None and "attention_factor" not in parsed:
        factor = number(params["factor"], f"{where}.factor", source)
        original = parsed["original_max_position_embeddings"]
        fields["attention_factor"] = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return fields


def rope_to_hf(rope: RopeConfig) -> dict:
    """A RopeConfig as config.json's rope_parameters."""
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
