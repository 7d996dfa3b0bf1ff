"""The layer-path export's transformers code (jaxmerge/models/modeling_layer_path.py), per
family, in PyTorch alone: a checkpoint written by hand as jaxmerge writes one (stored
layers, config.json with the path and the layer types per hop and per stored layer,
the modeling file beside), opened with trust_remote_code, against an oracle: an ordinary
transformers model of the same family with one layer per hop (a copy of the stored layer,
with its type) and a pre-hook scaling each layer's input by the hop's scale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import jaxmerge.models

MODELING_FILE = Path(jaxmerge.models.__file__).parent / "modeling_layer_path.py"
VOCAB, LENGTH, NEW_TOKENS, PAD = 96, 12, 6, 0
SLIDING, FULL = "sliding_attention", "full_attention"
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)

# family: (class name's Family, transformers class, config class, the family's features on)
FAMILIES = {
    "mistral": ("Mistral", MistralForCausalLM, MistralConfig, dict(sliding_window=4)),
    "llama": ("Llama", LlamaForCausalLM, LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2", Qwen2ForCausalLM, Qwen2Config,  # layer types: full, sliding, sliding
              dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("Qwen3", Qwen3ForCausalLM, Qwen3Config,  # q/k norms; types: full, full, sliding
              dict(head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "gemma2": ("Gemma2", Gemma2ForCausalLM, Gemma2Config,  # types: sliding, full, sliding; softcapping
               dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0, attention_bias=True)),
    "gemma3": ("Gemma3", Gemma3ForCausalLM, Gemma3TextConfig,  # types: sliding, full, sliding; RoPE by type
               dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, sliding_window_pattern=2,
                    rope_parameters={SLIDING: dict(rope_type="default", rope_theta=10.0),
                                     FULL: dict(rope_type="default", rope_theta=10_000.0)})),
    "phi3": ("Phi3", Phi3ForCausalLM, Phi3Config, {}),  # fused qkv_proj and gate_up_proj
}
# Stored layers per hop (one used twice: two KV histories) and each hop's input scale. The
# second path puts layers on hops whose index has another type in an ordinary model.
PATHS = {"0212": [0, 2, 1, 2], "1020": [1, 0, 2, 0]}
SCALES = [1.0, 0.8, 1.2, 1.0]


def base_model(family: str, seed: int = 0):
    _, model_class, config_class, fields = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**COMMON, **fields, initializer_range=0.2)).eval()
    with torch.no_grad():  # transformers makes norms one (Gemma: zero) and biases zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def layer_types(model) -> list[str] | None:
    return getattr(model.config, "layer_types", None)


def write_layer_path_checkpoint(model, family: str, path: list[int], scales: list[float], directory: Path,
                                with_types=("layer_types", "stored_layer_types")) -> Path:
    """The checkpoint as jaxmerge writes it: every layer of `model` stored once."""
    name = FAMILIES[family][0]
    directory.mkdir(parents=True)
    stored = model.config.num_hidden_layers
    config = model.config.to_dict()
    config.pop("layer_types", None)
    config.update(architectures=[f"LayerPath{name}ForCausalLM"], model_type=f"layer_path_{model.config.model_type}",
                  num_hidden_layers=len(path), num_stored_layers=stored, layer_path=path, layer_scales=scales,
                  auto_map={"AutoConfig": f"modeling_layer_path.LayerPath{name}Config",
                            "AutoModelForCausalLM": f"modeling_layer_path.LayerPath{name}ForCausalLM"})
    types = layer_types(model)
    if types is not None:
        if "layer_types" in with_types:
            config["layer_types"] = [types[i] for i in path]
        if "stored_layer_types" in with_types:
            config["stored_layer_types"] = list(types)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = {key.replace("model.layers.", "model.stored_layers.", 1): value.detach().clone().contiguous()
               for key, value in model.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(MODELING_FILE, directory / MODELING_FILE.name)
    return directory


def oracle(model, path: list[int], scales: list[float], hop_types: list[str] | None = None):
    """An ordinary model of the family with a layer per hop: hop h's layer is a copy of
    layer path[h] of `model`, of its type, and its input is scaled by scales[h]."""
    fields = model.config.to_dict()
    fields["num_hidden_layers"] = len(path)
    types = layer_types(model)
    if types is not None:
        fields["layer_types"] = hop_types or [types[i] for i in path]
    copy = type(model)(type(model.config)(**fields)).eval()
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("model.layers.")}
    for hop, i in enumerate(path):
        prefix = f"model.layers.{i}."
        state.update({f"model.layers.{hop}.{key[len(prefix):]}": value
                      for key, value in model.state_dict().items() if key.startswith(prefix)})
    copy.load_state_dict(state, strict=True)

    def scaled(scale):
        def hook(module, args, kwargs):
            if args:
                return (args[0] * scale, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}
        return hook

    for layer, scale in zip(copy.model.layers, scales, strict=True):
        layer.register_forward_pre_hook(scaled(scale), with_kwargs=True)
    return copy


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    single = torch.tensor(rng.integers(3, VOCAB, (1, LENGTH)), dtype=torch.long)
    batch = torch.tensor(rng.integers(3, VOCAB, (3, LENGTH)), dtype=torch.long)
    mask = torch.ones_like(batch)
    for row, pad in enumerate([0, 3, 7]):  # left-padded
        batch[row, :pad], mask[row, :pad] = PAD, 0
    return single, batch, mask


def logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits.float().numpy()


def greedy(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=PAD).numpy()


@pytest.fixture(scope="module")
def base_models():
    return {family: base_model(family) for family in FAMILIES}


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_path_checkpoint_runs_as_its_oracle(family, path_name, base_models, tmp_path):
    model, path = base_models[family], PATHS[path_name]
    out = write_layer_path_checkpoint(model, family, path, SCALES, tmp_path / f"{family}_{path_name}")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == f"LayerPath{FAMILIES[family][0]}ForCausalLM"
    assert hf.config.model_type == f"layer_path_{model.config.model_type}"
    # every stored layer once, under model.stored_layers, and nothing else added
    names = {name for name, _ in hf.named_parameters()}
    expected = {name.replace("model.layers.", "model.stored_layers.", 1) for name, _ in model.named_parameters()}
    assert names == expected
    types = layer_types(model)
    if types is not None:
        assert hf.config.layer_types == [types[i] for i in path]
        assert hf.config.stored_layer_types == types
        assert [layer.self_attn.sliding_window for layer in hf.model.stored_layers] == \
            [layer.self_attn.sliding_window for layer in model.model.layers]

    reference = oracle(model, path, SCALES)
    assert hf.config._attn_implementation == reference.config._attn_implementation
    single, batch, mask = inputs()
    np.testing.assert_allclose(logits(hf, single), logits(reference, single), atol=1e-4, rtol=0)
    keep = mask.numpy().astype(bool)
    np.testing.assert_allclose(logits(hf, batch, mask)[keep], logits(reference, batch, mask)[keep],
                               atol=1e-4, rtol=0)
    np.testing.assert_array_equal(greedy(hf, single), greedy(reference, single))
    np.testing.assert_array_equal(greedy(hf, batch, mask), greedy(reference, batch, mask))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "gemma3"])
def test_the_oracle_sees_layer_types(family, base_models):
    """The check above would catch hops of the wrong type: an oracle whose hops take the
    types of an ordinary model's layers at their index differs."""
    model, path = base_models[family], PATHS["1020"]
    right = [layer_types(model)[i] for i in path]
    wrong = [FULL if t == SLIDING else SLIDING for t in right]
    single, _, _ = inputs()
    right_logits, wrong_logits = logits(oracle(model, path, SCALES), single), logits(oracle(model, path, SCALES, wrong),
                                                                                      single)
    assert np.abs(right_logits - wrong_logits).max() > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
@pytest.mark.parametrize("given", [("layer_types",), ("stored_layer_types",), ()])
def test_either_type_list_may_be_absent(family, given, base_models, tmp_path):
    """Either list alone gives both; with neither, the family derives the stored layers'
    types as for an ordinary model of them (which these were)."""
    model, path = base_models[family], PATHS["1020"]
    out = write_layer_path_checkpoint(model, family, path, SCALES, tmp_path / "ckpt", with_types=given)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    types = layer_types(model)
    assert hf.config.stored_layer_types == types and hf.config.layer_types == [types[i] for i in path]
    single, _, _ = inputs()
    np.testing.assert_allclose(logits(hf, single), logits(oracle(model, path, SCALES), single), atol=1e-4, rtol=0)


def test_layer_types_that_contradict_the_stored_ones_are_refused(base_models, tmp_path):
    model, path = base_models["gemma2"], PATHS["1020"]
    out = write_layer_path_checkpoint(model, "gemma2", path, SCALES, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config["layer_types"] = [SLIDING] * len(path)  # hop 0 runs stored layer 1, a full one
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer_types"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_a_saved_layer_path_model_reopens_the_same(base_models, tmp_path):
    """save_pretrained writes the per-hop and per-stored-layer types back (and passes
    transformers' validation: layer_types has num_hidden_layers = hops entries)."""
    model, path = base_models["gemma3"], PATHS["1020"]
    out = write_layer_path_checkpoint(model, "gemma3", path, SCALES, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["layer_types"] == hf.config.layer_types and saved["stored_layer_types"] == layer_types(model)
    assert saved["num_hidden_layers"] == len(path) and saved["layer_path"] == path
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    single, _, _ = inputs()
    np.testing.assert_array_equal(logits(again, single), logits(hf, single))
