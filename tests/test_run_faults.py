"""Issue #24's run-directory and config defects: each test failed on the code before the fix.

The run directory is checked against the inputs and held by one process; results are written
whole; a resume checks the inputs' contents; bad numbers, YAML and keys are one-line errors
before anything loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_evolve import WORLD, small_config, toy_data, write_config

import jaxmerge
from jaxmerge import checkpoint
from jaxmerge.merge.plan import RecipeError
from jaxmerge.merge.recipe import parse_recipe
from jaxmerge.pipeline import ConfigError, evolve, load_config
from jaxmerge.pipeline.results import write_results
from jaxmerge.pipeline.rundir import RunDirError, create_run_dir, fingerprint_inputs, lock_path, plan_run_dir, run_lock


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model is loaded: every check here must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args}")
    monkeypatch.setattr(checkpoint, "load", refuse)  # where the pipeline looks it up


def copied_world(tmp_path: Path) -> Path:
    """The toy checkpoints copied (1 MB each): tests may try to write into them."""
    for name in ("base", "japanese", "math"):
        shutil.copytree(WORLD / name, tmp_path / "world" / name)
    return tmp_path / "world"


def world_config(tmp_path: Path, world: Path, **changes) -> dict:
    config = small_config(tmp_path, **changes)
    config["genome"] = {**config["genome"], "models": [str(world / "japanese"), str(world / "math")],
                        "base_model": str(world / "base")}
    return config


def unchanged(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


# ----------------------------------------------------------------------------- 1. --out against the inputs


@pytest.mark.parametrize("inside", ["base/run", "japanese", "data", "tokenizer/run"])
def test_run_directory_is_never_in_or_around_an_input(tmp_path, no_loading, inside):
    toy_data(tmp_path)
    world = copied_world(tmp_path)
    shutil.copytree(world / "base", tmp_path / "tokenizer")
    config = world_config(tmp_path, world)
    config["genome"]["tokenizer_source"] = str(tmp_path / "tokenizer")
    target = {"base/run": world / "base" / "run", "japanese": world / "japanese",
              "data": tmp_path / "data", "tokenizer/run": tmp_path / "tokenizer" / "run"}[inside]
    before = unchanged(tmp_path)
    with pytest.raises(jaxmerge.CheckpointError, match="refusing to write over, inside or around an input"):
        evolve(load_config(write_config(tmp_path, {**config, "out": str(target)})))
    assert unchanged(tmp_path) == {**before, "config.yml": unchanged(tmp_path)["config.yml"]}


def test_unwritable_run_directory_before_loading(tmp_path, no_loading, monkeypatch):
    toy_data(tmp_path)
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro" and real_access(path, mode))
    config = small_config(tmp_path, out=str(tmp_path / "ro" / "run"))
    with pytest.raises(RunDirError, match="cannot be written"):
        evolve(load_config(write_config(tmp_path, config)))
    assert not (tmp_path / "ro" / "run").exists()


# ----------------------------------------------------------------------------- 2. results written whole


def _results(n_rows: int = 200) -> dict:
    rows = [{"model": f"m{i}", "kind": "source", "scores": {"t": float(i)}, "samples": {}} for i in range(n_rows)]
    return {"experiment": "x", "rows": rows}


def test_results_are_written_whole_or_not_at_all(tmp_path):
    """A real write failure (RLIMIT_FSIZE: EFBIG, as a full disk fails) while writing the results:
    no results.json (the finished marker) and no partial file, the error names the file."""
    run_dir = create_run_dir(tmp_path / "run", "x", {})
    script = ("import sys, signal; from pathlib import Path; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "from jaxmerge.pipeline.results import write_results\n"
              "from test_run_faults import _results\n"
              f"write_results(Path({str(run_dir)!r}), _results(), ['t'])\n")
    limited = ["bash", "-c", 'ulimit -f 8 && exec "$0" "$@"', sys.executable, "-c", script]  # 8 KiB per file
    result = subprocess.run(limited, capture_output=True, text=True, cwd=Path(__file__).parent,
                            env={**os.environ, "JAXMERGE_CACHE_DIR": "off"})
    assert result.returncode != 0
    assert "results" in result.stderr.splitlines()[-1] and "File too large" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in run_dir.iterdir()) in (["run.json"], ["results.md", "run.json"])
    assert plan_run_dir(str(run_dir), "x", {}) == run_dir  # resumable, not "a finished run"


def test_results_json_is_json_without_nan(tmp_path):
    results = _results(2)
    results["rows"][0]["scores"]["t"] = float("nan")
    results["best"] = {"validation": {"ps": float("-inf")}}
    write_results(tmp_path, results, ["t"])

    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert saved["rows"][0]["scores"]["t"] is None and saved["best"]["validation"]["ps"] is None
    assert "| m0 | source | — |" in (tmp_path / "results.md").read_text()


# ----------------------------------------------------------------------------- 3. one process per run directory


def test_a_held_run_directory_is_refused_before_loading(tmp_path, no_loading):
    toy_data(tmp_path)
    out = tmp_path / "run"
    config = load_config(write_config(tmp_path, small_config(tmp_path, out=str(out))))
    with run_lock(out) as lock:
        assert f"process {os.getpid()}" in lock.read_text()
        with pytest.raises(RunDirError, match=rf"run is in use by process {os.getpid()}"):
            evolve(config)
    assert not lock_path(out).exists() and not out.exists()


def test_a_dead_processes_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path\n"
                               "from jaxmerge.pipeline.rundir import run_lock\n"
                               f"with run_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirError, match=f"in use by process {holder.pid}"):
        with run_lock(out):
            pass
    holder.kill()  # kill -9: the lock file stays, its lock goes with the process
    holder.wait()
    assert lock_path(out).exists()
    with run_lock(out):
        pass


def test_run_json_is_checked_again_when_the_directory_is_created(tmp_path):
    """Another run's run.json written between the check and the creation is never adopted."""
    path = plan_run_dir(str(tmp_path / "run"), "x", {"seed": 0})
    create_run_dir(path, "x", {"seed": 1})  # the other run got there first
    with pytest.raises(RunDirError, match="differs in config.seed"):
        create_run_dir(path, "x", {"seed": 0})


# ----------------------------------------------------------------------------- 5. resume checks the inputs' contents


@pytest.mark.parametrize("change", ["data", "weights"])
def test_resume_refuses_changed_inputs_naming_the_file(tmp_path, no_loading, change):
    toy_data(tmp_path)
    world = copied_world(tmp_path)
    config = world_config(tmp_path, world, out=str(tmp_path / "run2"))
    config["search"]["generations"] = 1
    path = write_config(tmp_path, config)
    run = tmp_path / "run2"
    # The run directory as a run killed after its models loaded leaves it.
    loaded = load_config(path)
    create_run_dir(run, loaded.name, loaded.record(), fingerprint_inputs(loaded.input_paths()))
    changed = tmp_path / "data" / "ja_math_fitness.jsonl"
    if change == "data":  # rows shuffled: same size, other contents
        lines = changed.read_text().splitlines()
        changed.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    else:
        changed = world / "math" / "model.safetensors"
        changed.write_bytes((world / "japanese" / "model.safetensors").read_bytes())
    with pytest.raises(RunDirError, match=f"inputs changed since it started \\({changed}"):
        evolve(load_config(path))


def test_corrupt_run_json_is_named(tmp_path, no_loading):
    toy_data(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"experiment": ')
    with pytest.raises(RunDirError, match=r"run\.json: damaged, not JSON"):
        evolve(load_config(write_config(tmp_path, small_config(tmp_path, out=str(tmp_path / "run")))))


# ----------------------------------------------------------------------------- 7, 13, 14, 15. numbers and keys


@pytest.mark.parametrize("section, key, value, message", [
    ("search", "population", 1, "search.population: candidates per generation .* must be in \\[2, 100,000\\]"),
    ("search", "population", 1_000_000_000, "search.population: .* got 1000000000"),
    ("search", "sigma", 0, "search.sigma: .* must be in \\(0, 10\\]"),
    ("search", "sigma", -1, "search.sigma"),
    ("search", "generations", 0, "search.generations: .* must be >= 1"),
    ("search", "generations", -3, "search.generations"),
    ("search", "minibatch", 0, "search.minibatch"),
    ("search", "minibatch", -1, "search.minibatch"),
    ("search", "chunk_size", 0, "search.chunk_size"),
    ("search", "validation_size", 0, "search.validation_size"),
    ("search", "seed", 10**23, "search.seed: the random seed: must be in \\[0, 4,294,967,295\\]"),
    ("genome", "layer_granularity", -1, "genome.layer_granularity: layers per gene group, >= 0"),
    ("genome", "merge_method", "slerp", "genome.merge_method: slerp merges the base with at most 1 model"),
    ("genome", "tokenizer_source", "union", "genome.tokenizer_source: a vocabulary union is for `jaxmerge merge`"),
])
def test_bad_numbers_and_keys_are_named_before_loading(tmp_path, no_loading, section, key, value, message):
    toy_data(tmp_path)
    config = small_config(tmp_path, out=str(tmp_path / "run"))
    config[section] = {**config[section], key: value}
    with pytest.raises(ConfigError, match=r"config\.yml:\d+: " + message):
        load_config(write_config(tmp_path, config))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, message", [
    ("max_new_tokens", 0, "tasks\\[0\\].max_new_tokens: tokens generated per response.* must be in \\[1, 128\\]"),
    ("max_new_tokens", 10**8, "within the base model's context of 128 tokens"),
    ("minibatch", -1, "tasks\\[0\\].minibatch"),
])
def test_task_lengths_are_bounded_before_loading(tmp_path, no_loading, key, value, message):
    toy_data(tmp_path)
    config = small_config(tmp_path)
    config["tasks"][0][key] = value
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, config))


def test_tokenizer_source_base_is_the_base_model(tmp_path):
    toy_data(tmp_path)
    config = small_config(tmp_path)
    config["genome"]["tokenizer_source"] = "base"
    assert load_config(write_config(tmp_path, config)).genome.tokenizer_source == str(WORLD / "base")


# ----------------------------------------------------------------------------- 10, 13. YAML


def alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    toy_data(tmp_path)
    text = yaml.safe_dump(small_config(tmp_path), sort_keys=False)
    (tmp_path / "bomb.yml").write_text(text + "unknown:\n" + "".join("  " + line + "\n"
                                                                        for line in alias_bomb().splitlines()))
    began = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yml: line \d+: the document expands to more than 100,000 values"):
        load_config(tmp_path / "bomb.yml")
    with pytest.raises(RecipeError, match="expands to more than"):
        parse_recipe("merge_method: linear\nmodels: []\nbomb:\n" + "".join(
            "  " + line + "\n" for line in alias_bomb().splitlines()))
    assert time.perf_counter() - began < 5


@pytest.mark.parametrize("text, message", [
    ("genome: &g\n  models: [*g]\n", "an alias refers to the value that holds it"),
    ("genome: !!python/name:os.system\n", "could not determine a constructor.*nothing was run"),
    ("genome:\n  names: !!binary aGVsbG8=\n", "genome.names: bytes values are not read"),
    ("search:\n  seed: 2024-01-01\n", "search.seed: date values are not read"),
])
def test_yaml_that_is_not_plain_data_is_a_one_line_error(tmp_path, text, message):
    (tmp_path / "c.yml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.yml")
    for recipe_text in (text,):
        with pytest.raises(RecipeError):
            parse_recipe(recipe_text)


def test_yaml_merge_keys_are_expanded(tmp_path):
    toy_data(tmp_path)
    config = small_config(tmp_path)
    text = yaml.safe_dump({k: v for k, v in config.items() if k != "search"}, sort_keys=False)
    (tmp_path / "c.yml").write_text(text + "search: {<<: {generations: 3, minibatch: 32}, seed: 4}\n")
    search = load_config(tmp_path / "c.yml").search
    assert (search.generations, search.minibatch, search.seed) == (3, 32, 4)


def test_a_run_failing_before_its_search_leaves_no_run_directory(tmp_path):
    """A host metric that returns NaN on one test row fails while the sources are scored,
    after the run directory was made: it is removed again (the corrected run may use it)."""
    import numpy as np

    from jaxmerge.eval.tasks import TaskData, TaskSpec
    from jaxmerge.testing import toy_world as tw

    rng = np.random.default_rng(0)
    pairs = [tw.japanese_qa(rng) for _ in range(40)]
    data = TaskData(tuple(p for p, _ in pairs), tuple(a for _, a in pairs))
    test = data.rows(32, 36)
    poisoned = next(a for a in test.answers[1:] if a != data.answers[0])

    def metric(prompt, response, reference):
        return float("nan") if reference == poisoned else float(response[:1] == reference[:1])

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="returned nan, not a finite number"):
        evolve(genome={"models": [str(WORLD / "japanese"), str(WORLD / "math")], "base_model": str(WORLD / "base"),
                       "merge_method": "task_arithmetic"},
               tasks=[TaskSpec("ja_qa", metric="host", host_metric=metric, fitness=data.rows(0, 32), test=test,
                               max_new_tokens=2)],
               search={"generations": 1, "minibatch": 8, "validation_size": 8}, baselines=False, out=str(out))
    assert not out.exists() and not lock_path(out).exists()
