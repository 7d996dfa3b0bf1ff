"""LLaVA and LLaVA-NeXT in Flax NNX: a CLIP vision encoder, a two-layer projector, and a
Llama/Mistral language model whose image-token embeddings are replaced by projected image
features.

The prompt holds one image token per image feature (transformers' processors expand
`<image>` that way), so `model(input_ids, pixel_values, image_sizes)` takes the arrays
exactly as a transformers LLaVA / LLaVA-NeXT processor returns them.

LLaVA-NeXT ("anyres") cuts each image into a grid of tiles at the best of
`image_grid_pinpoints`, plus the whole image resized; its features are the whole image's,
then the tiles' laid out as one large feature map, with the rows and columns that only
padding filled removed and a learned `image_newline` ending each row. That layout depends
on the image sizes alone, so it is computed on the host as an index into the tiles'
features (`feature_index`), and the jitted model only gathers: new image sizes change
data, never the program's structure beyond the number of image tokens.

Axis names: B batch, T tokens, I images, P tiles per image (NeXT), N image features per
tile, F image tokens in the prompt, D text hidden size, Dv vision hidden size.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
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
    # LLaVA-NeXT: the (height, width) resolutions an image may be tiled at; None for LLaVA(-1.5).
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported projector_hidden_act {self.projector_hidden_act!r}")
        if self.image_grid_pinpoints is not None:
            if self.vision_feature_select_strategy != "default":  # transformers' tiling needs a square map
                raise ValueError("LLaVA-NeXT supports vision_feature_select_strategy 'default' only")
            side = self.vision.image_size
            for pinpoint in self.image_grid_pinpoints:
                if len(pinpoint) != 2 or pinpoint[0] % side or pinpoint[1] % side:
                    raise ValueError(f"image_grid_pinpoints entry {list(pinpoint)} is not a (height, width) "
                                     f"multiple of the vision image_size {side}")

    @property
    def is_next(self) -> bool:
        return self.image_grid_pinpoints is not None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return tuple(layer) if isinstance(layer, (tuple, list)) else (layer,)

    @property
    def image_features(self) -> int:
        """Image features per image (LLaVA), per tile (LLaVA-NeXT)."""
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


def select_best_resolution(size: tuple[int, int], resolutions) -> tuple[int, int]:
    """The (height, width) among `resolutions` that keeps most of an image of `size`
    (height, width) when it is scaled to fit, wasting least on ties (LLaVA-NeXT's rule)."""
    height, width = size
    best, best_kept, best_wasted = None, 0, math.inf
    for h, w in resolutions:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = h * w - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (h, w), kept, wasted
    return best


def anyres_grid(config: LlavaConfig, size: tuple[int, int]) -> tuple[int, int]:
    """Tiles (rows, columns) of an image of `size` (height, width)."""
    h, w = select_best_resolution(size, config.image_grid_pinpoints)
    return h // config.vision.image_size, w // config.vision.image_size


def unpadded_rows_and_columns(size: tuple[int, int], height: int, width: int) -> tuple[slice, slice]:
    """The part of a [height, width] feature map that shows an image of `size` (the tiles'
    padding removed), as transformers' unpad_image computes it."""
    original_height, original_width = size
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        pad = (height - new_height) // 2
        return slice(pad, height - pad), slice(0, width)
    new_width = int(round(original_width * (height / original_height), 7))
    pad = (width - new_width) // 2
    return slice(0, height), slice(pad, width - pad)


def anyres_feature_index(config: LlavaConfig, image_sizes, tiles: int) -> np.ndarray:
    """For LLaVA-NeXT: which row of the flattened tile features [I * P * N + 1, D] (the
    last row is image_newline) each image token takes, in prompt order. [F] int32.
    image_sizes [I, 2]: each image's (height, width) before preprocessing; tiles: P, the
    tiles per image in pixel_values (the whole image first, then the grid, zero-padded)."""
    side = config.vision.image_size // config.vision.patch_size  # features per tile side
    N = side * side
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    newline = len(sizes) * tiles * N
    index = []
    for i, (height, width) in enumerate(sizes.tolist()):
        rows, columns = anyres_grid(config, (height, width))
        if 1 + rows * columns > tiles:
            raise ValueError(f"image {i} of size {height}x{width} needs {1 + rows * columns} tiles, but "
                             f"pixel_values holds {tiles} per image: were they made by this model's processor?")
        first = i * tiles * N
        y, x = np.meshgrid(np.arange(rows * side), np.arange(columns * side), indexing="ij")
        tile = 1 + (y // side) * columns + x // side  # [rows * side, columns * side]
        grid = first + tile * N + (y % side) * side + x % side
        keep_rows, keep_columns = unpadded_rows_and_columns((height, width), rows * side, columns * side)
        grid = grid[keep_rows, keep_columns]
        grid = np.concatenate([grid, np.full((grid.shape[0], 1), newline)], axis=1)  # a newline ends each row
        index += [np.arange(first, first + N), grid.reshape(-1)]
    return np.concatenate(index).astype(np.int32) if index else np.zeros((0,), np.int32)


class Llava(nnx.Module):
    """`model(input_ids, pixel_values=..., image_sizes=..., attention_mask=...)` -> logits [B, T, V].

    pixel_values: [I, C, H, W] (LLaVA) or [I, P, C, H, W] with image_sizes [I, 2]
    (LLaVA-NeXT), as transformers' processors return them."""

    def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.vision_tower = VisionTransformer(config.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(config, dtype=dtype, rngs=rngs)
        self.language_model = Transformer(config.text, dtype=dtype, rngs=rngs)
        if config.is_next:
            self.image_newline = nnx.Param(jnp.zeros((config.text.hidden_size,), dtype))

    @property
    def dtype(self):
        return self.language_model.dtype

    def init_cache(self, batch_size: int, length: int) -> KVCache:
        return self.language_model.init_cache(batch_size, length)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[I, C, H, W] -> [I, N, D]: the chosen vision layers, projected."""
        states = self.vision_tower.hidden_states(pixel_values, self.config.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]  # drop the class token
        return self.multi_modal_projector(jnp.concatenate(states, axis=-1))

    def image_inputs(self, pixel_values, image_sizes=None, feature_index=None) -> dict:
        """The image arguments of `forward`, checked, from a processor's arrays: for
        LLaVA-NeXT the feature layout is computed here from concrete image_sizes (or
        given as feature_index, computed so before, inside jit)."""
        shape = np.shape(pixel_values)
        if not self.config.is_next:
            if len(shape) != 4:
                raise ValueError(f"pixel_values must be [images, channels, height, width], got shape {shape}")
            return {"pixel_values": jnp.asarray(pixel_values)}
        if len(shape) != 5:
            raise ValueError(f"LLaVA-NeXT pixel_values must be [images, tiles, channels, height, width], "
                             f"got shape {shape}")
        if feature_index is not None:
            return {"pixel_values": jnp.asarray(pixel_values), "feature_index": jnp.asarray(feature_index)}
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes [images, 2] (height, width), as its processor returns")
        if isinstance(image_sizes, jax.core.Tracer):
            raise ValueError("image_sizes must be concrete (numpy), not traced: call model.image_inputs(...) "
                             "outside jit and pass its feature_index into jit instead")
        if np.shape(image_sizes) != (shape[0], 2):
            raise ValueError(f"image_sizes has shape {np.shape(image_sizes)}; expected ({shape[0]}, 2) "
                             f"for {shape[0]} images")
        return {"pixel_values": jnp.asarray(pixel_values),
                "feature_index": jnp.asarray(anyres_feature_index(self.config, image_sizes, shape[1]))}

    def image_token_count(self, images: dict) -> int:
        """Image tokens the prompt must hold for `image_inputs(...)`."""
        if "feature_index" in images:
            return int(images["feature_index"].shape[0])
        return int(images["pixel_values"].shape[0]) * self.config.image_features

    def check_image_tokens(self, input_ids, images: dict, padded: bool = False) -> None:
        """One image token in the prompt per image feature, or a clear error (outside jit).
        padded: a precomputed LLaVA-NeXT layout may be longer than the prompt needs (padded
        to one length for many batches: one compilation); its extra rows are never read."""
        if isinstance(input_ids, jax.core.Tracer) or isinstance(images["pixel_values"], jax.core.Tracer):
            return
        token_id = self.config.image_token_id
        tokens = int(np.sum(np.asarray(input_ids) == token_id))
        features = self.image_token_count(images)
        if tokens != features and not (padded and tokens < features):
            raise ValueError(f"the prompt holds {tokens} image tokens (id {token_id}) for "
                             f"{images['pixel_values'].shape[0]} images with {features} image features; "
                             f"expand each <image> as the model's processor does")

    def packed_image_features(self, pixel_values: jax.Array, feature_index: jax.Array | None) -> jax.Array:
        """The image features in prompt order, [F, D]."""
        if feature_index is None:
            features = self.image_features(pixel_values)  # [I, N, D]
            return features.reshape(-1, features.shape[-1])
        I, P = pixel_values.shape[:2]
        features = self.image_features(pixel_values.reshape(I * P, *pixel_values.shape[2:]))  # [I*P, N, D]
        features = features.reshape(-1, features.shape[-1])  # [I*P*N, D]
        rows = jnp.concatenate([features, self.image_newline[None].astype(features.dtype)])  # [I*P*N+1, D]
        return rows[feature_index]  # [F, D]

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None,
              feature_index: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D], image tokens replaced in order by image features."""
        x = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return x
        features = self.packed_image_features(pixel_values, feature_index).astype(x.dtype)  # [F, D]
        is_image = input_ids == self.config.image_token_id  # [B, T]
        index = jnp.cumsum(is_image.reshape(-1)) - 1  # the k-th image token takes feature k
        gathered = features[jnp.clip(index, 0, features.shape[0] - 1)].reshape(x.shape)
        return jnp.where(is_image[..., None], gathered, x)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, image_sizes=None,
                 attention_mask: jax.Array | None = None, logits_last: int | None = None) -> jax.Array:
        B, T = input_ids.shape
        # Image tokens stand for image features, whatever the vocabulary (NaN logits otherwise).
        self.config.text.check_token_ids(
            input_ids, also_allowed=None if pixel_values is None else self.config.image_token_id)
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        mask = causal_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), attention_mask)
        images = {}
        if pixel_values is not None:
            images = self.image_inputs(pixel_values, image_sizes)
            self.check_image_tokens(input_ids, images)
        logits, _ = self.forward(input_ids, positions_from_mask(attention_mask), mask, logits_last=logits_last,
                                 **images)
        return logits

    def forward(self, input_ids, positions, mask, kv_cache=None, cache_index=0, pixel_values=None,
                feature_index=None, logits_last: int | None = None, layers=None):
        x = self.embed(input_ids, pixel_values, feature_index)
        return self.language_model.forward(input_ids, positions, mask, kv_cache, cache_index, inputs_embeds=x,
                                           logits_last=logits_last, layers=layers)

    def split_layers(self):
        return self.language_model.split_layers()
