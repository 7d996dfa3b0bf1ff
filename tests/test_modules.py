"""Small pure helpers, against values worked out by hand."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jaxmerge
from jaxmerge.checkpoint import transpose
from jaxmerge.models.config import RopeConfig, TransformerConfig
from jaxmerge.models.modules import apply_rope, causal_mask, rope_inverse_frequencies
from jaxmerge.models.transformer import Transformer, positions_from_mask
from jaxmerge.saving import parse_size


def test_causal_mask_with_padding_and_window():
    key_valid = jnp.array([[0, 1, 1, 1, 1]])
    query_index = jnp.arange(5)[None]
    mask = np.asarray(causal_mask(query_index, key_valid, sliding_window=2))[0].astype(int)
    expected = np.array([
        [0, 0, 0, 0, 0],  # a padding query sees nothing
        [0, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],  # window 2: itself and one back
        [0, 0, 0, 1, 1],
    ])
    np.testing.assert_array_equal(mask, expected)


def test_positions_from_left_padded_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_rope_rotates_pairs_and_keeps_norm():
    inv_freq = rope_inverse_frequencies(RopeConfig(theta=10_000.0), head_dim=4)
    np.testing.assert_allclose(inv_freq, [1.0, 0.01], rtol=1e-6)
    x = jnp.array([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    rotated = apply_rope(x, jnp.array([[2]]), inv_freq)  # pair (x0, x2) turned by angle 2
    np.testing.assert_allclose(np.asarray(rotated).ravel(), [np.cos(2), 0, np.sin(2), 0], atol=1e-6)
    linear = rope_inverse_frequencies(RopeConfig(rope_type="linear", factor=4.0), head_dim=4)
    np.testing.assert_allclose(linear, inv_freq / 4, rtol=1e-6)


@pytest.mark.parametrize("shape", [(37, 5), (16, 16), (1, 9)])
def test_blocked_transpose(shape):
    matrix = np.random.RandomState(0).randn(*shape).astype(ml_dtypes.bfloat16)
    out = transpose(matrix)
    assert out.dtype == matrix.dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out.view(np.uint16), matrix.view(np.uint16).T)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="shard size"):
        parse_size("lots")


def test_model_built_in_code_saves_and_reloads(tmp_path):
    config = TransformerConfig.tiny(sliding_window=8)
    model = Transformer(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="architecture="):
        jaxmerge.save(model, tmp_path / "a")
    out = jaxmerge.save(model, tmp_path / "a", architecture="MistralForCausalLM")
    reloaded = jaxmerge.load(out)
    assert reloaded.config == config
    ids = jnp.arange(12)[None] % config.vocab_size
    np.testing.assert_allclose(np.asarray(reloaded(ids)), np.asarray(model(ids)), atol=1e-6)
