"""Bad input to load / generate refused at once, naming the file, tensor, field or argument:
non-finite weights, config.json fields of the wrong type or range, unusable dtypes, empty
or out-of-vocabulary prompts, malformed indexes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VOCAB, make_hf_model, random_ids
from safetensors.numpy import load_file, save_file
from test_checkpoint import edit_config
from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig, MistralConfig

import jaxmerge
from jaxmerge import CheckpointError
from jaxmerge.checkpoint import model_config
from jaxmerge.parallel import Layout


def rewrite_tensors(path: Path, change) -> Path:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------ non-finite weights (5)


def test_nan_or_inf_in_a_tensor_is_refused_naming_file_and_tensor(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    key = "model.layers.1.mlp.up_proj.weight"

    def poison(tensors):
        tensors[key][3, 5] = np.nan
        tensors[key][0, 0] = -np.inf
    path = rewrite_tensors(directory / "model.safetensors", poison)
    with pytest.raises(CheckpointError, match=rf"{path}: tensor {key} holds 1 NaN and 1 Inf among its 1536 values.*"
                                              r"allow_non_finite=True"):
        jaxmerge.load(directory)
    model = jaxmerge.load(directory, allow_non_finite=True)  # the caller's choice: loaded as it is
    up = np.asarray(model.layers.mlp.up_proj.kernel[...][1])  # [in, out], the transpose
    assert np.isnan(up[5, 3]) and np.isneginf(up[0, 0])


def test_non_finite_unstacked_tensor_in_a_sharded_checkpoint(hf_checkpoint):
    _, directory = hf_checkpoint("llama_tied_theta", max_shard_size="40KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.embed_tokens.weight"
    path = rewrite_tensors(directory / index[key], lambda t: t[key].__setitem__((7, 1), np.inf))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor {key} holds 0 NaN and 1 Inf among its 3072 values"):
        jaxmerge.load(directory)


def test_non_finite_refused_when_loading_onto_a_mesh(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    key = "model.layers.2.self_attn.o_proj.weight"
    path = rewrite_tensors(directory / "model.safetensors", lambda t: t[key].__setitem__((1, 1), np.nan))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor {key} holds 1 NaN"):
        jaxmerge.load(directory, sharding=Layout(1, 1).mesh())
    assert jaxmerge.load(directory, sharding=Layout(1, 1).mesh(), allow_non_finite=True) is not None


def test_non_finite_refused_when_sharded_over_four_devices(hf_checkpoint):
    """Each device holds a slice: the flags are reduced over the whole mesh, so every
    process sees the same answer (and raises alike)."""
    _, directory = hf_checkpoint("mistral_gqa")
    key = "model.layers.1.mlp.down_proj.weight"
    rewrite_tensors(directory / "model.safetensors", lambda t: t[key].__setitem__((31, 47), np.nan))
    script = ("import sys, jaxmerge\nfrom jaxmerge.parallel import Layout\n"
              "try:\n    jaxmerge.load(sys.argv[1], sharding=Layout(1, 4).mesh())\n"
              "except jaxmerge.CheckpointError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"refused: {directory / 'model.safetensors'}: tensor {key} holds 1 NaN" in out.stdout


def test_cast_overflowing_float16_is_refused(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    key = "model.norm.weight"
    path = rewrite_tensors(directory / "model.safetensors", lambda t: t[key].__setitem__(0, 1e6))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor {key} overflows float16"):
        jaxmerge.load(directory, dtype="float16")
    assert float(jaxmerge.load(directory, dtype="bfloat16").norm.weight[...][0]) == pytest.approx(1e6, rel=1e-2)


def test_float64_checkpoint_loads_as_float32_without_warnings(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    rewrite_tensors(directory / "model.safetensors",
                    lambda t: t.update({k: v.astype(np.float64) for k, v in t.items()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # JAX warns when asked for float64 it cannot give
        model = jaxmerge.load(directory)
    assert model.dtype == jnp.float32


# ------------------------------------------------------------------------- dtype= (15)


@pytest.mark.parametrize("dtype", [jnp.int8, np.int32, "int8", np.float64, "float64", bool, 5, "f32"])
def test_load_refuses_unsupported_dtypes_before_reading(tmp_path, dtype):
    # A directory that does not exist: the dtype is refused before anything is read.
    with pytest.raises(ValueError, match=r"dtype .*\(supported: float32, bfloat16, float16\)"):
        jaxmerge.load(tmp_path / "absent", dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bf16", jnp.bfloat16, np.float16, np.dtype("float32")])
def test_load_accepts_float_dtypes(hf_checkpoint, dtype):
    _, directory = hf_checkpoint("mistral_gqa")
    assert jaxmerge.load(directory, dtype=dtype).dtype in (jnp.float32, jnp.bfloat16, jnp.float16)


def test_load_refuses_bad_sharding_and_allow_non_finite(tmp_path):
    with pytest.raises(ValueError, match="sharding must be None or a jax.sharding.Mesh"):
        jaxmerge.load(tmp_path / "absent", sharding=4)
    with pytest.raises(ValueError, match="allow_non_finite must be True or False"):
        jaxmerge.load(tmp_path / "absent", allow_non_finite="yes")


# --------------------------------------------------------------- config.json fields (13)


TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                            image_size=28, patch_size=7)


def base_config(kind: str) -> dict:
    """A valid config.json of each kind jaxmerge reads, as transformers writes it."""
    if kind == "mistral":
        return {**MistralConfig(**TEXT).to_dict(), "architectures": ["MistralForCausalLM"]}
    if kind == "llama3":
        return {**base_config("mistral"), "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}}
    if kind == "llava":
        return {**LlavaConfig(vision_config=vision_config(), text_config=MistralConfig(**TEXT),
                              image_token_index=95).to_dict(), "architectures": ["LlavaForConditionalGeneration"]}
    if kind == "llava_next":
        return {**LlavaNextConfig(vision_config=vision_config(), text_config=MistralConfig(**TEXT),
                                  image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], image_token_index=95).to_dict(),
                "architectures": ["LlavaNextForConditionalGeneration"]}
    if kind == "layer_path":
        return {**base_config("mistral"), "architectures": ["LayerPathMistralForCausalLM"],
                "model_type": "layer_path_mistral", "num_stored_layers": 3, "num_hidden_layers": 4,
                "layer_path": [0, 1, 2, 1], "layer_scales": [1.0, 1.0, 0.5, 1.0]}
    raise ValueError(kind)


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def setting(path: str, value):
    """A change to a config: `path` names a field, nested with dots."""
    def change(config):
        *parents, name = path.split(".")
        for parent in parents:
            config = config[parent]
        config[name] = value
    return change


BAD_CONFIGS = {  # id: (kind, change, what the error says after "config.json")
    "hidden_size_string": ("mistral", setting("hidden_size", "abc"), r": hidden_size must be a positive integer, "
                                                                     r"got 'abc'"),
    "negative_layers": ("mistral", setting("num_hidden_layers", -1), r": num_hidden_layers must be a positive integer"),
    "zero_heads": ("mistral", setting("num_attention_heads", 0), r": num_attention_heads must be a positive integer"),
    "zero_kv_heads": ("mistral", setting("num_key_value_heads", 0), r": num_key_value_heads must be a positive"),
    "float_vocab": ("mistral", setting("vocab_size", 3.5), r": vocab_size must be a positive integer, got 3.5"),
    "bool_vocab": ("mistral", setting("vocab_size", True), r": vocab_size must be a positive integer, got True"),
    "heads_not_dividing_hidden": ("mistral", lambda c: (c.pop("head_dim"), c.update(num_attention_heads=3,
                                                                                     num_key_value_heads=3)),
                                  r": hidden_size \(32\) is not a multiple of num_attention_heads \(3\)"),
    "odd_head_dim": ("mistral", setting("head_dim", 7), r": head_dim \(7\) must be even"),
    "rope_theta_string": ("mistral", setting("rope_parameters.rope_theta", "x"),
                          r": rope_parameters.rope_theta must be a positive number, got 'x'"),
    "old_layout_rope_theta_string": ("mistral", lambda c: (c.pop("rope_parameters"), c.update(rope_theta="x")),
                                     r": rope_theta must be a positive number, got 'x'"),
    "rope_theta_nan": ("mistral", setting("rope_parameters.rope_theta", float("nan")), r": rope_parameters.rope_theta"),
    "rope_parameters_list": ("mistral", setting("rope_parameters", [10000.0]),
                             r": rope_parameters must be a JSON object"),
    "rope_type_list": ("mistral", setting("rope_parameters.rope_type", ["default"]),
                       r": rope_parameters.rope_type \['default'\] is not supported"),
    "tie_as_string": ("mistral", setting("tie_word_embeddings", "false"), r": tie_word_embeddings must be true or "
                                                                          r"false, got 'false'"),
    "negative_eps": ("mistral", setting("rms_norm_eps", -1e-6), r": rms_norm_eps must be a positive number"),
    "zero_sliding_window": ("mistral", setting("sliding_window", 0), r": sliding_window must be a positive integer"),
    "unknown_activation": ("mistral", setting("hidden_act", "swish"), r": hidden_act 'swish' is not supported"),
    "max_positions_string": ("mistral", setting("max_position_embeddings", "4096"),
                             r": max_position_embeddings must be a positive integer"),
    "architectures_string": ("mistral", setting("architectures", "MistralForCausalLM"),
                             r": architectures must be a list of class names"),
    "architectures_nested": ("mistral", setting("architectures", [["MistralForCausalLM"]]),
                             r": architectures must be a list of class names"),
    "llama_bias_string": ("llama3", setting("attention_bias", "no"), r": attention_bias must be true or false"),
    "llama3_factor_string": ("llama3", setting("rope_parameters.factor", "8"),
                             r": rope_parameters.factor must be a positive number"),
    "llama3_equal_freq_factors": ("llama3", setting("rope_parameters.high_freq_factor", 1.0),
                                  r": rope_parameters.high_freq_factor \(1.0\) must be greater than low_freq_factor"),
    "llama3_original_positions_float": ("llama3", setting("rope_parameters.original_max_position_embeddings", 16.5),
                                        r": rope_parameters.original_max_position_embeddings must be a positive"),
    "llava_text_hidden_size": ("llava", setting("text_config.hidden_size", "abc"),
                               r" \(text_config\): hidden_size must be a positive integer"),
    "llava_text_config_list": ("llava", setting("text_config", [1]), r": text_config must be a JSON object"),
    "llava_text_model_type_list": ("llava", setting("text_config.model_type", ["llama"]),
                                   r": text_config.model_type \['llama'\] is not supported"),
    "llava_vision_heads": ("llava", setting("vision_config.num_attention_heads", 0),
                           r": vision_config.num_attention_heads must be a positive integer"),
    "llava_vision_heads_not_dividing": ("llava", setting("vision_config.num_attention_heads", 5),
                                        r": vision_config.hidden_size \(32\) is not a multiple of "
                                        r"vision_config.num_attention_heads \(5\)"),
    "llava_vision_image_size_string": ("llava", setting("vision_config.image_size", "28"),
                                       r": vision_config.image_size must be a positive integer"),
    "llava_patch_not_dividing_image": ("llava", setting("vision_config.patch_size", 5),
                                       r": vision_config.image_size \(28\) is not a multiple of "
                                       r"vision_config.patch_size \(5\)"),
    "llava_vision_eps_string": ("llava", setting("vision_config.layer_norm_eps", "1e-5"),
                                r": vision_config.layer_norm_eps must be a positive number"),
    "llava_vision_act": ("llava", setting("vision_config.hidden_act", "swish"),
                         r": vision_config.hidden_act 'swish' is not supported"),
    "llava_vision_config_string": ("llava", setting("vision_config", "clip"), r": vision_config must be a JSON"),
    "llava_feature_layer_out_of_range": ("llava", setting("vision_feature_layer", 4),
                                         r": vision_feature_layer must be an integer in -4\.\.3"),
    "llava_feature_layer_empty_list": ("llava", setting("vision_feature_layer", []),
                                       r": vision_feature_layer must be an integer"),
    "llava_feature_layer_string": ("llava", setting("vision_feature_layer", "-2"),
                                   r": vision_feature_layer must be an integer"),
    "llava_image_token_negative": ("llava", setting("image_token_index", -1),
                                   r": image_token_index must be an integer >= 0"),
    "llava_projector_bias_string": ("llava", setting("multimodal_projector_bias", "true"),
                                    r": multimodal_projector_bias must be true or false"),
    "llava_projector_act": ("llava", setting("projector_hidden_act", "swish"),
                            r": projector_hidden_act 'swish' is not supported"),
    "llava_strategy": ("llava", setting("vision_feature_select_strategy", "cls"),
                       r": vision_feature_select_strategy 'cls' is not supported"),
    "llava_next_pinpoints_flat": ("llava_next", setting("image_grid_pinpoints", [28, 56]),
                                  r": image_grid_pinpoints must be a list of \[height, width\]"),
    "llava_next_pinpoints_strings": ("llava_next", setting("image_grid_pinpoints", [["28", "56"]]),
                                     r": image_grid_pinpoints must be a positive integer"),
    "layer_path_not_a_list": ("layer_path", setting("layer_path", "0,1"), r": layer_path must be a list"),
    "layer_path_float_layer": ("layer_path", setting("layer_path", [0, 1.5, 2, 1]), r": layer_path holds 1.5"),
    "layer_path_out_of_range": ("layer_path", setting("layer_path", [0, 1, 3, 1]), r": layer_path holds 3, not a "
                                                                                   r"stored layer \(0\.\.2\)"),
    "layer_path_scale_string": ("layer_path", setting("layer_scales", [1.0, "1", 1.0, 1.0]),
                                r": layer_scales must be a finite number"),
    "layer_path_stored_string": ("layer_path", setting("num_stored_layers", "3"),
                                 r": num_stored_layers must be a positive integer"),
    "layer_path_text_field": ("layer_path", setting("intermediate_size", 0),
                              r": intermediate_size must be a positive integer"),
}


@pytest.mark.parametrize("kind", ["mistral", "llama3", "llava", "llava_next", "layer_path"])
def test_valid_base_configs_parse(tmp_path, kind):
    assert model_config(write_config(tmp_path / kind, base_config(kind))) is not None


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_field_is_a_checkpoint_error_naming_it(tmp_path, case):
    kind, change, message = BAD_CONFIGS[case]
    config = base_config(kind)
    change(config)
    directory = write_config(tmp_path / case, config)
    # No weights in the directory: the config is refused before any are looked for.
    with pytest.raises(CheckpointError, match=rf"^{directory / 'config.json'}{message}"):
        jaxmerge.load(directory)


def test_config_that_is_not_utf8_or_not_an_object(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        jaxmerge.load(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object"):
        jaxmerge.load(tmp_path)


def test_empty_architectures_falls_back_on_model_type(hf_checkpoint):
    """As transformers' Auto classes do."""
    _, directory = hf_checkpoint("mistral_gqa")
    edit_config(directory, setting("architectures", []))
    assert jaxmerge.load(directory).origin.architecture == "MistralForCausalLM"


def test_config_dtype_is_not_the_tensors_dtype(hf_checkpoint):
    """config.json's torch_dtype / dtype says how the model was saved at some point; the
    tensors say what they hold, and a load without dtype= keeps theirs."""
    _, directory = hf_checkpoint("mistral_gqa")
    edit_config(directory, lambda c: c.update(dtype="bfloat16", torch_dtype="float16"))
    assert jaxmerge.load(directory).dtype == jnp.float32


# ------------------------------------------------------- weights index and safetensors header


@pytest.mark.parametrize("weight_map", [["model-00001-of-00002.safetensors"], {"a.weight": 3},
                                        {"a.weight": "../other/model.safetensors"}, {"a.weight": ""}])
def test_malformed_index_weight_map(hf_checkpoint, weight_map):
    _, directory = hf_checkpoint("mistral_gqa", max_shard_size="40KB")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"{index}: weight_map must map tensor names to shard file names"):
        jaxmerge.load(directory)


def test_safetensors_header_lying_about_a_shape(hf_checkpoint):
    """The header's shape disagrees with the bytes it points at: safetensors refuses the
    file, and jaxmerge says which one."""
    _, directory = hf_checkpoint("mistral_gqa")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["model.layers.0.mlp.up_proj.weight"]["shape"] = [24, 32]  # half the bytes it spans
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated or corrupt"):
        jaxmerge.load(directory)


# ------------------------------------------------------------------------- generate (14)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen") / "m"
    make_hf_model("mistral_gqa").save_pretrained(directory)
    return jaxmerge.load(directory)


@pytest.mark.parametrize("ids, kwargs, message", [
    (np.zeros((2, 0), np.int32), {}, r"input_ids is empty \(shape \(2, 0\)\)"),
    (np.zeros((0, 4), np.int32), {}, r"input_ids is empty"),
    ([[]], {}, r"input_ids is empty"),
    (np.ones((1, 3, 1), np.int32), {}, r"input_ids must be \[batch, length\]"),
    (np.array([[1, 2, VOCAB]]), {}, rf"input_ids holds token id {VOCAB} at \[0, 2\], outside the vocabulary "
                                    rf"\(0\.\.{VOCAB - 1}\)"),
    (np.array([[1, 2], [3, -1]]), {}, r"input_ids holds token id -1 at \[1, 1\]"),
    (np.array([[1, 2 ** 32 + 5]], np.int64), {}, r"input_ids holds token id 4294967301"),  # would wrap to 5
    (np.array([[1.0, 2.5]]), {}, r"input_ids must hold integer token ids, got dtype float64"),
    (np.array([[1, 2], [3, 4]]), dict(attention_mask=np.array([[1, 1], [0, 0]])),
     r"attention_mask row 1 is all 0: the prompt has no tokens"),
    (np.array([[1, 2, 3]]), dict(attention_mask=np.array([[1, 1, 0]])), r"attention_mask row 0 ends in padding"),
    (np.array([[1, 2, 3]]), dict(attention_mask=np.array([[0, 2, 1]])), r"attention_mask must hold 0 .* and 1"),
    (np.array([[1, 2, 3]]), dict(attention_mask=np.array([[1, 1]])), r"attention_mask shape \(1, 2\) != input_ids"),
    (np.array([[1, 2, 3]]), dict(eos_token_id=2.5), r"eos_token_id must be an integer token id"),
    (np.array([[1, 2, 3]]), dict(eos_token_id=[2, "x"]), r"eos_token_id must be an integer token id"),
    (np.array([[1, 2, 3]]), dict(pad_token_id=0.5), r"pad_token_id must be an integer token id"),
    (np.array([[1, 2, 3]]), dict(image_sizes=np.array([[28, 28]])), r"image_sizes or feature_index given without "
                                                                     r"pixel_values"),
])
def test_generate_refuses_bad_prompts(model, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxmerge.generate(model, ids, 2, **kwargs)


@pytest.mark.parametrize("steps", [-1, 2.5, "3", True, None])
def test_generate_refuses_bad_max_new_tokens(model, steps):
    with pytest.raises(ValueError, match=r"max_new_tokens must be a non-negative integer"):
        jaxmerge.generate(model, random_ids(1, 4), steps)


def test_generate_still_accepts_good_arguments(model):
    ids = random_ids(2, 4)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    out = jaxmerge.generate(model, ids.astype(np.int64), np.int64(3), eos_token_id=[np.int64(2)], attention_mask=mask)
    assert out.shape == (2, 7)
    assert np.array_equal(np.asarray(jaxmerge.generate(model, ids, 0)), ids)  # no new tokens: the prompt


def test_generate_checks_nothing_of_traced_values(model):
    """Inside jit the values are unknown: only shapes and dtypes are checked there."""
    out = jax.jit(lambda ids, mask: jaxmerge.generate(model, ids, 2, attention_mask=mask))(
        random_ids(1, 4), np.ones((1, 4), np.int32))
    assert out.shape == (1, 6)


def test_model_call_refuses_out_of_vocabulary_ids(model):
    with pytest.raises(ValueError, match=rf"input_ids holds token id {VOCAB}"):
        model(np.array([[1, VOCAB]]))
