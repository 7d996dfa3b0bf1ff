"""Hub references (`org/name[@revision]`) resolved offline from a cache laid out as
huggingface_hub lays it out: blobs by hash, refs naming commits, snapshots of links."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hf_logits, make_hf_model, random_ids
from safetensors.numpy import load_file

import jaxmerge
from jaxmerge import cli
from jaxmerge.errors import CheckpointError
from jaxmerge.hub import parse_reference, resolve_model, resolved_revision
from jaxmerge.merge.recipe import merge_from_yaml

MAIN, PINNED = "a" * 40, "b" * 40


def cache_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path], ref: str | None = None) -> Path:
    """`files` stored in the cache as huggingface_hub stores them: each a blob named by its
    hash, linked from snapshots/<commit>/; `ref` (a branch) names the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline cache holding org/tiny: main is seed 0's weights, PINNED seed 1's."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    models = {}
    for seed, commit, ref in ((0, MAIN, "main"), (1, PINNED, None)):
        model = make_hf_model("llama_tied_theta", seed=seed)
        saved = tmp_path / f"saved{seed}"
        model.save_pretrained(saved)
        cache_snapshot(cache, "org/tiny", commit, {p.name: p for p in saved.iterdir()}, ref)
        models[commit] = model
    return models


def test_a_reference_loads_its_snapshot_and_a_pinned_revision_its_own(hub):
    ids = random_ids(2, 6)
    for reference, commit in (("org/tiny", MAIN), (f"org/tiny@{PINNED}", PINNED)):
        model = jaxmerge.load(reference)
        np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(hub[commit], ids), atol=1e-4, rtol=0)
        assert resolved_revision(resolve_model(reference)) == commit
    assert resolved_revision(Path("some/local/dir")) is None


def test_a_local_directory_of_the_same_name_wins(hub, tmp_path):
    local = tmp_path / "org" / "tiny"
    make_hf_model("llama_tied_theta", seed=2).save_pretrained(local)
    assert parse_reference("org/tiny") is None and resolve_model("org/tiny") == Path("org/tiny")
    assert jaxmerge.load("org/tiny").config.num_layers == 3


@pytest.mark.parametrize("reference, message", [
    ("org/absent", "org/absent: not in the Hugging Face cache (.*) and HF_HUB_OFFLINE=1"),
    ("org/tiny@" + "c" * 40, "org/tiny@c{40}: not in the Hugging Face cache"),
    ("org/pickled", "org/pickled: no safetensors weights in the repository"),
])
def test_what_cannot_be_resolved_is_one_line_naming_the_reference(hub, tmp_path, reference, message):
    model, torch_only = make_hf_model("llama_tied_theta"), tmp_path / "torch_only"
    model.config.save_pretrained(torch_only)
    torch.save(model.state_dict(), torch_only / "pytorch_model.bin")  # a pickle, as old repositories hold
    cache_snapshot(Path(os.environ["HF_HUB_CACHE"]), "org/pickled", MAIN,
                   {p.name: p for p in torch_only.iterdir()}, "main")
    with pytest.raises(CheckpointError, match=message) as error:
        jaxmerge.load(reference)
    assert "\n" not in str(error.value)


def test_the_command_line_takes_a_reference(hub, capsys):
    assert cli.main(["info", f"org/tiny@{PINNED}"]) == 0
    assert capsys.readouterr().out.startswith(f"org/tiny@{PINNED}: LlamaForCausalLM")


def test_what_is_not_a_reference_is_left_to_the_callers_error():
    for name in ("model", "./org/tiny", "/abs/path", "a/b/c", "org/na me"):
        assert parse_reference(name) is None, name
    assert parse_reference("org/name@v1.0") is not None


def test_a_model_card_recipe_merges_from_the_cache_and_names_what_is_missing(hub, tmp_path):
    """A recipe as model cards write them (Hub IDs, one pinned), merged offline."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/tiny\n    parameters: {weight: 0.5}\n"
                      f"  - model: org/tiny@{PINNED}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    assert cli.main(["merge", str(recipe), str(tmp_path / "merged")]) == 0
    state = {k: v.float() for k, v in hub[MAIN].state_dict().items()}
    pinned = hub[PINNED].state_dict()
    written = load_file(tmp_path / "merged" / "model.safetensors")
    for key, value in written.items():
        np.testing.assert_allclose(value, 0.5 * (state[key].numpy() + pinned[key].float().numpy()), atol=1e-6,
                                   err_msg=key)
    recipe.write_text(recipe.read_text().replace("org/tiny@", "org/other@"))
    with pytest.raises(CheckpointError, match=f"org/other@{PINNED}: not in the Hugging Face cache"):
        merge_from_yaml(recipe, tmp_path / "merged2")
    assert not (tmp_path / "merged2").exists()


def test_an_evolve_config_names_hub_models_and_records_their_commits(hub, tmp_path):
    """A genome's references become their snapshots, whose names are the commits: run.json
    (the config's record) says exactly which weights a run merged."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"question": "q{i}", "answer": "{i}"}}\n' for i in range(8)))
    config = tmp_path / "evolve.yml"
    config.write_text(f"genome:\n  models: [org/tiny, org/tiny@{PINNED}]\n  base_model: org/tiny\n"
                      "  merge_method: task_arithmetic\n"
                      "tasks:\n  - {name: t, metric: exact, fitness: rows.jsonl, test: rows.jsonl,\n"
                      "     prompt: '{question}'}\n")
    loaded = jaxmerge.load_config(config)
    assert [resolved_revision(p) for p in (*loaded.genome.models, loaded.genome.base_model)] == [MAIN, PINNED, MAIN]
    assert str(resolve_model(f"org/tiny@{PINNED}")) in str(loaded.record())
