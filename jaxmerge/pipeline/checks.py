"""What a run checks of its tasks before the search, reports in its log and results.json
(`checks`), and what `--dry-run` prints:

- Test rows the search could have seen: a test prompt also in the task's fitness or
  validation split. A score on such rows measures recall, not the merge's skill (a lookup
  of the fitness answers "solves" them); `dedupe: true` drops them from the test split. Rows
  are the same when their rendered prompts are (few-shot examples and chat template
  included) and, for a VLM, their images' pixels are too.
- References longer, in tokens, than the responses a generative task lets a model write
  (`max_new_tokens`, 16 unless set): those rows cannot be answered in full.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from jaxmerge.eval.tasks import Task, TaskData


def _row_keys(data: TaskData | None) -> list[str]:
    """One key per row: its prompt, and the hash of its image's pixels if it has one."""
    if data is None:
        return []
    if data.pixel_values is None:
        return list(data.prompts)
    return [prompt + "\0" + hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
            for prompt, pixels in zip(data.prompts, data.pixel_values, strict=True)]


def split_overlap(task: Task) -> dict[str, int] | None:
    """{"test": test rows, "in_fitness": of them also in the fitness split, "in_validation":
    also in the validation split, "in_either": in one or the other}; None without a test split."""
    if task.test is None:
        return None
    fitness, validation = set(_row_keys(task.fitness)), set(_row_keys(task.validation))
    keys = _row_keys(task.test)
    return {"test": len(keys), "in_fitness": sum(k in fitness for k in keys),
            "in_validation": sum(k in validation for k in keys),
            "in_either": sum(k in fitness or k in validation for k in keys)}


def drop_overlap(task: Task) -> Task:
    """The task with the test rows that are also in its fitness or validation split removed.
    A test split that would be left empty is an error naming the task."""
    if task.test is None:
        return task
    seen = set(_row_keys(task.fitness)) | set(_row_keys(task.validation))
    kept = [i for i, key in enumerate(_row_keys(task.test)) if key not in seen]
    if not kept:
        raise ValueError(f"task {task.name}: every one of its {len(task.test)} test rows is also in its fitness or "
                         "validation split: with dedupe: true no test row is left (give it a test split of its own)")
    return task if len(kept) == len(task.test) else dataclasses.replace(task, test=task.test.take(kept))


def describe_overlap(overlap: dict[str, int]) -> str:
    """"12 of 250 test prompts also in its fitness split, 0 in its validation split"."""
    return (f"{overlap['in_fitness']} of {overlap['test']} test prompts also in its fitness split, "
            f"{overlap['in_validation']} in its validation split")


def long_references(task: Task, tokenizer) -> dict[str, int] | None:
    """For a generative task: {"rows": references in all its splits, "longer": those longer
    in tokens than `max_new_tokens`, "longest": the longest's tokens, "max_new_tokens"}; None
    for a log-likelihood task, which generates nothing."""
    if not task.spec.generative:
        return None
    answers = [a for split in (task.fitness, task.validation, task.test) if split is not None for a in split.answers]
    lengths = [len(ids) for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]
    limit = task.spec.max_new_tokens
    return {"rows": len(lengths), "longer": sum(n > limit for n in lengths), "longest": max(lengths, default=0),
            "max_new_tokens": limit}


def describe_long_references(found: dict[str, int]) -> str:
    return (f"{found['longer']} of {found['rows']} references are longer than max_new_tokens "
            f"({found['max_new_tokens']}) in tokens (the longest {found['longest']}): responses are cut off before "
            f"they can match them; set the task's max_new_tokens")
