"""What a run checks and reports before its search: test rows it could have seen (overlap,
`dedupe: true`), and reference rows kept for a resumed run (baselines.jsonl); a dry run; its
readable output. (Extending, stopping and resuming a run: tests/test_evolve.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evolve import EXPERIMENTS, WORLD, small_config, toy_data, write_config

from jaxmerge.checkpoint import load_tokenizer
from jaxmerge.eval.tasks import Task, TaskData, TaskSpec
from jaxmerge.pipeline import evolve, load_config
from jaxmerge.pipeline.checks import drop_overlap, split_overlap
from jaxmerge.pipeline.runner import BASELINES_FILE, LOOKUP_ROW, ScoreTable
from jaxmerge.testing import toy_world as tw


def _task(fitness, validation, test, pixels=None) -> Task:
    def data(prompts, images=None):
        return TaskData(tuple(prompts), ("0",) * len(prompts), pixel_values=images)
    return Task(TaskSpec("t", metric="exact", fitness=data(fitness)), data(fitness), data(validation),
                data(test, pixels))


def test_overlap_counts_prompts_in_either_split_and_dedupe_drops_them():
    task = _task(["a", "b", "c"], ["d"], ["a", "d", "x", "b", "y"])
    assert split_overlap(task) == {"test": 5, "in_fitness": 2, "in_validation": 1, "in_either": 3}
    kept = drop_overlap(task)
    assert kept.test.prompts == ("x", "y") and kept.fitness is task.fitness
    assert drop_overlap(_task(["a"], ["b"], ["c"])).test.prompts == ("c",)
    with pytest.raises(ValueError, match="task t: every one of its 2 test rows"):
        drop_overlap(_task(["a"], ["b"], ["a", "b"]))


def test_overlap_of_image_rows_needs_the_same_image():
    fitness = TaskData(("q",), ("0",), pixel_values=np.zeros((1, 3, 2, 2), np.float32))
    images = np.stack([np.zeros((3, 2, 2)), np.ones((3, 2, 2))]).astype(np.float32)  # the same image, another
    test = TaskData(("q", "q"), ("0", "0"), pixel_values=images)
    task = Task(TaskSpec("t", metric="exact", fitness=fitness), fitness, None, test)
    assert split_overlap(task)["in_either"] == 1


@pytest.fixture(scope="module")
def deduped_run(tmp_path_factory):
    """A one-generation run on the toy's QA task, whose test questions mostly repeat its
    fitness ones, with `dedupe: true`."""
    root = tmp_path_factory.mktemp("dedupe")
    toy_data(root, test_rows=40)
    config = small_config(root, dedupe=True, out=str(root / "run"))
    config["tasks"] = [config["tasks"][1]]
    config["search"]["generations"] = 1
    return root, evolve(load_config(write_config(root, config)))


def test_a_run_reports_the_overlap_and_dedupe_drops_it(deduped_run):
    root, result = deduped_run
    questions = {split: [json.loads(line)["question"] for line in
                         (root / "data" / f"ja_qa_{split}.jsonl").read_text().splitlines()]
                 for split in ("fitness", "test")}
    fitness, validation = set(questions["fitness"][:-32]), set(questions["fitness"][-32:])  # validation_size 32
    test = questions["test"]
    expected = {"test": 40, "in_fitness": sum(q in fitness for q in test),
                "in_validation": sum(q in validation for q in test),
                "in_either": sum(q in fitness or q in validation for q in test), "dropped": True}
    assert 0 < expected["in_either"] < 40
    assert result.results["checks"]["overlap"] == {"ja_qa": expected}
    assert result.results["checks"]["scores"] == []  # the Japanese source answers its QA: nothing to warn of
    assert result.results["splits"]["ja_qa"]["test"] == 40 - expected["in_either"]
    lookup = [r["model"] for r in result.rows if r["kind"] == "trivial"]
    assert lookup == [f"{LOOKUP_ROW} (a lookup: 0 of {40 - expected['in_either']} test questions in the fitness set)"]
    # References the 4 new tokens cannot reach are counted (over every split, the test split deduped).
    answers = [json.loads(line)["answer"] for split in ("fitness", "test")
               for line in (root / "data" / f"ja_qa_{split}.jsonl").read_text().splitlines()]
    kept = answers[:384] + [a for a, q in zip(answers[384:], test, strict=True) if q not in fitness | validation]
    lengths = [len(load_tokenizer(WORLD / "base")(a, add_special_tokens=False)["input_ids"]) for a in kept]
    assert result.results["checks"]["long_references"]["ja_qa"] == {
        "rows": len(kept), "longer": sum(n > 4 for n in lengths), "longest": max(lengths), "max_new_tokens": 4}


def test_reference_rows_are_kept_and_read_back_instead_of_scored(deduped_run):
    root, result = deduped_run
    saved = root / "run" / BASELINES_FILE
    kept = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["model"] for r in kept] == ["japanese", "math", "base"]

    def must_not_build():
        raise AssertionError("a saved row was scored again")

    table = ScoreTable(load_tokenizer(WORLD / "base"), [], saved=saved)
    table.add_reference("math", "source", must_not_build)
    assert table.rows == [kept[1]] and kept[1] == next(r for r in result.rows if r["model"] == "math")


def test_lookup_row_name_is_the_metric_registrys():
    """The runner relabels the fitness-answer lookup by its name: the registry's."""
    data = TaskData(("q",), ("1",))
    task = Task(TaskSpec("t", metric="exact", fitness=data), data, None, data)
    from jaxmerge.eval.tasks import trivial_rows

    assert LOOKUP_ROW in [row["model"] for row in trivial_rows(task, load_tokenizer(WORLD / "base"))]
    assert EXPERIMENTS.is_dir() and tw.MODEL.num_layers > 0


def test_dry_run_prints_what_the_run_would_do_and_writes_nothing(tmp_path, capsys):
    from jaxmerge.cli import main

    toy_data(tmp_path, test_rows=40)
    config = write_config(tmp_path, small_config(tmp_path, out=str(tmp_path / "run")))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["evolve", str(config), "--dry-run", "--show-rows", "1"]) == 0
    out = capsys.readouterr().out
    first = json.loads((tmp_path / "data" / "ja_math_fitness.jsonl").read_text().splitlines()[0])
    assert "prompt 0 (" in out and repr(first["question"]) in out and "prompt 1 (" not in out
    assert "rows: fitness 352, validation 32, test 40" in out
    assert "genome: task_arithmetic, 6 numbers" in out and "memory per device" in out
    assert "test prompts also in its fitness split" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory, nothing else
    # Bad input fails as the run would, before anything is loaded.
    broken = write_config(tmp_path, small_config(tmp_path, out=str(tmp_path / "run"), tasks=[
        {"name": "t", "metric": "exact", "fitness": "data/missing.jsonl"}]), "broken.yml")
    assert main(["evolve", str(broken), "--dry-run"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_readable_output_genome_table_named_objectives_and_no_empty_columns():
    from jaxmerge.pipeline.results import markdown_table, scored_columns
    from jaxmerge.search.evolution import progress_line
    from jaxmerge.search.genome import GenomeSpace

    space = GenomeSpace("dare_ties", num_sources=2, num_layers=6, layer_groups=3)
    table = space.table(np.linspace(0, 1, space.num_dims), ["ja", "math"]).splitlines()
    assert table[0] == "| source | parameter | layers 0-1 | layers 2-3 | layers 4-5 | other |"
    assert table[2] == "| ja | weight | 0 | 0.0667 | 0.133 | 0.2 |" and len(table) == 2 + 2 * 2
    slerp = GenomeSpace("slerp", num_sources=1, num_layers=2, evolve=("t",))
    assert slerp.table(np.full(slerp.num_dims, 0.3)).splitlines()[2] == "| (all sources) | t | 0.3 |"
    entry = {"generation": 2, "best_fitness": [0.5, 0.25], "mean_fitness": [0.4, 0.125], "front_size": 3}
    line = progress_line(entry, 10, None, 1.0, 7.0, ("ja_math", "en_math"))
    assert line.startswith("generation 3/10: fitness best [ja_math 0.5, en_math 0.25] "
                           "mean [ja_math 0.4, en_math 0.125]; front 3")
    rows = [{"model": "a", "kind": "source", "scores": {"t": 1.0, "u": None, "v": float("nan")}},
            {"model": "b", "kind": "trivial", "scores": {"t": 2.0, "w": 3.0}}]
    assert scored_columns(rows) == ["t", "w"]
    assert markdown_table(rows, scored_columns(rows)).splitlines()[2] == "| a | source | 1.0 | — |"
