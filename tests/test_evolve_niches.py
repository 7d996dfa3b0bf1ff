"""`search.strategy: natural_niches` in `jaxmerge evolve` (issue #30): no base model, the
archive's best saved with its provenance, which `jaxmerge merge provenance.json` re-derives."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_evolve import WORLD, small_config, toy_data, write_config

import jaxmerge
from jaxmerge import cli
from jaxmerge.merge.tree import flat_params
from jaxmerge.pipeline import ConfigError, evolve, load_config


def niches_config(tmp_path, **search):
    config = small_config(tmp_path, search={"strategy": "natural_niches", "generations": 3, "population": 2,
                                            "minibatch": 16, "validation_size": 16, **search},
                          niches={"archive_size": 3})
    del config["genome"]["base_model"]
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("niches")
    toy_data(tmp_path)
    config = load_config(write_config(tmp_path, niches_config(tmp_path)))
    return evolve(dataclasses.replace(config, out=str(tmp_path / "run")))


def test_a_run_without_a_base_saves_the_archives_best_and_its_specialists(run):
    results = json.loads((run.run_dir / "results.json").read_text())
    search = results["search"]
    assert search["strategy"] == "natural_niches" and len(search["archive"]) == 3
    assert {m["id"] for m in search["archive"]} >= {search["best_id"]}
    for member in search["archive"]:
        assert set(member["fitness"]) == {"ja_math", "ja_qa"}
    assert len(search["coverage"]) == 3
    assert run.best == "niches" and (run.run_dir / "merged" / "config.json").exists()
    assert (run.run_dir / "coverage.png").stat().st_size > 0
    markdown = (run.run_dir / "results.md").read_text()
    assert "The archive (natural niches)" in markdown and "(best)" in markdown
    evolved = [r for r in run.rows if r["kind"] == "evolved"]
    assert len(evolved) == 1 and set(evolved[0]["scores"]) == {"ja_math", "ja_qa"}
    assert [r["model"] for r in run.rows if r["kind"] == "source"] == ["japanese", "math"]


def test_provenance_rederives_the_saved_model(run, tmp_path):
    provenance = run.run_dir / "provenance.json"
    document = json.loads(provenance.read_text())
    assert [s["name"] for s in document["sources"]] == ["japanese", "math"]
    assert cli.main(["merge", str(provenance), str(tmp_path / "again")]) in (None, 0)
    saved, again = (flat_params(jaxmerge.load(d)) for d in (run.run_dir / "merged", tmp_path / "again"))
    for path in saved:
        np.testing.assert_allclose(np.asarray(again[path], np.float32), np.asarray(saved[path], np.float32),
                                   atol=1e-5, rtol=1e-5)


def test_every_other_search_needs_a_base(tmp_path):
    toy_data(tmp_path)
    config = niches_config(tmp_path)
    config["search"]["strategy"] = "cma_es"
    with pytest.raises(ConfigError, match="genome.base_model"):
        load_config(write_config(tmp_path, config))
    config = niches_config(tmp_path)
    config["niches"]["include_base"] = True
    with pytest.raises(ConfigError, match="niches.include_base"):
        load_config(write_config(tmp_path, config))
    config["niches"] = {"task_vectors": True}
    with pytest.raises(ConfigError, match="niches.task_vectors"):
        load_config(write_config(tmp_path, config))
    assert WORLD.exists()


def test_task_arithmetic_children_and_their_provenance(tmp_path):
    """niches.task_vectors: children fuse the sources' task vectors over the base; the
    provenance names the base, and re-derives the saved model from the sources and the base."""
    toy_data(tmp_path, test_rows=4)
    config = niches_config(tmp_path, generations=1)
    config["genome"]["base_model"] = str(WORLD / "base")
    config["niches"]["task_vectors"] = True
    result = evolve(dataclasses.replace(load_config(write_config(tmp_path, config)), out=str(tmp_path / "run")))
    provenance = result.run_dir / "provenance.json"
    assert json.loads(provenance.read_text())["task_vectors_of"] == str(WORLD / "base")
    assert cli.main(["merge", str(provenance), str(tmp_path / "again")]) in (None, 0)
    saved, again = (flat_params(jaxmerge.load(d)) for d in (result.run_dir / "merged", tmp_path / "again"))
    for path in saved:
        np.testing.assert_allclose(np.asarray(again[path], np.float32), np.asarray(saved[path], np.float32),
                                   atol=1e-5, rtol=1e-5)
