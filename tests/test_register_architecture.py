"""The architecture registry is open: a decoder family is added from outside the package,
loads and saves like a shipped one, and leaves the registry as it was once removed."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, random_ids

import jaxmerge
from jaxmerge.architectures import (
    ARCHITECTURES,
    Family,
    architecture_of,
    register_family,
    text_architecture,
    unregister_architecture,
)

ATOL = 1e-4
NAME = "MyLlamaForCausalLM"

# What a user's package would declare: a Llama-shaped family under its own names, with
# transformers' LlamaConfig defaults for the fields a config.json leaves out.
MY_LLAMA = Family(
    "my_llama",
    dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
         max_position_embeddings=2048),
    sliding="none",
)


@pytest.fixture
def my_llama():
    """MyLlamaForCausalLM registered for one test, removed after it."""
    assert NAME not in ARCHITECTURES
    architecture = register_family(NAME, MY_LLAMA)
    yield architecture
    unregister_architecture(NAME)
    assert NAME not in ARCHITECTURES


def as_my_llama(directory):
    """Rewrites a saved transformers Llama's config.json to say the new architecture."""
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    hf.update(architectures=[NAME], model_type="my_llama")
    path.write_text(json.dumps(hf))
    return hf


def test_registered_family_loads_and_saves(my_llama, hf_checkpoint, tmp_path):
    hf_model, directory = hf_checkpoint("llama_head_dim_bias")
    source = as_my_llama(directory)
    model = jaxmerge.load(directory)
    assert model.origin.architecture == NAME
    ids = random_ids(2, 12)
    logits = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(logits, hf_logits(hf_model, ids), atol=ATOL, rtol=0)

    out = jaxmerge.save(model, tmp_path / "saved")
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == [NAME] and saved["model_type"] == "my_llama"
    assert architecture_of(saved, "saved") is my_llama
    assert my_llama.parse_config(saved, "saved") == my_llama.parse_config(source, "source")
    # Every field of the source is written back as it was (the rest: RoPE in transformers 4's layout too).
    assert {name: saved.get(name) for name in source} == source
    np.testing.assert_array_equal(np.asarray(jaxmerge.load(out)(jnp.asarray(ids))), logits)


def test_registered_family_is_a_text_family(my_llama):
    assert my_llama.family is MY_LLAMA
    assert text_architecture("my_llama") == NAME


def test_duplicate_name_is_refused(my_llama):
    shipped = ARCHITECTURES["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="'LlamaForCausalLM' is already registered"):
        register_family("LlamaForCausalLM", MY_LLAMA)
    with pytest.raises(ValueError, match=f"'{NAME}' is already registered"):
        register_family(NAME, MY_LLAMA)
    assert ARCHITECTURES["LlamaForCausalLM"] is shipped and ARCHITECTURES[NAME] is my_llama


def test_unknown_architecture_lists_the_registered_ones(my_llama, hf_checkpoint):
    _, directory = hf_checkpoint("llama_tied_theta")
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(jaxmerge.CheckpointError, match="unsupported architecture") as error:
        jaxmerge.load(directory)
    supported = str(error.value).split("(supported: ")[1].rstrip(")").split(", ")
    assert supported == sorted(ARCHITECTURES) and NAME in supported and "LlamaForCausalLM" in supported
