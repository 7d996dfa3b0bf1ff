"""Checkpoint faults of issue #24: which weights a directory means, companion files through links,
config sizes the tensors lack, generation lengths beyond the context, symlink loops, broken
tokenizers. Each is refused with one error naming the file, field or flag, before anything
costly is done or anything is written."""

import json
import shutil

import numpy as np
import pytest
from conftest import make_hf_model, random_ids
from safetensors.numpy import load_file
from test_checkpoint import add_tokenizer

import jaxmerge
from jaxmerge import CheckpointError, checkpoint
from jaxmerge.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Mistral (3 layers) and a tiny Llama with a tokenizer, saved once."""
    root = tmp_path_factory.mktemp("saved")
    make_hf_model("mistral_gqa").save_pretrained(root / "mistral")
    make_hf_model("llama_tied_theta", vocab_size=23).save_pretrained(root / "llama")
    add_tokenizer(root / "llama")
    return root


@pytest.fixture
def model_dir(saved, tmp_path):
    """A fresh copy of the tiny Mistral checkpoint, to alter."""
    return shutil.copytree(saved / "mistral", tmp_path / "model")


@pytest.fixture
def tokenized_dir(saved, tmp_path):
    """A fresh copy of the tiny Llama checkpoint with its tokenizer."""
    return shutil.copytree(saved / "llama", tmp_path / "tokenized")


def edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def one_line_error(capsys, command) -> str:
    assert main(command) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ 8. model.safetensors beside an index


def test_single_file_wins_over_an_index_as_in_transformers(model_dir, tmp_path):
    """transformers' from_pretrained opens model.safetensors when it exists, before any index."""
    make_hf_model("mistral_gqa", seed=1).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for f in (tmp_path / "sharded").glob("model*.safetensors*"):
        shutil.copy(f, model_dir / f.name)
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert checkpoint.weight_files(model_dir) == [model_dir / "model.safetensors"]
    single = load_file(model_dir / "model.safetensors")
    loaded = jaxmerge.load(model_dir)
    np.testing.assert_array_equal(np.asarray(loaded.embed_tokens.weight[...]), single["model.embed_tokens.weight"])


# ------------------------------------------------------------------ 9. companion files: links, JSON


def test_a_companion_linked_outside_the_model_is_refused(model_dir, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    (model_dir / "chat_template.jinja").symlink_to(secret)
    with pytest.raises(CheckpointError, match=rf"{model_dir / 'chat_template.jinja'}: .*outside the model directory"):
        jaxmerge.save(jaxmerge.load(model_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    err = one_line_error(capsys, ["convert", str(model_dir), str(tmp_path / "out2")])
    assert "chat_template.jinja" in err and "outside the model directory" in err
    assert not (tmp_path / "out2").exists()


def test_companion_links_within_the_model_or_a_hub_snapshot_are_copied(model_dir, tmp_path):
    (model_dir / "templates").mkdir()
    (model_dir / "templates" / "chat.jinja").write_text("{{ messages }}")
    (model_dir / "chat_template.jinja").symlink_to("templates/chat.jinja")
    assert list(checkpoint.companion_files(model_dir)) == ["chat_template.jinja", "generation_config.json"]
    # The Hugging Face cache: snapshots/<revision>/<file> -> ../../blobs/<hash>.
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc"
    (tmp_path / "models--org--name" / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in model_dir.glob("*.json"):
        (tmp_path / "models--org--name" / "blobs" / f.stem).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/{f.stem}")
    assert list(checkpoint.companion_files(snapshot)) == ["generation_config.json"]


def test_a_malformed_json_companion_is_refused_naming_it(model_dir, tmp_path, capsys):
    (model_dir / "generation_config.json").write_text('{"bos_token_id": 1,')
    err = one_line_error(capsys, ["convert", str(model_dir), str(tmp_path / "out")])
    assert f"{model_dir / 'generation_config.json'}: not valid JSON" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 11. config sizes the tensors lack


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 100_000, r"num_hidden_layers is 100000, but the checkpoint holds layers 0\.\.2 only"),
    ("vocab_size", 10**9, r"vocab_size is 1000000000, but tensor model\.embed_tokens\.weight .* has shape \(96, 32\)"),
    ("hidden_size", 4096, r"hidden_size is 4096, but tensor model\.embed_tokens\.weight .* has shape \(96, 32\)"),
])
def test_config_sizes_are_checked_against_the_tensors_first(model_dir, field, value, message):
    edit_config(model_dir, **{field: value})
    with pytest.raises(CheckpointError, match=rf"^{model_dir / 'config.json'}: {message}"):
        jaxmerge.load(model_dir)


# ------------------------------------------------------------------ 12. generation lengths


def test_generate_refuses_lengths_beyond_the_context(model_dir):
    edit_config(model_dir, max_position_embeddings=16)
    model = jaxmerge.load(model_dir)
    with pytest.raises(ValueError, match=r"max_new_tokens 13: .*17 positions.*context of 16 tokens"):
        jaxmerge.generate(model, random_ids(1, 4), 13)


def test_generate_refuses_a_cache_beyond_memory(model_dir):
    """Dynamic NTK scaling has no context limit: the KV cache's size bounds the length."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    edit_config(model_dir, rope_parameters=dynamic, rope_scaling=dynamic)
    model = jaxmerge.load(model_dir)
    with pytest.raises(ValueError, match=r"max_new_tokens 1000000000000: the KV cache .* GiB, more than"):
        jaxmerge.generate(model, random_ids(1, 4), 10**12)


@pytest.fixture
def no_model_loading(monkeypatch):
    """jaxmerge.load fails the test: the command must refuse before loading the model."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(checkpoint, "load", load)


def test_generate_command_refuses_lengths_before_loading(tokenized_dir, no_model_loading, capsys):
    err = one_line_error(capsys, ["generate", str(tokenized_dir), "--prompt", "w1 w2", "--max-new-tokens",
                                  "100000000"])
    assert "--max-new-tokens 100000000" in err and "context of 2048 tokens" in err
    assert "--max-new-tokens" in one_line_error(capsys, ["generate", str(tokenized_dir), "--prompt", "w1",
                                                         "--max-new-tokens", "-1"])


# ------------------------------------------------------------------ 14, 15. tokenizers: named, loaded first


def test_generate_command_names_a_malformed_tokenizer_before_loading(tokenized_dir, no_model_loading, capsys):
    tokenizer = tokenized_dir / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:53])
    err = one_line_error(capsys, ["generate", str(tokenized_dir), "--prompt", "w1"])
    assert f"{tokenizer}: not valid JSON" in err


def test_generate_command_without_a_tokenizer_fails_before_loading(model_dir, no_model_loading, capsys):
    err = one_line_error(capsys, ["generate", str(model_dir), "--prompt", "w1"])
    assert "tokenizer" in err


# ------------------------------------------------------------------ 13. symlink loops


def test_symlink_loops_are_one_line_errors(model_dir, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for command, named in ((["info", str(loop)], loop), (["convert", str(loop), str(tmp_path / "out")], loop),
                           (["convert", str(model_dir), str(loop)], loop),
                           (["convert", str(model_dir), str(loop / "out")], loop / "out"),
                           (["generate", str(loop), "--prompt", "w1"], loop)):
        assert f"{named}: a symlink loop" in one_line_error(capsys, command)
    assert not (tmp_path / "out").exists()
