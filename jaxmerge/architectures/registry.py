"""The open registry of architectures: what an `Architecture` says, and the one table of them.

Every architecture jaxmerge ships registers itself when `jaxmerge.architectures` is imported;
another package adds its own with `register_architecture` (or `register_family` for a decoder
built from the shared Flax model) without editing this one.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from flax import nnx

from jaxmerge.errors import CheckpointError

if TYPE_CHECKING:
    from jaxmerge.architectures.decoders import Family

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture is loaded and saved.

    Parameter paths map to checkpoint keys by joining their parts with dots, after a
    per-architecture prefix (`key_of`); a path through a stacked `layers` module stands for
    one key per layer (`...layers.{i}...`); a linear `kernel` [in, out] is the checkpoint's
    transposed `weight` [out, in]."""

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
    # A decoder family of the shared Flax Transformer (set by `register_family`): such an
    # architecture can be a LLaVA's language model and the layers of a layer path.
    family: Family | None = None

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


_REGISTRY: dict[str, Architecture] = {}
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(_REGISTRY)  # read-only: change it by (un)registering


def register_architecture(architecture: Architecture, *, replace: bool = False) -> Architecture:
    """Adds `architecture` under its name; a name already registered is refused unless `replace`."""
    if architecture.name in _REGISTRY and not replace:
        raise ValueError(f"architecture {architecture.name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[architecture.name] = architecture
    return architecture


def unregister_architecture(name: str) -> Architecture:
    """Removes a registered architecture and returns it."""
    return _REGISTRY.pop(architecture_by_name(name).name)


def _supported() -> str:
    return ", ".join(sorted(_REGISTRY))


def architecture_of(hf: dict, source: str) -> Architecture:
    """The registry entry for a config.json, by its `architectures` list (or `model_type`)."""
    names = hf.get("architectures") or []  # empty: by model_type, as transformers' Auto classes do
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{source}: architectures must be a list of class names, got {names!r}")
    for name in names:
        if name in _REGISTRY:
            return _REGISTRY[name]
    if not names:
        for arch in _REGISTRY.values():
            if arch.model_type == hf.get("model_type"):
                return arch
    found = names or hf.get("model_type") or "none given"
    raise CheckpointError(f"{source}: unsupported architecture {found} (supported: {_supported()})")


def architecture_by_name(name: str) -> Architecture:
    if name not in _REGISTRY:
        raise KeyError(f"unknown architecture {name!r} (supported: {_supported()})")
    return _REGISTRY[name]
