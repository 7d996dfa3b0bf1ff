"""The CLIP vision encoder (as LLaVA uses it) in Flax NNX, layers stacked and scanned.

Axis names in shape comments: B images, C channels, P patch size, N patches (+1 with the
class token), D hidden size, E heads, H head dim, F MLP size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.models.modules import Embedding, Linear, default_init

VISION_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {self.hidden_act!r} "
                             f"(supported: {sorted(VISION_ACTIVATIONS)})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class LayerNorm(nnx.Module):
    def __init__(self, size: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.bias = nnx.Param(jnp.zeros((size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class PatchEmbedding(nnx.Module):
    """The stride-P convolution as a matmul over patches; weight [D, C, P, P] as stored."""

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.weight = nnx.Param(default_init(rngs.params(), (c.hidden_size, c.num_channels, c.patch_size, c.patch_size),
                                      dtype))
        self.patch_size = c.patch_size

    def __call__(self, pixels: jax.Array) -> jax.Array:  # [B, C, Hi, Wi] -> [B, N, D]
        B, C, height, width = pixels.shape
        P = self.patch_size
        patches = pixels.reshape(B, C, height // P, P, width // P, P)  # [B, C, h, P, w, P]
        return jnp.einsum("bcipjq,dcpq->bijd", patches, self.weight[...].astype(pixels.dtype)).reshape(B, -1,
                                                                                                         self.weight.shape[0])


class VisionEmbeddings(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.class_embedding = nnx.Param(default_init(rngs.params(), (config.hidden_size,), dtype))
        self.patch_embedding = PatchEmbedding(config, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(config.num_patches + 1, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:  # [B, C, Hi, Wi] -> [B, N+1, D]
        patches = self.patch_embedding(pixels.astype(self.class_embedding.dtype))  # [B, N, D]
        cls = jnp.broadcast_to(self.class_embedding[...], (patches.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.weight[...][None]


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        D = config.hidden_size
        self.config = config
        self.q_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, N, D] -> [B, N, D]
        c = self.config
        B, N, D = x.shape
        q = self.q_proj(x).reshape(B, N, c.num_heads, c.head_dim)  # [B, N, E, H]
        k = self.k_proj(x).reshape(B, N, c.num_heads, c.head_dim)
        v = self.v_proj(x).reshape(B, N, c.num_heads, c.head_dim)
        scores = jnp.einsum("bneh,bmeh->benm", q, k) * c.head_dim**-0.5  # [B, E, N, N]
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("benm,bmeh->bneh", probs, v).reshape(B, N, D))


class VisionMLP(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.activation = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, N, D] -> [B, N, D]
        return self.fc2(VISION_ACTIVATIONS[self.activation](self.fc1(x)))  # via [B, N, F]


class VisionBlock(nnx.Module):
    """Pre-norm: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.self_attn = VisionAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = VisionMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> VisionBlock:
            return VisionBlock(config, dtype=dtype, rngs=rngs)

        self.layers = make(rngs)


class VisionTransformer(nnx.Module):
    """CLIP's vision model. `hidden_states(pixels, layers)` gives what transformers calls
    `hidden_states[i]` for each i in `layers` (0: the embeddings after pre_layrnorm)."""

    def __init__(self, config: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = VisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)  # sic, as CLIP
        self.encoder = VisionEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)  # unused by LLaVA

    def hidden_states(self, pixels: jax.Array, layers: tuple[int, ...]) -> list[jax.Array]:
        """[B, N+1, D] per requested layer index (negative counts from the end, as in Python)."""
        count = self.config.num_layers + 1
        wanted = [i % count for i in layers]
        x = self.pre_layrnorm(self.embeddings(pixels))  # [B, N+1, D]
        graphdef, params = nnx.split(self.encoder.layers)
        params = jax.tree.map(lambda p: p[:max(wanted)], params)  # later layers are never needed

        def layer(x, p):
            x = nnx.merge(graphdef, p)(x)
            return x, x

        _, outputs = jax.lax.scan(layer, x, params)  # [max(wanted), B, N+1, D]
        return [x if i == 0 else outputs[i - 1] for i in wanted]
