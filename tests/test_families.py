"""Qwen2, Qwen3, Gemma2, Gemma3 (text) and Phi3 checkpoints beyond logits and greedy tokens
(those are in test_transformer.py, for every CONFIGS entry): save round trips through
transformers, bfloat16 loading, `jaxmerge info`, RoPE scaling past its threshold, and
config.json as transformers 4 wrote it. The oracle is always transformers' PyTorch model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CONFIGS, hf_logits, random_ids
from flax import nnx
from safetensors.numpy import load_file
from test_checkpoint import edit_config
from transformers import AutoModelForCausalLM

import jaxmerge
from jaxmerge.cli import main

ATOL = 1e-4
FAMILIES = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3")
NEW = sorted(name for name in CONFIGS if name.split("_")[0] in FAMILIES)
# One entry per family, the one with the most features.
ONE_PER_FAMILY = ["qwen2_sliding", "qwen3_bias", "gemma2_softcap", "gemma3_rope", "phi3_longrope"]


def fresh_hf(directory):
    """transformers' model, reloaded: dynamic RoPE keeps state from one call to the next
    (it does not scale back down for a shorter sequence above max_position_embeddings)."""
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def covers(reopened, original, where="rope_parameters"):
    """Every field of `original` (nested dicts: recursively) is in `reopened` with its value."""
    for key, value in original.items():
        assert key in reopened, f"{where}.{key} missing"
        if isinstance(value, dict):
            covers(reopened[key], value, f"{where}.{key}")
        else:
            assert reopened[key] == value, f"{where}.{key}: {reopened[key]!r} != {value!r}"


# ------------------------------------------------------------------- save round trip


@pytest.mark.parametrize("name", NEW)
def test_save_round_trip_opens_in_transformers(hf_checkpoint, tmp_path, name):
    hf_model, directory = hf_checkpoint(name)
    out = jaxmerge.save(jaxmerge.load(directory), tmp_path / "out")
    original, written = (json.loads((d / "config.json").read_text()) for d in (directory, out))
    assert written["architectures"] == original["architectures"]
    assert written["model_type"] == original["model_type"]  # "gemma3_text" for Gemma3ForCausalLM

    reopened = fresh_hf(out)
    assert type(reopened) is type(hf_model)
    # What transformers makes of the written config: the same layers, window, tying and RoPE.
    for field in ("layer_types", "sliding_window", "tie_word_embeddings", "max_position_embeddings",
                  "num_key_value_heads", "query_pre_attn_scalar", "final_logit_softcapping"):
        assert getattr(reopened.config, field, None) == getattr(hf_model.config, field, None), field
    assert head_dim(reopened.config) == head_dim(hf_model.config)
    if name.startswith("gemma2"):  # Gemma3 ignores attn_logit_softcapping, so writing it is optional there
        assert reopened.config.attn_logit_softcapping == hf_model.config.attn_logit_softcapping
    covers(reopened.config.rope_parameters, hf_model.config.rope_parameters)
    for length in (6, 12):  # (in this order: see fresh_hf) below and above the RoPE thresholds
        ids = random_ids(2, length)
        np.testing.assert_allclose(hf_logits(reopened, ids), hf_logits(hf_model, ids), atol=ATOL, rtol=0)

    # The very tensors, under their names: Phi3's fused projections stay fused, a tied lm_head stays absent.
    original_tensors = load_file(directory / "model.safetensors")
    written_tensors = load_file(out / "model.safetensors")
    assert written_tensors.keys() == original_tensors.keys()
    for key in original_tensors:
        np.testing.assert_array_equal(written_tensors[key], original_tensors[key])
    ids = random_ids(2, 12)
    np.testing.assert_allclose(np.asarray(jaxmerge.load(out)(jnp.asarray(ids))), hf_logits(hf_model, ids),
                               atol=ATOL, rtol=0)


# ------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_bf16_load(hf_checkpoint, name):
    hf_model, directory = hf_checkpoint(name)
    model = jaxmerge.load(directory, dtype="bfloat16")  # a float32 checkpoint, computed in bfloat16
    assert model.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids = random_ids(2, 12)
    ours = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    exact = hf_logits(hf_model, ids)  # before the cast below, which rounds the weights in place
    # transformers' own bfloat16 logits are up to 0.05 from its float32 ones here: two bfloat16
    # implementations may be twice that apart, a wrong one (a missed scale, cap or norm) far more.
    np.testing.assert_allclose(ours, hf_logits(hf_model.to(torch.bfloat16), ids), atol=0.1, rtol=0)
    np.testing.assert_allclose(ours, exact, atol=0.1, rtol=0)


# ------------------------------------------------------------------- jaxmerge info

# The "  features: " line of `jaxmerge info`: a comma-separated list from a fixed vocabulary.
FEATURES = {
    "qwen2_bias_tied": {"qkv-bias", "tied-embeddings"},  # Qwen2: no bias on o_proj
    "qwen2_sliding": {"qkv-bias", "sliding-window", "local/global layers"},
    "qwen2_yarn": {"qkv-bias"},
    "qwen2_dynamic": {"qkv-bias"},
    "qwen3_head_dim_tied": {"qk-norm", "tied-embeddings"},
    "qwen3_bias": {"qkv-bias", "o-bias", "qk-norm"},
    "qwen3_sliding": {"qk-norm", "sliding-window", "local/global layers"},
    "gemma2_softcap": {"gemma-norm", "sandwich-norms", "embedding-scale", "attn-softcap", "final-softcap",
                       "sliding-window", "local/global layers", "tied-embeddings"},
    "gemma2_plain": {"gemma-norm", "sandwich-norms", "embedding-scale", "sliding-window", "local/global layers"},
    "gemma3_rope": {"qk-norm", "gemma-norm", "sandwich-norms", "embedding-scale", "sliding-window",
                    "local/global layers", "tied-embeddings"},
    # attn_logit_softcapping is set, but transformers' Gemma3 does not apply it: no attn-softcap.
    "gemma3_softcap": {"qk-norm", "gemma-norm", "sandwich-norms", "embedding-scale", "final-softcap",
                       "sliding-window", "local/global layers"},
    "phi3_gqa": {"fused-qkv", "fused-gate-up"},
    "phi3_sliding": {"fused-qkv", "fused-gate-up", "sliding-window"},  # every layer: not local/global
    "phi3_partial_tied": {"fused-qkv", "fused-gate-up", "partial-rotary", "tied-embeddings"},
    "phi3_longrope": {"fused-qkv", "fused-gate-up"},
    # The same words for the older architectures.
    "llama_head_dim_bias": {"qkv-bias", "o-bias", "mlp-bias"},
    "mistral_sliding": {"sliding-window"},
}
ROPE = {"qwen2_yarn": "yarn", "qwen2_dynamic": "dynamic", "phi3_longrope": "longrope", "qwen2_bias_tied": "default",
        "gemma3_rope": "linear"}  # Gemma3: the full-attention layers' type (its sliding layers' is default)


def test_features_cover_every_new_entry():
    assert set(NEW) <= set(FEATURES)


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_info_names_architecture_and_features(hf_checkpoint, capsys, name):
    hf_model, directory = hf_checkpoint(name)
    assert main(["info", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert hf_model.config.architectures[0] in lines[0]
    features = [line for line in lines if line.startswith("  features: ")]
    assert len(features) == 1, lines
    assert {f.strip() for f in features[0][len("  features: "):].split(",")} == FEATURES[name]
    rope = [line for line in lines if line.startswith("  rope ")]
    assert len(rope) == 1, lines
    if name in ROPE:
        assert ROPE[name] in rope[0]


# ----------------------------------------------------- RoPE scaling past its threshold


@pytest.mark.parametrize("name, threshold", [
    ("qwen2_dynamic", 8),  # max_position_embeddings: the base grows with the length beyond it
    ("phi3_longrope", 8),  # original_max_position_embeddings: short_factor up to it, long_factor beyond
    ("qwen2_yarn", 16),  # original_max_position_embeddings: yarn is static, but the positions past it matter
])
def test_rope_scaling_past_its_threshold(hf_checkpoint, name, threshold):
    _, directory = hf_checkpoint(name)
    model = jaxmerge.load(directory)
    for length in (threshold, threshold + 1, 3 * threshold):  # at it, just past it, far past it
        ids = random_ids(2, length, seed=length)
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(fresh_hf(directory), ids),
                                   atol=ATOL, rtol=0, err_msg=f"{length} tokens")


@pytest.mark.parametrize("name, threshold", [("qwen2_dynamic", 8), ("phi3_longrope", 8)])
def test_rope_switch_reaches_back_to_the_first_tokens(hf_checkpoint, name, threshold):
    """Dynamic NTK and LongRoPE pick their frequencies for the whole sequence from its length:
    one token past the threshold changes the logits of all the tokens before it."""
    _, directory = hf_checkpoint(name)
    model = jaxmerge.load(directory)
    ids = random_ids(1, threshold + 1, seed=3)
    ref_short = hf_logits(fresh_hf(directory), ids[:, :threshold])
    ref_long = hf_logits(fresh_hf(directory), ids)[:, :threshold]
    assert np.abs(ref_long - ref_short).max() > 10 * ATOL  # transformers' side: the switch is real
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids[:, :threshold]))), ref_short, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)))[:, :threshold], ref_long, atol=ATOL, rtol=0)


# ------------------------------------------------ config.json as transformers 4 wrote it


def _top_level_rope(config):
    """rope_theta at the top level, scaling in rope_scaling with "type"."""
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope.pop("partial_rotary_factor", None)  # Phi3 kept it at the top level
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}


def _qwen2_unused_window(config):
    # Qwen2.5 configs name a sliding_window and turn it off with use_sliding_window: no layer slides.
    _top_level_rope(config)
    config.pop("layer_types")
    config.update(sliding_window=4, use_sliding_window=False)


def _without_layer_types(config):
    # Qwen2 / Qwen3: layers >= max_window_layers slide; Gemma2: every other layer, from the first.
    _top_level_rope(config)
    config.pop("layer_types")


def _gemma3_pattern(pattern):
    def change(config):
        # Every `pattern`-th layer is global; global RoPE in rope_theta / rope_scaling, local in rope_local_base_freq.
        config.pop("layer_types")
        rope = config.pop("rope_parameters")
        full = dict(rope["full_attention"])
        config["rope_theta"] = full.pop("rope_theta")
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        config["rope_scaling"] = None if full["rope_type"] == "default" else full
        config["sliding_window_pattern"] = pattern
    return change


def _phi3_longrope(config):
    # Phi-3's own layout: original_max_position_embeddings at the top level only.
    _top_level_rope(config)
    config["rope_scaling"].pop("original_max_position_embeddings")


@pytest.mark.parametrize("name, change", [
    ("qwen2_bias_tied", _qwen2_unused_window),
    ("qwen2_sliding", _without_layer_types),
    ("qwen3_sliding", _without_layer_types),
    ("gemma2_softcap", _without_layer_types),
    ("gemma3_rope", _gemma3_pattern(3)),
    ("gemma3_softcap", _gemma3_pattern(2)),
    ("phi3_longrope", _phi3_longrope),
], ids=lambda x: x if isinstance(x, str) else "")
def test_transformers4_config_layout(hf_checkpoint, name, change):
    hf_model, directory = hf_checkpoint(name)
    edit_config(directory, change)
    ids = random_ids(2, 12)
    ref = hf_logits(hf_model, ids)
    # transformers 5 reads the old layout as the same model ...
    np.testing.assert_allclose(hf_logits(fresh_hf(directory), ids), ref, atol=ATOL, rtol=0)
    # ... and so must jaxmerge.
    np.testing.assert_allclose(np.asarray(jaxmerge.load(directory)(jnp.asarray(ids))), ref, atol=ATOL, rtol=0)


def test_qwen2_window_only_from_max_window_layers(hf_checkpoint):
    """use_sliding_window with max_window_layers >= num_hidden_layers: no layer slides."""
    hf_model, directory = hf_checkpoint("qwen2_sliding", max_window_layers=3)
    assert hf_model.config.layer_types == ["full_attention"] * 3
    ids = random_ids(2, 12)
    np.testing.assert_allclose(np.asarray(jaxmerge.load(directory)(jnp.asarray(ids))), hf_logits(hf_model, ids),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ONE_PER_FAMILY + ["mistral_sliding", "llama_head_dim_bias"])
def test_every_family_meets_the_model_protocol(hf_checkpoint, name):
    """generate, the merge tree, layer paths and the search rely on CausalLM's members only."""
    from jaxmerge.models.interfaces import CausalLM

    _, directory = hf_checkpoint(name)
    assert isinstance(jaxmerge.load(directory), CausalLM)


def test_evolve_ps_and_dfs_through_gemma2_layers(tmp_path):
    """The whole pipeline on one of the new families: a PS search, a layer path through two
    sources' alternating local/global layers and one through the PS merge's, every model
    scored, the layer-path export opened by transformers with equal logits."""
    import shutil

    from conftest import make_hf_model

    from jaxmerge.eval.tasks import TaskData, TaskSpec
    from jaxmerge.pipeline import evolve
    from jaxmerge.testing import toy_world as tw

    world = tw.world_dir(0)
    vocab = json.loads((world / "base" / "config.json").read_text())["vocab_size"]
    dirs = []
    for seed, name in enumerate(["base", "a", "b"]):
        directory = tmp_path / name
        make_hf_model("gemma2_softcap", seed, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0).save_pretrained(directory)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(world / "base" / file, directory / file)
        dirs.append(str(directory))
    rng = np.random.default_rng(0)
    pairs = [tw.japanese_qa(rng) for _ in range(24)]
    data = TaskData(tuple(p for p, _ in pairs), tuple(a for _, a in pairs))
    result = evolve(genome={"models": dirs[1:], "base_model": dirs[0], "merge_method": "task_arithmetic"},
                    tasks=[TaskSpec("qa", metric="exact", fitness=data.rows(0, 16), test=data.rows(16, 24),
                                    max_new_tokens=2)],
                    search={"generations": 2, "minibatch": 8, "validation_size": 8, "population": 4},
                    dfs={"mode": "both", "generations": 2, "population": 4, "repeats": 1},
                    baselines=False, out=str(tmp_path / "run"))
    assert set(result.genomes) == {"ps", "dfs", "ps_dfs"}
    exported = tmp_path / "run" / "merged_dfs"
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LayerPathGemma2ForCausalLM"]
    assert len(config["layer_types"]) == config["num_hidden_layers"]
    ours = jaxmerge.load(exported)
    ids = np.random.default_rng(1).integers(3, vocab, (2, 9)).astype(np.int32)
    theirs = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), hf_logits(theirs, ids), atol=ATOL, rtol=0)
