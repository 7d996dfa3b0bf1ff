"""`jaxmerge.evolve` and `jaxmerge evolve CONFIG.yml`: configs, errors, host metrics, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import jaxmerge
from jaxmerge import checkpoint
from jaxmerge.eval.tasks import TaskData, TaskSpec
from jaxmerge.pipeline import ConfigError, EvolveConfig, GenomeConfig, SearchSettings, evolve, load_config
from jaxmerge.pipeline.problem import genome_space
from jaxmerge.testing import toy_world as tw

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
WORLD = tw.world_dir(0)


def toy_data(tmp_path: Path, test_rows: int = 16) -> None:
    """Small copies of the shipped toy task files."""
    (tmp_path / "data").mkdir(exist_ok=True)
    for name in ("ja_math_fitness", "ja_qa_fitness"):
        (tmp_path / "data" / f"{name}.jsonl").write_text((EXPERIMENTS / "data/toy" / f"{name}.jsonl").read_text())
    for name in ("ja_math_test", "ja_qa_test"):
        lines = (EXPERIMENTS / "data/toy" / f"{name}.jsonl").read_text().splitlines()[:test_rows]
        (tmp_path / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def small_config(tmp_path: Path, **changes) -> dict:
    """A config file's contents: the toy's Japanese and math models, two tasks, a short search."""
    config = {
        "genome": {"models": [str(WORLD / "japanese"), str(WORLD / "math")], "base_model": str(WORLD / "base"),
                   "merge_method": "task_arithmetic", "layer_granularity": 3},
        "tasks": [{"name": "ja_math", "metric": "number", "language": "japanese",
                   "fitness": "data/ja_math_fitness.jsonl", "test": "data/ja_math_test.jsonl",
                   "prompt": "{question}", "max_new_tokens": 4},
                  {"name": "ja_qa", "metric": "exact", "fitness": "data/ja_qa_fitness.jsonl",
                   "test": "data/ja_qa_test.jsonl", "max_new_tokens": 4, "weight": 0.5, "minibatch": 16}],
        "search": {"generations": 3, "minibatch": 32, "validation_size": 32, "initial": {"weight": 1.0}},
        "baselines": False,
    }
    for key, value in changes.items():
        config[key] = value
    return config


def write_config(tmp_path: Path, config: dict, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def test_mergekit_evolve_genome_block_is_accepted(tmp_path):
    """A genome section written for mergekit-evolve (models as `- model:` or plain paths,
    filters, normalize, allow_negative_weights) reads as it is."""
    toy_data(tmp_path)
    config = small_config(tmp_path)
    config["genome"] = {"models": [{"model": str(WORLD / "japanese")}, str(WORLD / "math")],
                        "merge_method": "dare_ties", "base_model": str(WORLD / "base"), "layer_granularity": 2,
                        "normalize": False, "allow_negative_weights": True, "filters": ["self_attn", "mlp"],
                        "tokenizer_source": str(WORLD / "base")}
    loaded = load_config(write_config(tmp_path, config))
    assert loaded.genome.models == (str(WORLD / "japanese"), str(WORLD / "math"))
    space = genome_space(loaded, 2, tw.MODEL.num_layers)
    assert space.layer_groups == 3 and space.families == ("self_attn", "mlp") and space.normalize is False
    assert space.keys == ("weight", "density", "weight[self_attn]", "density[self_attn]", "weight[mlp]",
                          "density[mlp]")
    assert space.bound("weight") == (-2.0, 2.0)
    # Each family's tensors take their own block's values.
    genome = np.asarray(space.initial()).copy()
    per = 2 * space.num_groups
    genome[2 * per:3 * per] = 0.25  # weight[self_attn]
    params = space.decode(genome, ["layers.self_attn.q_proj.kernel", "layers.mlp.up_proj.kernel", "norm.weight"])
    np.testing.assert_allclose(params["layers.self_attn.q_proj.kernel"]["weight"], 0.25)
    np.testing.assert_allclose(params["layers.mlp.up_proj.kernel"]["weight"], 1.0)  # search.initial
    np.testing.assert_allclose(params["norm.weight"]["weight"], 1.0)
    np.testing.assert_allclose(params["layers.mlp.up_proj.kernel"]["density"], 0.5)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(colour="red"), r"config.yml:\d+: colour: unknown key"),
    (lambda c: c.update(random_init=True), r"random_init: unknown key \(set search.initial\)"),
    (lambda c: c["search"].update(generatons=3), r"config.yml:\d+: search.generatons: unknown key"),
    (lambda c: c["genome"].update(merge_method="magic"), r"genome.merge_method: unknown merge method 'magic'"),
    (lambda c: c["genome"]["models"].__setitem__(1, "/no/such/model"),
     r"config.yml:\d+: genome.models\[1\]: /no/such/model: not a checkpoint directory"),
    (lambda c: c["tasks"][0].update(fitness="data/missing.jsonl"), r"tasks\[0\].fitness: .*missing.jsonl"),
    (lambda c: c["tasks"][0].update(prompt="{question} {context}"),
     r"tasks\[0\].prompt: the template's field\(s\) context are not in"),
    (lambda c: c["tasks"][1].update(columns={"answer": "reply"}), r"tasks\[1\].fitness: .*reply"),
    (lambda c: c["tasks"][0].update(metric="bleu"), r"tasks\[0\].metric: unknown metric 'bleu'"),
    (lambda c: c["tasks"].append({"name": "gsm8k", "weight": 1.0, "prompt": "{question}"}),
     r"tasks\[2\].prompt: unknown key for an lm-eval task \(a task with local data gives fitness: and/or test:"),
    (lambda c: c["tasks"].append({"name": "no_such_task", "include_path": "."}),
     r"tasks\[2\]: lm-eval task 'no_such_task' is not one lm-eval knows"),
    (lambda c: c["tasks"][0].update(weight=float("nan")), r"tasks\[0\].weight: expected a finite number"),
    (lambda c: c["search"].update(strategy="pso"), r"search.strategy: unknown strategy 'pso'"),
    (lambda c: c["genome"].update(layer_granularity=4), r"genome.layer_granularity: 6 layers are not a multiple"),
    (lambda c: c.update(search={"strategy": "nsga2"}, dfs={"mode": "both"}),
     r"dfs.mode: layer-path searches are single-objective"),
    (lambda c: (c["search"].update(strategy="nsga2"), c["tasks"][1].update(weight=0)),
     r"search.strategy: nsga2 \(a Pareto search\) needs two or more optimised tasks"),
    (lambda c: c["search"].update(guards={"en_math": 0.9}),
     r"search.guards.en_math: not an optimised task other than the target \(those: ja_qa\)"),
    (lambda c: c["search"].update(guards={"ja_math": 0.9}), r"search.guards.ja_math: not an optimised task"),
    (lambda c: c["search"].update(guards={"ja_qa": -1}), r"search.guards.ja_qa: a fraction"),
    (lambda c: c["search"].update(strategy="nsga2", guards={"ja_qa": 0.9}), r"search.guards: guards constrain"),
    (lambda c: c["genome"].update(gates=True, evolve=["density"], merge_method="dare_ties", fixed={"weight": 1.0}),
     r"genome.gates: gates switch sources off through their weights"),
    (lambda c: c["genome"].update(source_cost=0.01), r"genome.source_cost: prices the sources a gate lets in"),
    (lambda c: c["genome"].update(gates=True, max_sources=3), r"genome.max_sources: caps the sources .* \[1, 2\]"),
    (lambda c: c["search"].update(sources_on_host=True), r"search.sources_on_host: .* genome.max_sources"),
])
def test_config_errors_name_the_key_and_load_nothing(tmp_path, change, message):
    toy_data(tmp_path)
    config = small_config(tmp_path)
    change(config)
    out = tmp_path / "run"
    config["out"] = str(out)
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, config))
    assert not out.exists()


def test_cli_reports_config_errors_and_writes_nothing(tmp_path):
    toy_data(tmp_path)
    config = small_config(tmp_path)
    config["tasks"][0]["prompt"] = "{query}"
    path = write_config(tmp_path, config)
    result = subprocess.run([sys.executable, "-m", "jaxmerge.cli", "evolve", str(path), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "tasks[0].prompt: the template's field(s) query" in result.stderr
    assert not (tmp_path / "r").exists()


def test_shipped_example_configs_are_valid():
    for path in sorted(EXPERIMENTS.glob("*.yml")):
        config = load_config(path)
        assert config.tasks and all(Path(m).is_dir() for m in config.genome.models), path


def exact_digit(prompt: str, response: str, reference: str) -> float:
    """A host metric: the response's first character is the reference's."""
    return float(response[:1] == reference[:1])


def test_evolve_from_python_with_a_host_metric(tmp_path):
    """Keyword arguments build the config; a host metric scores decoded responses in the
    search and on the test set; the result saves its best checkpoint."""
    rng = np.random.default_rng(0)
    pairs = [tw.japanese_qa(rng) for _ in range(72)]
    data = TaskData(tuple(p for p, _ in pairs), tuple(a for _, a in pairs))
    calls = []

    def first_character(prompt, response, reference):
        calls.append(response)
        return exact_digit(prompt, response, reference)

    result = evolve(genome={"models": [str(WORLD / "japanese"), str(WORLD / "math")], "base_model": str(WORLD / "base"),
                            "merge_method": "task_arithmetic"},
                    tasks=[TaskSpec("ja_qa", metric="host", host_metric=first_character, fitness=data.rows(0, 56),
                                    test=data.rows(56, 72), max_new_tokens=3)],
                    search={"generations": 2, "minibatch": 16, "validation_size": 8}, baselines=False,
                    out=str(tmp_path / "run"))
    assert calls  # the search and the test set both called it
    evolved = [r for r in result.rows if r["kind"] == "evolved"]
    assert len(evolved) == 1 and 0 <= evolved[0]["scores"]["ja_qa"] <= 100
    assert result.best == "ps" and set(result.genomes) == {"ps"}
    saved = result.save(tmp_path / "best")
    assert (saved / "config.json").exists() and jaxmerge.load(saved).config.num_layers == tw.MODEL.num_layers
    assert saved.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    with pytest.raises(jaxmerge.CheckpointError, match="not empty"):
        result.save(tmp_path / "best")


def test_host_metric_from_a_file_in_the_config(tmp_path):
    toy_data(tmp_path, test_rows=8)
    (tmp_path / "my_metric.py").write_text("def score(prompt, response, reference):\n"
                                           "    return float(response.strip() == reference.strip())\n")
    config = small_config(tmp_path)
    config["tasks"] = [{"name": "ja_qa", "metric": "host", "host_metric": "my_metric.py:score",
                        "fitness": "data/ja_qa_fitness.jsonl", "test": "data/ja_qa_test.jsonl", "max_new_tokens": 4}]
    config["search"]["generations"] = 1
    config["out"] = str(tmp_path / "run")
    path = write_config(tmp_path, config)
    results = evolve(load_config(path)).results
    assert results["fitness"] == "1 x ja_qa (host metric on decoded responses)"
    japanese = results["rows"][0]
    assert japanese["model"] == "japanese" and japanese["scores"]["ja_qa"] == 100.0  # the source knows its QA
    # run.json records the contents of every input: data, host metric file, checkpoints.
    inputs = json.loads((tmp_path / "run" / "run.json").read_text())["inputs"]
    assert inputs[str(tmp_path / "my_metric.py")].startswith("sha256:")
    assert inputs[str(tmp_path / "data" / "ja_qa_fitness.jsonl")].startswith("sha256:")
    assert any(k.endswith("math/model.safetensors") for k in inputs)
    with pytest.raises(FileExistsError, match="finished run"):  # never rerun, refused before loading
        evolve(load_config(path))


def run_cli(args, **kwargs):
    env = {**os.environ, "JAXMERGE_CACHE_DIR": "off"}
    return subprocess.Popen([sys.executable, "-m", "jaxmerge.cli", "evolve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for_lines(log: Path, count: int) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < count):
        time.sleep(0.2)


def test_a_run_extended_stopped_killed_and_resumed_equals_a_run_started_with_more(tmp_path):
    """From the command line: `--generations N` on a finished run continues its search;
    SIGTERM stops it at a generation, saying how to resume; kill -9 stops it anywhere; the
    same command resumes (reading the reference rows back) and the result equals a run
    started with N generations. Another configuration is refused."""
    toy_data(tmp_path, test_rows=8)
    config = small_config(tmp_path)
    config["tasks"] = [config["tasks"][0]]
    path = write_config(tmp_path, config)
    whole = run_cli([str(path), "--out", str(tmp_path / "whole"), "--generations", "7"])
    run = [str(path), "--out", str(tmp_path / "run")]
    first = run_cli([*run, "--generations", "2"])
    assert first.wait(timeout=900) == 0, first.stdout.read()
    log = tmp_path / "run" / "search" / "generations.jsonl"
    extended = run_cli([*run, "--generations", "7"])
    _wait_for_lines(log, 3)
    extended.send_signal(signal.SIGTERM)
    output = extended.communicate(timeout=300)[0]
    assert extended.returncode == 143 and "terminated" in output, output
    assert "extending the finished run's search from 2 to 7 generations" in output
    assert "rerun the same command to resume" in output and len(log.read_text().splitlines()) < 7
    killed = run_cli([*run, "--generations", "7"])
    _wait_for_lines(log, 5)
    killed.send_signal(signal.SIGKILL)
    output = killed.communicate(timeout=300)[0]
    assert "resuming at generation" in output and len(log.read_text().splitlines()) < 7, output
    resumed = run_cli([*run, "--generations", "7"])
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output
    assert "resuming at generation" in output and "(scored earlier in this run)" in output
    assert whole.wait(timeout=900) == 0
    ours, theirs = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("run", "whole"))
    assert ours["search"]["genome"] == theirs["search"]["genome"] and ours["search"]["generations"] == 7
    assert ours["rows"] == theirs["rows"]
    # A different config into the same (finished) directory is refused.
    changed = write_config(tmp_path, {**config, "search": {**config["search"], "seed": 1}}, "changed.yml")
    refused = run_cli([str(changed), "--out", str(tmp_path / "run"), "--generations", "7"])
    assert refused.wait(timeout=300) == 2


def test_multiple_choice_fitness_compiles_once_per_shape(tmp_path):
    """A multiple-choice task: minibatches of one shape (one compilation for the search),
    scored against the label; the test split reports accuracy."""
    toy_data(tmp_path)
    lines = (EXPERIMENTS / "data/toy/ja_math_choices_fitness.jsonl").read_text().splitlines()
    (tmp_path / "data" / "choices.jsonl").write_text("\n".join(lines[:96]) + "\n")
    (tmp_path / "data" / "choices_test.jsonl").write_text("\n".join(lines[96:112]) + "\n")
    config = load_config(write_config(tmp_path, small_config(tmp_path, tasks=[
        {"name": "choice", "metric": "multiple_choice", "fitness": "data/choices.jsonl",
         "test": "data/choices_test.jsonl", "delimiter": ""}], out=str(tmp_path / "run"))))
    assert isinstance(config, EvolveConfig) and config.genome == GenomeConfig(**{
        **config.genome.__dict__})
    assert config.search == SearchSettings(generations=3, minibatch=32, validation_size=32, initial=(("weight", 1.0),))
    result = evolve(config)
    batches = {tuple(np.shape(v) for v in b["choice"].values()) for b in _batches(config)}
    assert len(batches) == 1
    assert 0 <= result.rows[-1]["scores"]["choice"] <= 100


def _batches(config):
    from transformers import AutoTokenizer

    from jaxmerge.eval.tasks import FitnessBatches, prepare_task
    from jaxmerge.eval.token_metrics import TokenTable

    tokenizer = AutoTokenizer.from_pretrained(config.genome.base_model)
    tasks = [prepare_task(t, tokenizer, None, config.search.validation_size) for t in config.tasks]
    return FitnessBatches(tasks, tokenizer, TokenTable.from_tokenizer(tokenizer, ()), config.search.minibatch).batches


@pytest.mark.parametrize("bad_line, message", [
    ("123", r"ja_math_fitness.jsonl:5"),
    ('{"question": "q", "answer": "three"}', r"ja_math_fitness.jsonl:5: column 'answer': answer 'three'"),
])
def test_bad_data_fails_before_loading_and_leaves_no_run_directory(tmp_path, monkeypatch, bad_line, message):
    toy_data(tmp_path)
    path = tmp_path / "data" / "ja_math_fitness.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4] + [bad_line] + lines[4:]) + "\n")
    loads = []
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: loads.append(a))  # where the pipeline looks it up
    config = small_config(tmp_path, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=message):
        evolve(load_config(write_config(tmp_path, config)))
    assert not loads and not (tmp_path / "run").exists()


def test_a_failed_load_leaves_no_run_directory(tmp_path):
    toy_data(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (WORLD / "math" / name).exists():
            (broken / name).write_text((WORLD / "math" / name).read_text())
    (broken / "model.safetensors").write_bytes((WORLD / "math" / "model.safetensors").read_bytes()[:1000])
    config = small_config(tmp_path, out=str(tmp_path / "run"))
    config["genome"]["models"][1] = str(broken)
    with pytest.raises(jaxmerge.CheckpointError, match="model.safetensors"):
        evolve(load_config(write_config(tmp_path, config)))
    assert not (tmp_path / "run").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def brute_force_non_dominated(points) -> bool:
    """No point is at least as good on every objective and better on one than another."""
    return not any(all(a >= b) and any(a > b) for a in points for b in points)


def test_pareto_search_over_a_gated_pool_reports_and_exports_its_front(tmp_path):
    """`search.strategy: nsga2`: every task an objective; the front, non-dominated on
    validation, is scored on the test sets (a row per member), written as recipes and plotted.
    `genome.gates` (here over a pool with a copy of the base standing in for a useless third
    model): the result says which sources are in, the recipes name only those. The pool is
    kept in host memory with at most two sources in a merge (`genome.max_sources`,
    `search.sources_on_host`), and each source costs fitness (`genome.source_cost`)."""
    import shutil

    toy_data(tmp_path, test_rows=8)
    shutil.copytree(WORLD / "base", tmp_path / "idle")
    config = small_config(tmp_path)
    config["genome"]["models"].append(str(tmp_path / "idle"))
    config["genome"].update(gates=True, names=["japanese", "math", "idle"], max_sources=2, source_cost=0.01)
    config["search"].update(strategy="nsga2", population=8, generations=2, sources_on_host=True)
    config["out"] = str(tmp_path / "run")
    result = evolve(load_config(write_config(tmp_path, config)))
    front = result.results["front"]
    assert len(front) >= 1 and result.results["fitness"].startswith("objectives: ja_math")
    validation = np.array([[m["validation"]["ja_math"], m["validation"]["ja_qa"]] for m in front])
    assert brute_force_non_dominated(validation)
    assert list(validation[:, 0]) == sorted(validation[:, 0], reverse=True)  # best target first
    rows = [r for r in result.rows if r["kind"] == "front"]
    assert len(rows) == len(front) and all(set(r["scores"]) == {"ja_math", "ja_qa"} for r in rows)
    for member in front:
        recipe_text = (result.run_dir / member["recipe"]).read_text()
        recipe = yaml.safe_load(recipe_text)
        assert recipe["merge_method"] == "task_arithmetic" and len(recipe["slices"]) == tw.MODEL.num_layers
        present = [row[0] for row in member["genome"]["present"]]
        assert len(present) == 3 and set(present) <= {0.0, 1.0} and sum(present) <= 2
        if any(present):  # (with every gate shut the recipe keeps them all, at weight 0)
            assert [f"model: {m}\n" in recipe_text for m in config["genome"]["models"]] == [bool(p) for p in present]
    assert (result.run_dir / "front.png").stat().st_size > 0 and (result.run_dir / "fitness.png").exists()
    log = [json.loads(line) for line in (result.run_dir / "search" / "generations.jsonl").read_text().splitlines()]
    assert len(log) == 2 and len(log[0]["best_fitness"]) == 2
    # The saved checkpoint (merged/, the "evolved" row) is the front member best on the target.
    evolved = next(r for r in result.rows if r["kind"] == "evolved")
    assert evolved["scores"] == rows[0]["scores"] and result.results["search"]["gates"]
    pool = result.results["search"]["pool"]
    assert pool["sources"] == 3 and pool["on_device"] == 2 and 0 < pool["sources_copied"]
    assert result.results["search"]["max_sources"] == 2 and result.results["search"]["source_cost"] == 0.01


def test_guards_and_a_reduced_fitness_set(tmp_path):
    """`search.guards`: each guard's least score is a fraction of the best source's on its
    validation split (the Japanese model knows its QA: 1.0), and a shortfall costs
    guard_penalty points of target. `search.fitness_items`: each task's K rows chosen once
    (IRT fitted on the sources' and random candidates' per-row scores), scored every generation.
    Here from a pool in host memory, one source on the device at a time (the calibration
    candidates too)."""
    from transformers import AutoTokenizer

    from jaxmerge.eval.tasks import FitnessBatches, prepare_task
    from jaxmerge.eval.token_metrics import TokenTable

    toy_data(tmp_path, test_rows=8)
    config = small_config(tmp_path)
    config["search"].update(guards={"ja_qa": 0.9}, generations=2, fitness_items=6, calibration=3, sources_on_host=True)
    config["genome"].update(gates=True, max_sources=1)
    config["out"] = str(tmp_path / "run")
    loaded = load_config(write_config(tmp_path, config))
    results = evolve(loaded).results
    guard = results["search"]["guards"]["ja_qa"]
    assert guard["source"] == "japanese" and guard["source_validation"] == 1.0 and guard["floor"] == 0.9
    assert results["fitness"] == ("ja_math (last number, in japanese) less 10 x each shortfall of ja_qa below "
                                  "0.900")
    chosen = results["search"]["fitness_items"]["tasks"]
    assert {n: (c["rows"], c["calibration_models"]) for n, c in chosen.items()} == {"ja_math": (6, 5),
                                                                                    "ja_qa": (6, 5)}
    # of every row the minibatches cover: as many batches of 32 ja_math and 16 ja_qa rows
    assert chosen["ja_math"]["of"] == 2 * chosen["ja_qa"]["of"] > 100
    assert results["search"]["pool"]["on_device"] == 1 and results["search"]["genome"]["present"] in ([[1.0], [0.0]],
                                                                                                    [[0.0], [1.0]])
    tokenizer = AutoTokenizer.from_pretrained(WORLD / "base")
    tasks = [prepare_task(spec, tokenizer, None, 32, tmp_path) for spec in loaded.tasks]
    fitness = FitnessBatches(tasks, tokenizer, TokenTable.from_tokenizer(tokenizer), 32, floors=(("ja_qa", 0.9),))
    combined = fitness.combine({"ja_math": np.array([0.5, 0.5, 0.7]), "ja_qa": np.array([0.95, 0.8, 0.9])})
    np.testing.assert_allclose(combined, [0.5, 0.5 - 10 * 0.1, 0.7])


def test_task_data_take_keeps_rows_together():
    data = TaskData(("a", "b", "c"), ("1", "2", "3"), labels=(0, 1, 2), pixel_values=np.arange(3)[:, None])
    part = data.take([2, 0])
    assert part.prompts == ("c", "a") and part.answers == ("3", "1") and part.labels == (2, 0)
    np.testing.assert_array_equal(part.pixel_values[:, 0], [2, 0])


def test_a_run_holds_its_sources_once(tmp_path):
    """`load_sources`: the sources stacked on the device as `stack_sources` stacks them, each
    source's own arrays let go (its model hollow, rebuilt from its row bit for bit), so that
    the merge problem's arrays are the base and the stack alone, not the sources again."""
    import gc

    import jax
    from flax import nnx

    from jaxmerge.merge import flat_params, stack_sources
    from jaxmerge.pipeline.problem import MergeProblem
    from jaxmerge.pipeline.sources import load_sources

    def live_bytes() -> int:
        gc.collect()
        return sum(x.nbytes for x in jax.live_arrays())

    models = (str(WORLD / "japanese"), str(WORLD / "math"))
    config = EvolveConfig(GenomeConfig(models, str(WORLD / "base"), merge_method="task_arithmetic"), tasks=())
    before = live_bytes()
    problem = MergeProblem.from_config(config, load_sources(config, jaxmerge.load, None))
    held = live_bytes() - before
    loaded = [flat_params(jaxmerge.load(m)) for m in models]
    expected = stack_sources(problem.base, loaded)
    one_model = sum(x.nbytes for x in problem.base.values())
    assert sum(x.nbytes for x in problem.stacked.values()) == 2 * one_model
    assert held < 3.5 * one_model, f"{held / one_model:.2f} models' bytes held for a base and two sources"
    assert problem.stacked is problem.sources.stack and sorted(problem.sources.hollow) == [0, 1]
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(problem.stacked[path]), np.asarray(value), err_msg=path)
    for i, own in enumerate(loaded):
        leaves = jax.tree.leaves(nnx.state(problem.sources.models[i], nnx.Param))
        assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
        rebuilt = flat_params(problem.sources.model(i))
        for path, value in own.items():
            assert rebuilt[path].dtype == value.dtype
            np.testing.assert_array_equal(np.asarray(rebuilt[path]), np.asarray(value), err_msg=f"{i} {path}")
