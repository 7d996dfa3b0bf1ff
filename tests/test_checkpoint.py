"""Checkpoint I/O: round trips through transformers, shards, tokenizers, and bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import hf_logits, random_ids
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import jaxmerge
from jaxmerge import CheckpointError

ATOL = 1e-4


def add_tokenizer(directory):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)


@pytest.mark.parametrize("name", ["mistral_sliding", "llama_tied_theta", "llama3_rope", "llama_head_dim_bias"])
def test_save_round_trip_opens_in_transformers(hf_checkpoint, tmp_path, name):
    hf_model, directory = hf_checkpoint(name)
    add_tokenizer(directory)
    out = jaxmerge.save(jaxmerge.load(directory), tmp_path / "out")
    reopened = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(2, 10)
    np.testing.assert_allclose(hf_logits(reopened, ids), hf_logits(hf_model, ids), atol=ATOL)
    # Exactly the same tensors, and the tokenizer came along.
    original = load_file(directory / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert written.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(written[key], original[key])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w5").input_ids == AutoTokenizer.from_pretrained(directory)("w1 w5").input_ids
    assert not list(tmp_path.glob(".out.*")), "temporary directory left behind"


def test_loads_sharded_checkpoint(hf_checkpoint):
    hf_model, directory = hf_checkpoint("mistral_gqa", max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    ids = random_ids(2, 8)
    np.testing.assert_allclose(np.asarray(jaxmerge.load(directory)(ids)), hf_logits(hf_model, ids), atol=ATOL)


def test_saves_sharded_checkpoint(hf_checkpoint, tmp_path):
    hf_model, directory = hf_checkpoint("mistral_gqa")
    out = jaxmerge.save(jaxmerge.load(directory), tmp_path / "sharded", shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(v.nbytes for s in shards for v in load_file(s).values())
    ids = random_ids(1, 8)
    reopened = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(reopened, ids), hf_logits(hf_model, ids), atol=ATOL)
    np.testing.assert_allclose(np.asarray(jaxmerge.load(out)(ids)), hf_logits(hf_model, ids), atol=ATOL)


def test_save_casts_dtype_and_updates_config(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("llama_tied_theta")
    out = jaxmerge.save(jaxmerge.load(directory), tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["rope_parameters"]["rope_theta"] == 500_000.0
    assert config["tie_word_embeddings"] is True
    assert all(str(v.dtype) == "bfloat16" for v in load_file(out / "model.safetensors").values())
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert jaxmerge.load(out).dtype == "bfloat16"


def test_save_refuses_source_and_nonempty_dirs(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("mistral_gqa")
    model = jaxmerge.load(directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(CheckpointError, match="input model directory"):
        jaxmerge.save(model, directory, overwrite=True)
    with pytest.raises(CheckpointError, match="input model directory"):
        jaxmerge.save(model, directory / "inside")
    other = tmp_path / "other_input"
    other.mkdir()
    with pytest.raises(CheckpointError, match="input directory"):
        jaxmerge.save(model, other, inputs=[other])
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # source untouched

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        jaxmerge.save(model, busy)
    assert (busy / "keep.txt").read_text() == "x"
    with pytest.raises(CheckpointError, match=r"not replaced: .*keep\.txt"):  # overwrite replaces a model output only
        jaxmerge.save(model, busy, overwrite=True)
    assert (busy / "keep.txt").read_text() == "x"


# ------------------------------------------------------------------------- bad input


def rewrite_tensors(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def edit_config(directory, change):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_unknown_architecture(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    edit_config(directory, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(CheckpointError, match=r"config\.json.*GPT2LMHeadModel.*LlamaForCausalLM, "
                       r"LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, MistralForCausalLM"):
        jaxmerge.load(directory)


def test_missing_config_field(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    edit_config(directory, lambda c: c.pop("hidden_size"))
    with pytest.raises(CheckpointError, match=r"config\.json: missing required config field\(s\): hidden_size"):
        jaxmerge.load(directory)


def test_missing_config_and_weights(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        jaxmerge.load(tmp_path)
    _, directory = hf_checkpoint("mistral_gqa")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        jaxmerge.load(directory)


def test_missing_tensor(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    rewrite_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*model\.layers\.1\.mlp\.up_proj\.weight"):
        jaxmerge.load(directory)


def test_unexpected_tensor(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    path = rewrite_tensors(directory, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{path}: unexpected tensor\(s\).*model\.extra\.weight"):
        jaxmerge.load(directory)


def test_wrong_shape(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    key = "model.layers.2.self_attn.k_proj.weight"
    path = rewrite_tensors(directory, lambda t: t.update({key: np.zeros((8, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor {key} has shape \(8, 32\), expected \(16, 32\)"):
        jaxmerge.load(directory)


def test_truncated_and_corrupt_files(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated or corrupt"):
        jaxmerge.load(directory)
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated or corrupt"):
        jaxmerge.load(directory)


def test_index_naming_a_missing_shard(hf_checkpoint):
    _, directory = hf_checkpoint("mistral_gqa", max_shard_size="40KB")
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: names shard {shard.name}, which is missing"):
        jaxmerge.load(directory)


def test_unsupported_rope_type(hf_checkpoint):
    _, directory = hf_checkpoint("llama_tied_theta")
    edit_config(directory, lambda c: c.update(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}))
    with pytest.raises(CheckpointError, match=r"config\.json: rope_parameters\.rope_type 'proportional' is not "
                                              "supported"):
        jaxmerge.load(directory)


def test_old_config_layout(hf_checkpoint):
    """transformers 4 wrote rope_theta / rope_scaling at the top level."""
    hf_model, directory = hf_checkpoint("llama3_rope")

    def to_old_layout(config):
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
        config["torch_dtype"] = config.pop("dtype", "float32")

    edit_config(directory, to_old_layout)
    ids = random_ids(1, 12)
    np.testing.assert_allclose(np.asarray(jaxmerge.load(directory)(ids)), hf_logits(hf_model, ids), atol=ATOL)
