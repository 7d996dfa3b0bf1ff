"""The natural-niches search loop (issue #30): it fuses two specialists into a model that covers
both, compiles nothing after its first generation, resumes exactly as an uninterrupted run,
refuses a log that disagrees with its checkpoint, and its provenance re-derives the winner."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from niche_problem import VALIDATION, make_world, score_fn, search
from search_problem import compilations_by_generation, strip_times

from jaxmerge.search.natural_niches import NicheConfig
from jaxmerge.search.niche_search import rebuild


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return search(tmp_path_factory.mktemp("whole"), 8)


def test_fusion_covers_what_no_source_does(whole):
    validation = whole.member_validation
    sources_alone = search_sources_validation()
    assert whole.best_validation > max(sources_alone) + 0.05
    assert whole.best_id >= 2  # a child, not a source
    assert all(0.0 <= e["coverage"] <= 1.0 for e in whole.history)
    assert np.nanmax(validation) == pytest.approx(whole.best_validation)
    log = [json.loads(line) for line in (whole.out_dir / "generations.jsonl").read_text().splitlines()]
    assert strip_times(log) == strip_times(whole.history)
    assert len(whole.records) == 8 * 3


def search_sources_validation():
    sources, data, order = make_world()
    score = score_fn(order)
    return [float(np.mean(score(s, data, VALIDATION, None))) for s in sources]


def test_resume_ends_as_the_uninterrupted_run(whole, tmp_path):
    search(tmp_path, 3)
    resumed = search(tmp_path, 8)
    assert strip_times(resumed.history) == strip_times(whole.history)
    assert resumed.member_ids == whole.member_ids and resumed.best_id == whole.best_id
    for p in whole.best_params:
        np.testing.assert_array_equal(resumed.best_params[p], whole.best_params[p])


def test_a_log_that_disagrees_with_the_checkpoint_is_refused(tmp_path):
    search(tmp_path, 3)
    log_path = tmp_path / "generations.jsonl"
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    kept = [c for e in entries for c in e["children"] if c["id"] in entries[-1]["archive"]]
    assert kept, "no child is in the archive: the test shows nothing"
    kept[0]["w"] = kept[0]["w"] / 2 + 0.1  # a different child in that slot
    log_path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(ValueError, match="fingerprints"):
        search(tmp_path, 4)


def test_provenance_rederives_the_winner(whole):
    sources, _, order = make_world()
    tree = whole.ancestry()
    assert "a" in tree and "b" in tree
    rebuilt = rebuild(tree, {"skill_a": sources[0], "skill_b": sources[1]}, order, NicheConfig(archive_size=4))
    for p in whole.best_params:
        np.testing.assert_allclose(rebuilt[p], whole.best_params[p], atol=1e-5, rtol=1e-5)


def test_generations_after_the_first_compile_nothing(tmp_path):
    with compilations_by_generation("jaxmerge.search.niche_search") as counts:
        search(tmp_path, 5, interpolation="linear")
    assert len(counts) == 5
    assert counts[1:] == [counts[0]] * 4, counts


def test_resume_after_kill_9(whole, tmp_path):
    job = [sys.executable, str(Path(__file__).parent / "niche_problem.py"), str(tmp_path), "8"]
    process = subprocess.Popen(job, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.isdigit() and int(p.name) >= 2 for p in
                                              (checkpoints.iterdir() if checkpoints.exists() else [])):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert 2 <= len(log) < 8, "the job was not stopped part-way"
    resumed = search(tmp_path, 8)
    assert strip_times(resumed.history) == strip_times(whole.history)
    for p in whole.best_params:
        np.testing.assert_array_equal(resumed.best_params[p], whole.best_params[p])


@pytest.mark.parametrize("interpolation", ["linear", "slerp"])
def test_device_layouts_find_what_one_device_finds(tmp_path, interpolation):
    """The children split over 2 population devices, the archive over 2 model devices: the same
    generations, archive and winner as on one device (bit for bit where the child is linear;
    slerp's global norms are sums whose order the sharding may change: to 1e-6)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(Path(__file__).parent), "NICHE_INTERPOLATION": interpolation}
    job = [sys.executable, str(Path(__file__).parent / "niche_problem.py"), str(tmp_path), "5", "1x1", "2x2", "4x1"]
    done = subprocess.run(job, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["layout"] for r in runs] == ["1x1", "2x2", "4x1"] and runs[0]["devices"] == 4
    for other in runs[1:]:
        assert other["member_ids"] == runs[0]["member_ids"] and other["best_id"] == runs[0]["best_id"]
        for mine, theirs in zip(other["history"], runs[0]["history"], strict=True):
            assert [c["slot"] for c in mine["children"]] == [c["slot"] for c in theirs["children"]]
            np.testing.assert_allclose(mine["best_fitness"], theirs["best_fitness"], atol=1e-6)
        for p, value in runs[0]["best"].items():
            if interpolation == "linear":
                np.testing.assert_array_equal(other["best"][p], value)
            else:
                np.testing.assert_allclose(other["best"][p], value, atol=1e-6)
