"""LLaVA in Flax NNX: a CLIP vision encoder, a two-layer projector, and a Llama/Mistral
language model whose image-token embeddings are replaced by projected image features.

The prompt holds one image token per image feature (transformers' processors expand
`<image>` that way), so `model(input_ids, pixel_values)` takes the arrays exactly as a
transformers LLaVA processor returns them. Axis names: B batch, T tokens, I images,
N image features per image, D text hidden size, Dv vision hidden size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.modules import ACTIVATIONS, Linear, causal_mask
from jaxmerge.models.transformer import KVCache, Transformer, positions_from_mask
from jaxmerge.models.vision import VisionConfig, VisionTransformer


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig
    text: TransformerConfig
    text_model_type: str = "llama"  # the language model's architecture: "llama" | "mistral"
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops the class token; "full" keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported projector_hidden_act {self.projector_hidden_act!r}")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return tuple(layer) if isinstance(layer, (tuple, list)) else (layer,)

    @property
    def image_features(self) -> int:
        """Image tokens per image in the prompt."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def num_layers(self) -> int:  # the language model's: what merging and searching see
        return self.text.num_layers


class MultiModalProjector(nnx.Module):
    def __init__(self, config: LlavaConfig, *, dtype, rngs: nnx.Rngs):
        features = config.vision.hidden_size * len(config.feature_layers)
        D = config.text.hidden_size
        self.linear_1 = Linear(features, D, bias=config.projector_bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(D, D, bias=config.projector_bias, dtype=dtype, rngs=rngs)
        self.activation = config.projector_hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:  # [I, N, Dv] -> [I, N, D]
        return self.linear_2(ACTIVATIONS[self.activation](self.linear_1(x)))


class Llava(nnx.Module):
    """`model(input_ids, pixel_values=..., attention_mask=...)` -> logits [B, T, V]."""

    def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.vision_tower = VisionTransformer(config.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(config, dtype=dtype, rngs=rngs)
        self.language_model = Transformer(config.text, dtype=dtype, rngs=rngs)

    @property
    def dtype(self):
        return self.language_model.dtype

    @property
    def sliding_window(self) -> int | None:
        return self.config.text.sliding_window

    def init_cache(self, batch_size: int, length: int) -> KVCache:
        return self.language_model.init_cache(batch_size, length)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[I, C, H, W] -> [I, N, D]: the chosen vision layers, projected."""
        states = self.vision_tower.hidden_states(pixel_values, self.config.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]  # drop the class token
        return self.multi_modal_projector(jnp.concatenate(states, axis=-1))

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
        """Token embeddings [B, T, D], image tokens replaced in order by image features."""
        x = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return x
        features = self.image_features(pixel_values)  # [I, N, D]
        features = features.reshape(-1, features.shape[-1]).astype(x.dtype)  # [I*N, D]
        is_image = input_ids == self.config.image_token_id  # [B, T]
        index = jnp.cumsum(is_image.reshape(-1)) - 1  # the k-th image token takes feature k
        gathered = features[jnp.clip(index, 0, features.shape[0] - 1)].reshape(x.shape)
        return jnp.where(is_image[..., None], gathered, x)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        mask = causal_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), attention_mask, self.sliding_window)
        logits, _ = self.forward(input_ids, positions_from_mask(attention_mask), mask, pixel_values=pixel_values)
        return logits

    def forward(self, input_ids, positions, mask, kv_cache=None, cache_index=0, pixel_values=None):
        x = self.embed(input_ids, pixel_values)
        return self.language_model.forward(input_ids, positions, mask, kv_cache, cache_index, inputs_embeds=x)
