"""What the rest of the package needs of a model, declared once.

Every architecture (`Transformer`, `LayerPathTransformer`, `Llava`) meets `CausalLM`;
VLMs meet `VisionLanguageModel` too. `generate`, the merge tree, layer paths and the
search rely on these members only.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class CausalLM(Protocol):
    """A decoder: logits of token ids, a KV cache for generation, a stacked-layer config.
    `forward`'s mask is causal and padding only: each layer applies its own sliding window."""

    config: Any  # has num_layers (the stacked layers merging and layer paths see)
    # (`dtype` is every model's too, but not declared here: Python 3.11's isinstance reads each
    # declared member, and an abstract model's dtype, under eval_shape, cannot be read.)

    def init_cache(self, batch_size: int, length: int) -> Any: ...

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
