"""What the rest of the package needs of a model, declared once.

Every architecture (`Transformer`, `LayerPathTransformer`, `Llava`) meets `CausalLM`;
VLMs meet `VisionLanguageModel` too. `generate`, the merge tree, layer paths and the
search rely on these members only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp


@runtime_checkable
class CausalLM(Protocol):
    """A decoder: logits of token ids, a KV cache for generation, a stacked-layer config.
    `forward`'s mask is causal and padding only: each layer applies its own sliding window."""

    config: Any  # has num_layers (the stacked layers merging and layer paths see)
    # (`dtype` is every model's too, but not declared here: Python 3.11's isinstance reads each
    # declared member, and an abstract model's dtype, under eval_shape, cannot be read.)

    def init_cache(self, batch_size: int, length: int) -> Any: ...

    def split_layers(self) -> Any:
        """The layers one by one for `forward(layers=...)` (decoding loops), or None where they
        cannot be split (a layer path picks them by data)."""

    def forward(self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array, kv_cache=None,
                cache_index=0, **inputs) -> tuple[jax.Array, Any]: ...


@runtime_checkable
class VisionLanguageModel(CausalLM, Protocol):
    """A LLaVA-style VLM: a language model (merged with LLMs) behind a vision tower and projector."""

    language_model: CausalLM

    def image_inputs(self, pixel_values, image_sizes=None, feature_index=None) -> dict: ...

    def check_image_tokens(self, input_ids, images: dict, padded: bool = False) -> None: ...


def language_model(model: CausalLM) -> CausalLM:
    """The language model of a VLM, or the model itself."""
    return model.language_model if isinstance(model, VisionLanguageModel) else model


def decoding(model: CausalLM, cache) -> tuple[Callable, Any, Callable]:
    """(forward, cache, stacked) for a decoding loop: `model.forward` on its layers split once
    (`split_layers`), the stacked cache (keys, values [L, B, S, K, H]) as one per layer, so that
    each step reads each weight in place, and the function that stacks such a cache again
    (for a loop that hands its cache on). The model's own forward where it cannot split."""
    layers = model.split_layers()
    if layers is None:
        return model.forward, cache, lambda cache: cache
    keys, values = cache
    per_layer = tuple((keys[i], values[i]) for i in range(len(layers)))

    def stacked(per_layer):
        return tuple(jnp.stack(x) for x in zip(*per_layer, strict=True))

    return functools.partial(model.forward, layers=layers), per_layer, stacked
