"""Prompts: a task's rows rendered to model input text.

A `PromptSpec` renders each row with `template` (Python `str.format` placeholders naming
row fields, e.g. "Q: {question}\\nA:", "{choices[0]}"), and with `chat=True` passes that
text as the user message through the tokenizer's own chat template (optionally after a
system message). Few-shot examples come first: plain, each `template + answer_template`
joined by `separator`, then the query; chat, alternating user/assistant messages before
the final user message.
"""

from __future__ import annotations

import re
import string
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptSpec:
    """template: the query text, `{field}` placeholders filled from the row; None: the row's
    "question" as is. chat: wrap it with the tokenizer's chat template. system: a system
    message (chat), or a first paragraph before everything (plain). few_shot: how many
    examples come first, each rendered `template` then `answer_template`. separator: joins
    the plain prompt's parts."""

    template: str | None = "{question}"
    chat: bool = False
    system: str | None = None
    few_shot: int = 0
    answer_template: str = "{answer}"
    separator: str = "\n\n"

    def __post_init__(self):
        if isinstance(self.few_shot, bool) or not isinstance(self.few_shot, int) or self.few_shot < 0:
            raise ValueError(f"few_shot is {self.few_shot!r}, not a count >= 0")


def template_fields(template: str | None) -> set[str]:
    """The row fields a template reads: "{choices[0]}" and "{x.y}" read choices and x; None
    reads question."""
    if template is None:
        return {"question"}
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}") from None
    fields = set()
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base == "" or base.isdigit():
            raise ValueError(f"template {template!r}: positional placeholder {{{name}}}; name a field, "
                             f"e.g. {{question}}")
        fields.add(base)
        if spec:
            fields |= template_fields(spec)
    return fields


def check_fields(spec: PromptSpec, available: Collection[str], where: str):
    """Checks that the fields the spec's templates read are among `available` (the data's
    fields, e.g. from `data.check_columns`); the answer template only with few-shot examples.
    where: the spec's place in the config, for errors (e.g. "tasks[0].prompt")."""
    parts = [("template", spec.template)] + ([("answer_template", spec.answer_template)] if spec.few_shot else [])
    for name, template in parts:
        try:
            fields = template_fields(template)
        except ValueError as e:
            raise ValueError(f"{where}.{name}: {e}") from None
        missing = sorted(fields - set(available))
        if missing:
            raise ValueError(f"{where}.{name}: field(s) {', '.join(map(repr, missing))} not in the data "
                             f"(its fields: {', '.join(sorted(available))})")


def render(spec: PromptSpec, rows: Sequence[Mapping[str, Any]], tokenizer=None,
           examples: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """Each row's prompt text. examples: the few-shot pool; the first `spec.few_shot` are
    used. tokenizer: needed with chat (a tokenizer or processor with a chat template)."""
    if spec.few_shot > len(examples):
        raise ValueError(f"few_shot is {spec.few_shot}, but {len(examples)} example(s) are given")
    shots = [(_fill(spec.template, example, f"example {i}"),
              _fill(spec.answer_template, example, f"example {i}"))
             for i, example in enumerate(examples[:spec.few_shot])]
    if not spec.chat:
        head = ([spec.system] if spec.system is not None else []) + [query + answer for query, answer in shots]
        return [spec.separator.join(head + [_fill(spec.template, row, f"row {i}")]) for i, row in enumerate(rows)]
    if tokenizer is None:
        raise ValueError("chat prompts need the tokenizer, for its chat template")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; set chat to false and write the whole prompt in template")
    messages = [{"role": "system", "content": spec.system}] if spec.system is not None else []
    for query, answer in shots:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    return [tokenizer.apply_chat_template(messages + [{"role": "user",
                                                       "content": _fill(spec.template, row, f"row {i}")}],
                                          tokenize=False, add_generation_prompt=True)
            for i, row in enumerate(rows)]


def _fill(template: str | None, row: Mapping[str, Any], where: str) -> str:
    for field in sorted(template_fields(template)):
        if row.get(field) is None:
            raise ValueError(f"{where}: field {field!r} is missing or empty (template {template!r}; "
                             f"the row's fields: {', '.join(row)})")
    if template is None:
        return str(row["question"])
    try:
        return template.format_map(row)
    except (LookupError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: template {template!r}: {type(e).__name__}: {e}") from None
