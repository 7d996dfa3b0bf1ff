"""The Flax model equals transformers' PyTorch model: logits and greedy tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CONFIGS, hf_logits, random_ids
from flax import nnx

import jaxmerge

ATOL = 1e-4


def left_padded(batch_ids: np.ndarray, lengths: list[int], pad: int = 0):
    """Left-pads each row of batch_ids to its full width, keeping its last `length` tokens."""
    ids = batch_ids.copy()
    mask = np.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : ids.shape[1] - length] = pad
        mask[row, : ids.shape[1] - length] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(hf_checkpoint, name):
    hf_model, directory = hf_checkpoint(name)
    model = jaxmerge.load(directory)
    ids = random_ids(2, 12)
    ours = np.asarray(model(jnp.asarray(ids)))
    assert ours.shape == (2, 12, hf_model.config.vocab_size)
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


# One per family, with sliding or mixed local/global layers where it has them.
@pytest.mark.parametrize("name", ["mistral_sliding", "llama3_rope", "qwen2_sliding", "qwen3_sliding", "gemma2_softcap",
                                  "gemma3_rope", "phi3_sliding"])
def test_left_padded_logits_match_transformers(hf_checkpoint, name):
    hf_model, directory = hf_checkpoint(name)
    model = jaxmerge.load(directory)
    ids, mask = left_padded(random_ids(3, 10, seed=1), [10, 6, 3])
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)  # padding positions are not compared
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


def hf_greedy(hf_model, ids, mask, max_new_tokens, eos):
    with torch.no_grad():
        return hf_model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=eos, pad_token_id=eos,
        ).numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_match_transformers(hf_checkpoint, name):
    hf_model, directory = hf_checkpoint(name)
    model = jaxmerge.load(directory)
    ids, mask = left_padded(random_ids(3, 7, seed=2), [7, 4, 2])
    # An EOS that the model actually emits in row 0, so that rows end at different steps.
    free_run = np.asarray(jaxmerge.generate(model, ids, 12, attention_mask=mask, eos_token_id=None))
    eos = int(free_run[0, 7 + 4])
    ours = np.asarray(jaxmerge.generate(model, ids, 12, eos_token_id=eos, attention_mask=mask))
    ref = hf_greedy(hf_model, ids, mask, 12, eos)
    assert ours.shape == (3, 7 + 12)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == eos).all()  # rows that ended are padded with EOS
    assert (ours[0, 7 + 5:] == eos).all()



def test_generate_compiles_once_per_shape(hf_checkpoint):
    from jaxmerge.generation import greedy_program
    _, directory = hf_checkpoint("mistral_gqa")
    model = jaxmerge.load(directory)
    jaxmerge.generate(model, random_ids(2, 5, seed=0), 6, eos_token_id=2)
    compiled = greedy_program._cache_size()
    for seed in (1, 2, 3):  # new prompts, masks and EOS ids: no new compilation
        ids, mask = left_padded(random_ids(2, 5, seed=seed), [5, seed + 1])
        jaxmerge.generate(model, ids, 6, eos_token_id=seed + 10, attention_mask=mask)
    assert greedy_program._cache_size() == compiled


def test_parameters_are_a_stacked_pytree(hf_checkpoint):
    hf_model, directory = hf_checkpoint("mistral_gqa")
    model = jaxmerge.load(directory)
    graphdef, params = nnx.split(model)
    pure = nnx.to_pure_dict(params)
    # [layer, in, out]: the transpose of torch's [out, in], one slice per layer.
    assert pure["layers"]["self_attn"]["k_proj"]["kernel"].shape == (3, 32, 16)
    np.testing.assert_array_equal(
        pure["layers"]["mlp"]["down_proj"]["kernel"][1],
        hf_model.model.layers[1].mlp.down_proj.weight.detach().numpy().T,
    )
    # A function of the pytree, under jit: what merge code does.
    @jax.jit
    def logits_of(params, ids):
        return nnx.merge(graphdef, params)(ids)

    ids = random_ids(1, 6)
    np.testing.assert_allclose(np.asarray(logits_of(params, ids)), hf_logits(hf_model, ids), atol=ATOL)


def test_bf16_checkpoint(hf_checkpoint, tmp_path):
    hf_model, _ = hf_checkpoint("mistral_gqa")
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ids = random_ids(2, 8)

    model = jaxmerge.load(tmp_path / "bf16")  # keeps the checkpoint's dtype
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model)))
    ours = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=0.05, rtol=0.05)

    upcast = jaxmerge.load(tmp_path / "bf16", dtype="float32")  # bf16 weights, fp32 compute
    assert upcast.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(upcast(jnp.asarray(ids))), hf_logits(hf_model.to(torch.float32), ids), atol=ATOL)


@pytest.mark.parametrize("name", ["llama_tied_theta", "gemma2_softcap"])
def test_the_head_at_the_last_positions_only_equals_the_full_computation(hf_checkpoint, name):
    """forward(logits_last=k), as prefill and log-likelihood scoring call it, is the full
    logits' last k positions."""
    from jaxmerge.generation import positions_from_mask
    from jaxmerge.models.modules import causal_mask

    _, directory = hf_checkpoint(name)
    model = jaxmerge.load(directory)
    ids, mask = left_padded(random_ids(2, 10), [10, 6])
    positions = positions_from_mask(jnp.asarray(mask))
    attention = causal_mask(jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.asarray(mask))
    full, _ = model.forward(jnp.asarray(ids), positions, attention)
    last, _ = model.forward(jnp.asarray(ids), positions, attention, logits_last=3)
    assert last.shape == (2, 3, full.shape[-1])
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -3:]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama_tied_theta", "gemma2_softcap"])
def test_split_layers_equal_the_scanned_stack(hf_checkpoint, name):
    """forward(layers=split_layers()), the decoding loops' layer-by-layer pass (each weight read
    in place), gives the scanned stack's logits and KV cache, per layer; Gemma 2 alternates
    sliding and global layers, each split layer keeping its own. (Equal to float32 rounding:
    XLA fuses the unrolled layers differently.)"""
    from jaxmerge.generation import positions_from_mask
    from jaxmerge.models.interfaces import decoding
    from jaxmerge.models.modules import causal_mask

    _, directory = hf_checkpoint(name)
    model = jaxmerge.load(directory)
    ids, mask = left_padded(random_ids(2, 10), [10, 6])
    positions = positions_from_mask(jnp.asarray(mask))
    attention = causal_mask(jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.pad(jnp.asarray(mask), ((0, 0), (0, 2))))
    stacked = model.init_cache(2, 12)
    scanned, scanned_cache = model.forward(jnp.asarray(ids), positions, attention, stacked, 0)
    forward, per_layer, restack = decoding(model, stacked)
    assert len(per_layer) == model.config.num_layers
    split, split_cache = forward(jnp.asarray(ids), positions, attention, per_layer, 0)
    np.testing.assert_allclose(np.asarray(split), np.asarray(scanned), atol=1e-5, rtol=0)
    for ours, theirs in zip(restack(split_cache), scanned_cache, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5, rtol=0)
