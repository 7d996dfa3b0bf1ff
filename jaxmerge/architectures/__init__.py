"""The registry of Hugging Face architectures jaxmerge can load and save.

An architecture says three things: how `config.json` becomes a frozen config, how to build
the Flax model, and how a parameter path of that model is named in the checkpoint
(`registry.Architecture`). Each kind registers itself when this package is imported:

    registry.py        the Architecture dataclass and the one table of them
    config_fields.py   config.json field checks and RoPE parameters, shared by the parsers
    decoders.py        the text families (Mistral, Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3)
                       that share one Flax model: each a `Family` and one `register_family` call
    llava.py           LLaVA and LLaVA-NeXT (other prefixes, a vision tower)
    layer_path.py      the layer-path (DFS-merged) model over each shipped text family

Another package adds an architecture with `register_architecture`, or a decoder family of the
shared model with `register_family`, and removes it with `unregister_architecture`.
"""

import math

import jax
from flax import nnx

# Each kind's module registers its architectures when imported.
from jaxmerge.architectures import decoders, layer_path, llava  # noqa: F401
from jaxmerge.architectures.config_fields import SUPPORTED_ROPE_TYPES, parse_rope, rope_to_hf
from jaxmerge.architectures.decoders import Family, register_family, text_architecture
from jaxmerge.architectures.layer_path import LAYER_PATH_MODELING_FILE, layer_path_architecture
from jaxmerge.architectures.registry import (
    ARCHITECTURES,
    Architecture,
    ParamPath,
    architecture_by_name,
    architecture_of,
    register_architecture,
    unregister_architecture,
)


def parameter_count(model: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
    "ARCHITECTURES", "Architecture", "Family", "LAYER_PATH_MODELING_FILE", "ParamPath", "SUPPORTED_ROPE_TYPES",
    "architecture_by_name", "architecture_of", "layer_path_architecture", "parameter_count", "parse_rope",
    "register_architecture", "register_family", "rope_to_hf", "text_architecture", "unregister_architecture",
]
