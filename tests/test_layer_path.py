"""Layer-path (DFS) models: forward, generation, the genome, compile counts, and export
to a checkpoint transformers opens with trust_remote_code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import jaxmerge
from jaxmerge.architectures import architecture_by_name, layer_path_architecture
from jaxmerge.checkpoint import derived_origin
from jaxmerge.models.layer_path import compact_path, layer_pool, path_model, with_hops
from jaxmerge.search.path_genome import PathSpace

VOCAB = 64


def hf_model(kind: str, seed: int, layers: int = 3):
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    model = (MistralForCausalLM(MistralConfig(**fields)) if kind == "mistral"
             else LlamaForCausalLM(LlamaConfig(**fields))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def load_two(kind: str, tmp_path) -> list:
    """Two random models of one kind: "mistral", "llama", or a name of conftest's CONFIGS."""
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"{kind}{seed}"
        model = hf_model(kind, seed) if kind in ("mistral", "llama") else make_hf_model(kind, seed, vocab_size=VOCAB)
        model.save_pretrained(path)
        paths.append(path)
    return [jaxmerge.load(p) for p in paths]


# gemma2_softcap: alternating sliding and global layers, whose types a path keeps per hop.
@pytest.fixture(params=["mistral", "llama", "gemma2_softcap"])
def two_models(request, tmp_path):
    return request.param, load_two(request.param, tmp_path)


# One per family, with its per-layer features on (conftest's CONFIGS).
@pytest.fixture(params=["mistral", "llama", "qwen2_sliding", "qwen3_sliding", "gemma2_softcap", "gemma3_rope",
                        "phi3_sliding"])
def family_models(request, tmp_path):
    return request.param, load_two(request.param, tmp_path)


def ids(batch=2, length=6, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length)).astype(np.int32)


def test_a_path_through_model_a_alone_is_model_a(two_models):
    _, (a, b) = two_models
    model = path_model(a, layer_pool([a, b]), num_hops=9)
    model = with_hops(model, [0, 1, 2] + [0] * 6, [1.0] * 9, [True] * 3 + [False] * 6)
    # Equal up to float reassociation (Gemma's soft-capping fuses differently inside the hop's cond).
    np.testing.assert_allclose(np.asarray(model(ids())), np.asarray(a(ids())), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(jaxmerge.generate(model, ids(), 5)),
                                  np.asarray(jaxmerge.generate(a, ids(), 5)))


def test_exported_path_model_equals_transformers_with_remote_code(family_models, tmp_path):
    kind, (a, b) = family_models
    model = path_model(a, layer_pool([a, b]), num_hops=10, text_model_type=architecture_by_name(
        a.origin.architecture).model_type)
    # A0, B1 (scaled), A1 twice (two KV histories), B2, A2; B0 is never used.
    path = [(0, 1.0), (4, 0.8), (1, 1.3), (1, 0.9), (5, 1.1), (2, 1.0)]
    model = with_hops(model, [i for i, _ in path] + [0] * 4, [s for _, s in path] + [1.0] * 4,
                      [True] * 6 + [False] * 4)
    expected = np.asarray(model(ids()))
    compact = compact_path(model)
    assert compact.config.text.num_layers == 5 and compact.config.num_hops == 6
    np.testing.assert_allclose(np.asarray(compact(ids())), expected, atol=1e-5, rtol=0)

    architecture = layer_path_architecture(a.origin.architecture)
    compact.origin = derived_origin(a, architecture)  # A's token ids (Phi-3's default pad id is outside VOCAB)
    out = jaxmerge.save(compact, tmp_path / "dfs", architecture=architecture)
    assert (out / "modeling_layer_path.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids(), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        greedy = hf.generate(torch.tensor(ids(), dtype=torch.long), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(jaxmerge.generate(compact, ids(), 6)), greedy)

    again = jaxmerge.load(out)
    assert again.path == compact.path
    np.testing.assert_allclose(np.asarray(again(ids())), expected, atol=1e-5, rtol=0)


def test_layers_of_another_shape_are_refused(two_models, tmp_path):
    _, (a, _) = two_models
    other = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(ValueError, match="intermediate_size"):
        layer_pool([a, jaxmerge.load(other)])


def test_genome_decodes_to_paths():
    space = PathSpace((3, 3), repeats=2)  # slots: A0 A1 A2 B0 B1 B2 | A0 A1 A2 B0 B1 B2
    assert space.num_dims == 12 + 36 and space.num_hops == 12
    assert space.describe(space.initial())["path"] == [[0, 1.0], [1, 1.0], [2, 1.0]]
    genome = np.asarray(space.initial()).copy()
    genome[[0, 2]] = 1.0  # the fixed ends' first-repetition slots stay off
    genome[[1, 4, 6]] = [-1.0, 1.0, 1.0]  # A1 off, B1 on, A0 (second repetition) on
    M = 6
    genome[12 + 0 * M + 4] = 0.5  # W[A0 -> B1]
    genome[12 + 4 * M + 0] = 2.0  # W[B1 -> A0]
    assert space.describe(genome)["path"] == [[0, 1.0], [4, 0.5], [0, 2.0], [2, 1.0]]
    decoded = space.decode(jnp.asarray(genome))
    assert decoded["valid"].tolist() == [True] * 4 + [False] * 8
    assert space.layer_name(4) == "B1"


def test_new_paths_and_scales_never_recompile(two_models):
    """A population's paths are data: one compilation serves every genome."""
    _, (a, b) = two_models
    space = PathSpace((3, 3), repeats=2)
    model = path_model(a, layer_pool([a, b]), space.num_hops)
    from flax import nnx
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def score(genome, state, prompt):
        traces.append(1)
        hops = space.decode(genome)
        m = with_hops(nnx.merge(graphdef, state), hops["layer"], hops["scale"], hops["valid"])
        return jaxmerge.generate(m, prompt, 3)

    rng = np.random.default_rng(0)
    outputs = set()
    for _ in range(6):
        genome = space.initial() + jnp.asarray(rng.normal(0, 0.5, space.num_dims), jnp.float32)
        outputs.add(np.asarray(score(genome, state, jnp.asarray(ids()))).tobytes())
    assert len(traces) == 1 and len(outputs) > 1
