"""Hub references (`org/name[@revision]`) resolved offline from a cache laid out as
huggingface_hub lays it out: blobs by hash, refs naming commits, snapshots of links."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import hf_logits, make_hf_model, random_ids
from safetensors.numpy import load_file

import jaxmerge
from jaxmerge import cli
from jaxmerge.errors import CheckpointError
from jaxmerge.eval.tasks import TaskData, TaskSpec
from jaxmerge.hub import (
    parse_reference,
    pinned_name,
    resolve_model,
    resolved_revision,
    short_name,
    snapshot_reference,
)
from jaxmerge.merge import flat_params
from jaxmerge.merge.recipe import merge_from_yaml, parse_recipe, pinned_text
from jaxmerge.pipeline import EvolveConfig, GenomeConfig, SearchSettings
from jaxmerge.pipeline.config import resolve_config
from jaxmerge.pipeline.rundir import RunDirError
from jaxmerge.testing import toy_world as tw

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
    # Beside the merge, the recipe names what it merged: org/tiny pinned to the commit main was.
    saved = (tmp_path / "merged" / "mergekit_config.yml").read_text()
    assert saved == f"# org/tiny was merged at commit {MAIN} (pinned below)\n" + recipe.read_text().replace(
        "model: org/tiny\n", f"model: org/tiny@{MAIN}\n")
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
    assert dict(loaded.genome.references) == {str(resolve_model("org/tiny")): "org/tiny",
                                              str(resolve_model(f"org/tiny@{PINNED}")): f"org/tiny@{PINNED}"}
    assert loaded.genome.source_names() == ("tiny", "tiny@bbbbbbbb")  # not the snapshots' names (commits)
    assert resolve_config(loaded) is loaded  # resolved once
    config.write_text(config.read_text().replace("  merge_method:", "  references: {x: y}\n  merge_method:"))
    with pytest.raises(jaxmerge.ConfigError, match="genome.references: set by jaxmerge"):
        jaxmerge.load_config(config)


def test_a_snapshot_is_named_by_its_reference_pinned_to_its_commit(hub):
    snapshot = resolve_model(f"org/tiny@{PINNED}")
    assert str(snapshot_reference(snapshot)) == f"org/tiny@{PINNED}"
    assert pinned_name(f"{snapshot} (language model)") == f"org/tiny@{PINNED} (language model)"
    for local in ("some/dir", str(snapshot.parent), "/x/models--org/snapshots/" + MAIN):
        assert snapshot_reference(local) is None and pinned_name(local) == local
    assert [short_name(r) for r in ("org/tiny", "org/tiny@v1.0", f"org/tiny@{PINNED}")] == \
        ["tiny", "tiny@v1.0", "tiny@bbbbbbbb"]


def test_a_recipe_pins_its_references_where_they_are_written(hub):
    """Quoted, anchored and aliased references are each pinned in place; comments stay."""
    text = (f"merge_method: task_arithmetic  # a comment\nbase_model: &base 'org/tiny'\nmodels:\n"
            f"  - model: {{model: \"org/tiny@{PINNED}\"}}\n    parameters: {{weight: 0.5}}\n  - model: *base\n"
            "tokenizer_source: org/tiny\n")
    recipe = parse_recipe(text)
    assert pinned_text(recipe) == f"# org/tiny was merged at commit {MAIN} (pinned below)\n" + text.replace(
        "'org/tiny'", f"'org/tiny@{MAIN}'").replace("source: org/tiny", f"source: org/tiny@{MAIN}")
    assert pinned_text(parse_recipe(pinned_text(recipe))) == pinned_text(recipe)  # pinned already: as it is


@pytest.fixture
def toy_hub(tmp_path, monkeypatch):
    """An offline cache holding the toy world's checkpoints as Hub repositories: toy/base and
    toy/japanese on their main branches, toy/math at a commit no branch names."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    commits = {"base": "1" * 40, "japanese": "2" * 40, "math": "3" * 40}
    for name, commit in commits.items():
        directory = tw.world_dir(0) / name
        cache_snapshot(cache, f"toy/{name}", commit, {p.name: p for p in directory.iterdir()},
                       None if name == "math" else "main")
    return commits


def test_an_evolve_run_records_its_hub_models_and_its_recipe_rebuilds_the_merge(toy_hub, tmp_path):
    """A config built in Python naming Hub models: run.json and results.json give each
    reference as written with its commit, recipe.yml names each pinned to its commit, and
    `jaxmerge merge` of recipe.yml (offline, from the cache) rebuilds merged/. A resume after
    a branch moved to another commit is refused, naming the reference."""
    rng = np.random.default_rng(0)
    pairs = [tw.japanese_qa(rng) for _ in range(24)]
    data = TaskData(tuple(p for p, _ in pairs), tuple(a for _, a in pairs))
    math = f"toy/math@{toy_hub['math']}"
    config = EvolveConfig(GenomeConfig(("toy/japanese", math), "toy/base", merge_method="task_arithmetic"),
                          tasks=(TaskSpec("ja_qa", fitness=data.rows(0, 16), test=data.rows(16, 24),
                                          max_new_tokens=3),),
                          search=SearchSettings(generations=1, population=2, minibatch=8, validation_size=8),
                          baselines=False, out=str(tmp_path / "run"))
    result = jaxmerge.evolve(config)
    run = result.run_dir
    expected = {reference: {"commit": toy_hub[name], "pinned": f"toy/{name}@{toy_hub[name]}",
                            "path": str(resolve_model(reference))}
                for reference, name in (("toy/base", "base"), ("toy/japanese", "japanese"), (math, "math"))}
    record = json.loads((run / "run.json").read_text())
    assert record["hub_models"] == expected
    assert sorted(ref for _, ref in record["config"]["genome"]["references"]) == sorted(expected)
    results = json.loads((run / "results.json").read_text())
    assert results["models"] == {"base": "toy/base", "japanese": "toy/japanese", "math@33333333": math}
    assert results["hub_models"] == expected
    recipe = yaml.safe_load((run / "recipe.yml").read_text())
    assert recipe["base_model"] == expected["toy/base"]["pinned"]
    assert [m["model"] for m in recipe["models"]] == [expected["toy/japanese"]["pinned"], expected[math]["pinned"]]
    assert (run / "merged" / "mergekit_config.yml").read_text() == (run / "recipe.yml").read_text()
    # The recipe rebuilds the merge from the cache: the same weights as merged/.
    assert cli.main(["merge", str(run / "recipe.yml"), str(tmp_path / "rebuilt")]) == 0
    assert (tmp_path / "rebuilt" / "mergekit_config.yml").read_text() == (run / "recipe.yml").read_text()
    saved, rebuilt = flat_params(jaxmerge.load(run / "merged")), flat_params(jaxmerge.load(tmp_path / "rebuilt"))
    assert saved.keys() == rebuilt.keys()
    for path in saved:
        np.testing.assert_allclose(np.asarray(rebuilt[path]), np.asarray(saved[path]), rtol=0, atol=2e-6,
                                   err_msg=path)
    # toy/japanese's main moves to another commit: the unfinished run is not resumed on its weights.
    (run / "results.json").unlink()
    moved = "4" * 40
    cache_snapshot(Path(os.environ["HF_HUB_CACHE"]), "toy/japanese", moved,
                   {p.name: p for p in (tw.world_dir(0) / "math").iterdir()}, "main")
    with pytest.raises(RunDirError, match=f"toy/japanese now resolves to commit {moved}, and the run started on "
                                          f"{toy_hub['japanese']}"):
        jaxmerge.evolve(config)
