"""A search's progress and tracking: the per-generation log line with its ETA, TensorBoard and
W&B (offline) through run_search, read back with their own readers, each generation once
across a resume; `search.tracking` in an evolve config."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from search_problem import SPACE, make_problem, score, search

from jaxmerge.pipeline import ConfigError, load_config
from jaxmerge.pipeline.problem import search_config
from jaxmerge.search import SearchConfig, run_search
from jaxmerge.search.evolution import eta_seconds
from jaxmerge.search.tracking import TrackingConfig
from jaxmerge.testing import toy_world as tw

TOY_DATA = Path(__file__).parent.parent / "experiments" / "data" / "toy"


def test_eta_leaves_out_the_first_generation_once_there_are_others():
    assert eta_seconds([10.0], 4) == 40.0  # only the first (compiling) one: nothing better to go on
    assert eta_seconds([10.0, 1.0, 3.0], 5) == 10.0
    assert eta_seconds([10.0, 1.0], 0) == 0.0


LINE = re.compile(r"generation (\d+)/(\d+): fitness best (\S+) mean (\S+); validation (\S+), best so far (\S+); "
                  r"sigma (\S+); ([\d.]+) s/generation, ETA (\d+):(\d\d):(\d\d)$")


def logged_lines(caplog) -> list[re.Match]:
    # Each line once: in a worker where an earlier test left a second capturing handler on the way
    # to the root logger, caplog holds each record twice (CI saw it; each line names its generation).
    lines = list(dict.fromkeys(r.getMessage() for r in caplog.records if r.name == "jaxmerge.search.evolution"
                               and not r.getMessage().startswith("resuming at generation")))
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return matches


def test_each_generation_logs_a_line_with_fitness_sigma_and_an_eta_counted_from_the_resume(tmp_path, caplog,
                                                                                            monkeypatch):
    monkeypatch.setattr(logging.getLogger("jaxmerge"), "propagate", True)  # `jaxmerge.console` may have stopped it
    caplog.set_level(logging.INFO, logger="jaxmerge.search.evolution")
    data, masks, validation = make_problem()
    sessions = []
    for generations in (2, 5):  # a search, then the same one resumed for three more generations
        caplog.clear()
        result = run_search(SPACE, sorted(data["base"]), score, data, masks, validation,
                            config=SearchConfig(generations=generations, population_size=8, seed=3),
                            out_dir=tmp_path / "run")
        sessions.append(logged_lines(caplog))
    assert [(int(m[1]), int(m[2])) for m in sessions[0]] == [(1, 2), (2, 2)]
    assert [(int(m[1]), int(m[2])) for m in sessions[1]] == [(3, 5), (4, 5), (5, 5)]
    for match, entry in zip(sessions[0] + sessions[1], result.history, strict=True):
        assert float(match[3]) == pytest.approx(entry["best_fitness"], rel=1e-3)
        assert float(match[4]) == pytest.approx(entry["mean_fitness"], rel=1e-3)
        assert float(match[6]) == pytest.approx(entry["best_validation"], rel=1e-3)
        assert 0 < float(match[7]) < 1  # CMA-ES's step size, from 1/6
    # The resumed session's ETA: its own generations' mean time (after its first) x those left.
    seconds = [float(m[8]) for m in sessions[1]]
    for k, match in enumerate(sessions[1]):
        eta = 3600 * int(match[9]) + 60 * int(match[10]) + int(match[11])
        remaining = 5 - int(match[1])
        assert abs(eta - eta_seconds(seconds[:k + 1], remaining)) <= 1 + 0.01 * remaining
    assert eta == 0


def scalars(directory: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """{tag: [(step, value)]} and {histogram tag: [step]}, as TensorBoard reads the directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    return ({tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]},
            {tag: [e.step for e in events.Histograms(tag)] for tag in tags["histograms"]})


def test_tensorboard_logs_each_generation_once_across_resumes(tmp_path):
    tracking = TrackingConfig("tensorboard", stage="ps")
    out = tmp_path / "run" / "search"
    search(out, 3, tracking=tracking)
    search(out, 5, tracking=tracking)  # resumed at generation 3
    # The newest checkpoint lost: the next resume runs generation 4 again, and TensorBoard
    # must show only the new one (purge_step).
    shutil.rmtree(out / "checkpoints" / "5")
    result = search(out, 5, tracking=tracking)
    values, histograms = scalars(out / "tensorboard")
    steps = list(range(5))
    for tag in ("fitness/best", "fitness/mean", "fitness/std", "sigma", "validation", "best_validation", "seconds"):
        assert [s for s, _ in values[f"ps/{tag}"]] == steps, tag
    history = result.history
    np.testing.assert_allclose([v for _, v in values["ps/fitness/best"]], [h["best_fitness"] for h in history],
                               rtol=1e-6)
    np.testing.assert_allclose([v for _, v in values["ps/fitness/mean"]], [h["mean_fitness"] for h in history],
                               rtol=1e-6)
    np.testing.assert_allclose([v for _, v in values["ps/best_validation"]],
                               [h["best_validation"] for h in history], rtol=1e-6)
    assert all(v > 0 for _, v in values["ps/fitness/std"]) and all(0 < v < 1 for _, v in values["ps/sigma"])
    assert histograms == {"ps/best_genome": steps}

    # A directory of one's own: <directory>/<run name>/<stage>.
    elsewhere = TrackingConfig("tensorboard", directory=str(tmp_path / "tb"), run_name="trial", stage="dfs")
    search(tmp_path / "other", 2, tracking=elsewhere)
    values, _ = scalars(tmp_path / "tb" / "trial" / "dfs")
    assert [s for s, _ in values["dfs/fitness/best"]] == [0, 1]


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run, as wandb's own reader (`wandb leet inspect`) gives them."""
    listing = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True, timeout=60)
    return [json.loads(line) for line in listing.stdout.splitlines() if line.strip()]


def test_wandb_offline_logs_each_generation_once_in_one_resumed_run(tmp_path, monkeypatch):
    for variable, value in {"WANDB_MODE": "offline", "WANDB_CONSOLE": "off", "WANDB_SILENT": "true",
                            "WANDB_DIR": tmp_path / "wandb-home", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                            "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                            "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(variable, str(value))
    tracking = TrackingConfig("wandb", project="tests", run_name="trial", stage="ps")
    out = tmp_path / "run" / "search"
    search(out, 2, tracking=tracking)
    result = search(out, 4, tracking=tracking)  # resumed: the same W&B run, generations 2 and 3
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    sessions = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2
    rows, runs, exits = [], [], []
    for session in sessions:
        records = wandb_records(session)
        runs += [r["run"] for r in records if r["type"] == "run"]
        rows += [r["history"]["item"] for r in records if r["type"] == "history"]
        exits += [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"]
    assert [(r["run_id"], r["project"], r["display_name"], r["run_group"]) for r in runs] == \
        [(run_id, "tests", "trial-ps", "trial")] * 2
    assert exits == [0, 0]
    assert [row["_step"] for row in rows] == [0, 1, 2, 3]
    history = result.history
    np.testing.assert_allclose([row["ps/fitness/best"] for row in rows], [h["best_fitness"] for h in history])
    np.testing.assert_allclose([row["ps/fitness/mean"] for row in rows], [h["mean_fitness"] for h in history])
    np.testing.assert_allclose([row["ps/best_validation"] for row in rows], [h["best_validation"] for h in history])
    assert all(row["ps/fitness/std"] > 0 and 0 < row["ps/sigma"] < 1 for row in rows)
    np.testing.assert_allclose(rows[-1]["ps/best_genome"], result.best_genome, rtol=1e-6)
    assert all(row["ps/best_genome_histogram._type"] == "histogram" for row in rows)


def test_a_missing_tracker_package_is_one_line_naming_it_and_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed: importing it fails
    with pytest.raises(ValueError) as error:
        search(tmp_path / "run", 2, tracking=TrackingConfig("tensorboard"))
    message = str(error.value)
    assert "\n" not in message and "tensorboardX" in message and 'pip install "jaxmerge[tracking]"' in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def evolve_config(tmp_path: Path, **search) -> Path:
    world = tw.world_dir(0)
    config = {"genome": {"models": [str(world / "japanese"), str(world / "math")], "base_model": str(world / "base"),
                         "merge_method": "task_arithmetic"},
              "tasks": [{"name": "ja_math", "metric": "number", "fitness": str(TOY_DATA / "ja_math_fitness.jsonl"),
                         "prompt": "{question}", "max_new_tokens": 4}],
              "search": {"generations": 3, **search}}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_search_tracking_keys_parse_and_reach_the_search(tmp_path, monkeypatch):
    config = load_config(evolve_config(tmp_path))
    assert search_config(config, None).tracking.backend == "none"
    config = load_config(evolve_config(tmp_path, tracking="tensorboard", tracking_dir="tb"))
    tracking = search_config(config, None, run_dir=tmp_path / "runs" / "evolve-1").tracking
    assert tracking == TrackingConfig("tensorboard", directory="tb", run_name="evolve-1", stage="ps")
    config = load_config(evolve_config(tmp_path, tracking="wandb", tracking_project="merges", tracking_run="try-3"))
    assert search_config(config, None, run_dir=tmp_path / "x").tracking == \
        TrackingConfig("wandb", project="merges", run_name="try-3", stage="ps")

    with pytest.raises(ConfigError, match=r"config.yml:\d+: search.tracking: unknown tracker 'mlflow' \(known: "
                                          r"none, wandb, tensorboard\)$"):
        load_config(evolve_config(tmp_path, tracking="mlflow"))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"search.tracking: tracking with wandb needs the wandb package, which is "
                                          r"not installed: pip install \"jaxmerge\[tracking\]\"$"):
        load_config(evolve_config(tmp_path, tracking="wandb"))
