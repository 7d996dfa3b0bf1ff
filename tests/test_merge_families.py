"""`jaxmerge merge` against mergekit 0.1.5 on tiny Qwen2, Qwen3, Gemma2, Gemma3 (text only) and Phi3 models.

mergekit knows each family from its own architecture JSON (mergekit/_data/architectures/qwen2.json,
qwen3.json, gemma2.json, gemma3.json for model_type gemma3_text, phi3.json) and merges tensor by
stored tensor: Phi3's fused `qkv_proj` and `gate_up_proj` are sparsified and interpolated whole,
not per projection, so a tool that splits them gives other numbers (TIES differs by ~0.06 here).
A tied `lm_head` (Gemma, small Qwen3) is an optional weight in mergekit: no input stores it, so the
output stores none either. (phi3.json lists `lm_head` as required, so mergekit 0.1.5 cannot merge
tied Phi3 checkpoints such as Phi-4-mini: "Tensor lm_head.weight required but not present"; the
Phi3 models here are untied.)
"""

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch
from conftest import VOCAB, hf_logits, random_ids
from test_merge_mergekit import assert_same, read, run_both
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import jaxmerge
from jaxmerge.merge.recipe import merge_from_yaml

pytestmark = pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit not installed")

LAYERS = 3
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, tie_word_embeddings=True)

# family: (transformers class, config class, config fields, tensor names of layer 0 the family must have,
# whether lm_head.weight is stored)
FAMILIES = {
    # q/k/v biases (always on in Qwen2), untied lm_head.
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=False),
              ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"], True),
    # q/k RMSNorms, head_dim apart from hidden/heads; tied like Qwen3-0.6B to 4B.
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=8, tie_word_embeddings=True),
              ["self_attn.q_norm.weight", "self_attn.k_norm.weight"], False),
    # Sandwich norms around attention and MLP, soft-capping, alternating sliding windows, tied lm_head.
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, GEMMA,
               ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"], False),
    # Text-only Gemma3 (model_type gemma3_text): sandwich norms and q/k norms, tied lm_head.
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig,
               dict(GEMMA, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
               ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
                "self_attn.q_norm.weight", "self_attn.k_norm.weight"], False),
    # Fused projections, stored as such.
    "phi3": (Phi3ForCausalLM, Phi3Config, dict(tie_word_embeddings=False),
             ["self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"], True),
}


def make_model(family: str):
    model_class, config_class, fields, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**COMMON, **fields)).eval()
    with torch.no_grad():  # transformers zero-initialises biases and (Gemma) norms; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, directory): a base and two fine-tunes of it (base + noise) of one family."""
    root = tmp_path_factory.mktemp(request.param)
    make_model(request.param).save_pretrained(root / "base")
    for i, scale in enumerate([0.02, 0.05]):
        tuned = make_model(request.param)
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * scale)
        tuned.save_pretrained(root / f"ft{i}")
    return request.param, root


RECIPES = {
    "ties": """
        merge_method: ties
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters: {density: [0.2, 0.8], weight: 0.7}
          - model: ROOT/ft1
            parameters: {density: 0.5, weight: [1.0, 0.3]}
        parameters: {normalize: true}
        dtype: float32
    """,
    "slerp": """
        merge_method: slerp
        base_model: ROOT/ft0
        models:
          - model: ROOT/ft0
          - model: ROOT/ft1
        parameters: {t: 0.3}
        dtype: float32
    """,
    # Filters reach the family's own names: q_norm/k_norm/pre_feedforward_layernorm, qkv_proj/gate_up_proj.
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters: {weight: [{filter: norm, value: 0.2}, {filter: proj, value: [0.3, 1.0]}, {value: 0.6}]}
          - model: ROOT/ft1
            parameters: {weight: 0.5}
        parameters: {lambda: 1.2}
        dtype: float32
    """,
}


def test_family_checkpoints_have_their_features(family):
    """The fixture's checkpoints store what each family is chosen for (guards against
    transformers changing its classes' defaults or its saving of tied weights)."""
    name, root = family
    _, _, _, expected, stores_lm_head = FAMILIES[name]
    tensors = read(root / "base")
    missing = [k for k in expected if f"model.layers.0.{k}" not in tensors]
    assert not missing, f"{name} checkpoint lacks {missing}"
    assert ("lm_head.weight" in tensors) == stores_lm_head
    layers = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")}
    assert layers == set(range(LAYERS))


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_family_merge_matches_mergekit(family, tmp_path, method):
    name, root = family
    ours, theirs = run_both(root, tmp_path, RECIPES[method])
    assert ours.keys() == read(root / "base").keys()  # nothing added (a tied lm_head) or dropped
    assert_same(ours, theirs)
    source = json.loads((root / "base" / "config.json").read_text())
    tied = AutoConfig.from_pretrained(root / "base").tie_word_embeddings
    for out in ("ours", "theirs"):
        merged = json.loads((tmp_path / out / "config.json").read_text())
        assert merged["architectures"] == source["architectures"], out
        assert merged["model_type"] == source["model_type"], out
        # transformers reads it back (its config classes check field types), tied as the input is.
        assert AutoConfig.from_pretrained(tmp_path / out).tie_word_embeddings == tied, out


def test_merged_family_reopens_in_transformers(family, tmp_path):
    """jaxmerge's merge output loads in transformers with every weight accounted for, and
    jaxmerge reads the same model back."""
    name, root = family
    (tmp_path / "r.yml").write_text(textwrap.dedent(RECIPES["ties"]).replace("ROOT", str(root)))
    out = merge_from_yaml(tmp_path / "r.yml", tmp_path / "ours", progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model) is FAMILIES[name][0]
    ids = random_ids(1, 8)
    np.testing.assert_allclose(np.asarray(jaxmerge.load(out)(ids)), hf_logits(model.eval(), ids), atol=1e-4)
