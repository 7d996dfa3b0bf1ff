"""Writes the toy world's task data as JSONL files under experiments/data/toy/ (committed;
this script is how they were made): what the example configs evolve on, with no Python.

    python experiments/make_toy_data.py

The same problems as `python -m jaxmerge.experiments.ja_math` on seed 0 (fitness rows then
its validation rows in one file, test rows apart), plus a multiple-choice version of the
Japanese math problems: the answer and three other counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxmerge.testing import toy_world as tw

OUT = Path(__file__).parent / "data" / "toy"
SEED = 0


def write(name: str, rows: list[dict]) -> None:
    path = OUT / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} rows")


def rows_of(*splits) -> list[dict]:
    return [{"question": q, "answer": a} for split in splits for q, a in zip(split.prompts, split.answers, strict=True)]


def with_choices(rows: list[dict], seed: int) -> list[dict]:
    """Each problem with four counts to choose from ("14こ" and three others), the right one's index."""
    rng = np.random.default_rng(seed)
    out = []
    for row in rows:
        right = int(row["answer"])
        others = rng.choice([n for n in range(19) if n != right], 3, replace=False)
        choices = [right, *map(int, others)]
        rng.shuffle(choices)
        out.append({"question": row["question"], "choices": [f"{n}こ" for n in choices],
                    "answer": choices.index(right)})
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    target, ja_qa, en_math = tw.tasks(SEED, 300, keep_skills=0.5)
    write("ja_math_fitness", rows_of(target.fitness, target.validation))  # the last 128 rows: validation
    write("ja_math_test", rows_of(target.test))
    for task in (ja_qa, en_math):
        write(f"{task.name}_fitness", rows_of(task.fitness, task.validation))
        write(f"{task.name}_test", rows_of(task.test))
    write("ja_math_choices_fitness", with_choices(rows_of(target.fitness, target.validation), SEED + 1))
    write("ja_math_choices_test", with_choices(rows_of(target.test), SEED + 2))
    assert tw.world_dir(SEED).exists()


if __name__ == "__main__":
    main()
