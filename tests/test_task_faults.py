"""Faults in a task's data or host metric: refused before any model loads, or when a row is
scored, as one-line ValueErrors naming the task, the file and line (or split and row) and
the value at fault (issue #24: 6, 13, 14, 15). No model is loaded here."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from jaxmerge.eval.data import DataSource, load_image
from jaxmerge.eval.tasks import FitnessBatches, TaskData, TaskSpec, prepare_task, response_scores
from jaxmerge.eval.token_metrics import TokenTable
from jaxmerge.testing import toy_world as tw

ROWS = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tw.world_dir(0) / "base")


def write_jsonl(path: Path, rows: list[dict]) -> DataSource:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return DataSource(str(path))


def host_task(tmp_path: Path, metric, **fields) -> TaskSpec:
    return TaskSpec("sums", metric="host", host_metric=metric, fitness=write_jsonl(tmp_path / "sums.jsonl", ROWS),
                    **fields)


# ----------------------------------------------------------------------------- host metrics, before models load


@pytest.mark.parametrize("value, shown", [(math.nan, "nan"), (-math.inf, "-inf"), ("1.0", "'1.0'"),
                                          (None, "None"), ([1.0], r"\[1\.0\]")])
def test_a_host_metric_returning_a_non_number_is_refused_by_prepare_task(tmp_path, tokenizer, value, shown):
    """Called once on the first fitness row before any model loads: a constant NaN would
    otherwise make every candidate's fitness NaN and the search return its initial genome."""
    spec = host_task(tmp_path, lambda prompt, response, reference: value)
    with pytest.raises(ValueError, match=rf"^task sums: host metric .*sums\.jsonl:1 .*returned {shown}, not a "
                                         r"finite number"):
        prepare_task(spec, tokenizer, validation_size=2)


@pytest.mark.parametrize("value", [True, 1, np.float32(0.5), np.float64(1.0), np.int64(0), np.array(0.25)])
def test_host_metric_numbers_are_accepted(tmp_path, tokenizer, value):
    task = prepare_task(host_task(tmp_path, lambda prompt, response, reference: value), tokenizer, validation_size=2)
    assert task.host is not None and len(task.fitness) == 6


def test_a_host_metric_that_raises_or_has_the_wrong_signature_is_refused(tmp_path, tokenizer):
    def fails_on_empty(prompt, response, reference):
        return float(response.split()[0] == reference)

    with pytest.raises(ValueError, match=r"^task sums: host metric .*fails_on_empty.* on .*sums\.jsonl:1 .*"
                                         r"IndexError: list index out of range"):
        prepare_task(host_task(tmp_path, fails_on_empty), tokenizer, validation_size=2)

    def two(response, reference):
        return 1.0

    with pytest.raises(ValueError, match=r"^task sums: host metric .*two.* takes \(prompt, response, reference\); "
                                         r"its signature is \(response, reference\)"):
        prepare_task(host_task(tmp_path, two), tokenizer, validation_size=2)


def test_host_metric_references_that_do_not_resolve(tmp_path, tokenizer):
    (tmp_path / "broken.py").write_text("import nothing_of_the_sort_xyz\n")
    (tmp_path / "syntax.py").write_text("def score(:\n")
    (tmp_path / "fine.py").write_text("LIMIT = 3\n\ndef score(prompt, response, reference):\n    return 1.0\n")
    cases = [("missing.py:score", r"missing\.py not found"),
             ("nothing_of_the_sort_xyz:score", r"cannot import nothing_of_the_sort_xyz \(ModuleNotFoundError"),
             ("broken.py:score", r"importing .*broken\.py raised ModuleNotFoundError: No module named "
                                 r"'nothing_of_the_sort_xyz'"),
             ("syntax.py:score", r"importing .*syntax\.py raised SyntaxError"),
             ("fine.py:nope", r"fine\.py has no function 'nope'"),
             ("fine.py:LIMIT", r"fine\.py has no function 'LIMIT'"),
             ("fine.py", r"expected a function, 'module:function' or 'file\.py:function'")]
    for reference, message in cases:
        spec = host_task(tmp_path, reference)
        prefix = rf"^task sums: host_metric {re.escape(repr(reference))}: (.*[ /])?"
        with pytest.raises(ValueError, match=prefix + message):
            prepare_task(spec, tokenizer, validation_size=2, base_dir=tmp_path)
    task = prepare_task(host_task(tmp_path, "fine.py:score"), tokenizer, validation_size=2, base_dir=tmp_path)
    assert task.host("p", "r", "r") == 1.0


# ----------------------------------------------------------------------------- host metrics, when rows are scored


def nan_on(answer: str):
    """A host metric: 1 for an exact response, NaN on the row whose reference is `answer`."""
    def metric(prompt, response, reference):
        return math.nan if reference == answer else float(response == reference)
    return metric


def test_a_host_metric_returning_nan_on_one_test_row_is_refused(tmp_path, tokenizer):
    """The sources are scored on the test sets before the search: a NaN row fails there."""
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:4])
    spec = TaskSpec("sums", metric="host", host_metric=nan_on("3"), test=test)
    task = prepare_task(spec, tokenizer)
    responses = list(task.test.answers)
    with pytest.raises(ValueError, match=r"^task sums: host metric .* on .*test\.jsonl:3 \(test split\): "
                                         r"returned nan, not a finite number"):
        response_scores(task, task.test, responses, tokenizer)

    def raises(prompt, response, reference):
        if response == "oops":
            raise KeyError("x")
        return 1.0

    task = prepare_task(TaskSpec("sums", metric="host", host_metric=raises, test=test), tokenizer)
    with pytest.raises(ValueError, match=r"^task sums: host metric .* on .*test\.jsonl:2 \(test split\): raised "
                                         r"KeyError: 'x'"):
        response_scores(task, task.test, ["1", "oops", "3", "4"], tokenizer)
    # Data built in Python has no file: the split and row are named.
    data = TaskData(("a", "b"), ("1", "2"))
    task = prepare_task(TaskSpec("sums", metric="host", host_metric=nan_on("2"), test=data), tokenizer)
    with pytest.raises(ValueError, match=r"^task sums: host metric .* on test row 1: returned nan"):
        response_scores(task, task.test, ["1", "2"], tokenizer)


def test_a_host_metric_returning_nan_in_the_search_is_refused(tmp_path, tokenizer):
    spec = host_task(tmp_path, nan_on("6"), minibatch=2)
    task = prepare_task(spec, tokenizer, validation_size=2)
    fitness = FitnessBatches([task], tokenizer, TokenTable.from_tokenizer(tokenizer), minibatch=2)

    def tokens(texts):  # [P=1, B, N]: each row's response as token ids
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return np.array([[row + [tokenizer.eos_token_id] * (4 - len(row)) for row in ids]])

    assert fitness.host_fitness({"sums": tokens(["1", "2"])}, 0).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"^task sums: host metric .* on .*sums\.jsonl:6 \(fitness split\): "
                                         r"returned nan"):
        fitness.host_fitness({"sums": tokens(["5", "6"])}, 2)
    assert fitness.host_fitness({"sums": tokens(["7", "0"])}, None).tolist() == [0.5]  # validation: rows 7, 8


# ----------------------------------------------------------------------------- multiple choice, validation size


@pytest.mark.parametrize("answer, message", [
    (True, r"field 'answer' \(column 'label'\) is True, not a choice's index \(an integer\) or text"),
    (1.5, r"field 'answer' \(column 'label'\) is 1\.5, not a choice's index \(an integer\) or text"),
    (7, r"answer index 7 is out of range for 3 choices"),
    ("maybe", r"answer 'maybe' is neither an index nor one of the choices")])
def test_multiple_choice_answers_are_refused_naming_file_and_line(tmp_path, tokenizer, answer, message):
    rows = [{"question": "a?", "label": 0, "choices": ["x", "y", "z"]},
            {"question": "b?", "label": answer, "choices": ["x", "y", "z"]}]
    spec = TaskSpec("mc", metric="multiple_choice", test=write_jsonl(tmp_path / "mc.jsonl", rows),
                    columns=(("answer", "label"),))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/mc\.jsonl:2: {message}"):
        prepare_task(spec, tokenizer)


def test_an_integral_float_answer_is_an_index(tmp_path, tokenizer):
    rows = [{"question": "a?", "answer": 2.0, "choices": ["x", "y", "z"]}]
    spec = TaskSpec("mc", metric="multiple_choice", test=write_jsonl(tmp_path / "mc.jsonl", rows))
    assert prepare_task(spec, tokenizer).test.labels == (2,)


def test_validation_size_zero_is_refused_naming_the_task(tmp_path, tokenizer):
    spec = TaskSpec("sums", metric="exact", fitness=write_jsonl(tmp_path / "sums.jsonl", ROWS))
    for size in (0, -1):
        with pytest.raises(ValueError, match=rf"^task sums: validation_size is {size}: the validation split is cut "
                                             r"off the fitness split's end, so it needs 1 or more rows"):
            prepare_task(spec, tokenizer, validation_size=size)
    with pytest.raises(ValueError, match=r"^task sums: 8 fitness rows, not more than the validation size 8"):
        prepare_task(spec, tokenizer, validation_size=8)
    given = TaskSpec("sums", metric="exact", fitness=spec.fitness, validation=spec.fitness)
    assert len(prepare_task(given, tokenizer, validation_size=0).validation) == 8  # not cut: 0 is fine


# ----------------------------------------------------------------------------- images


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: PIL reads the size without decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_400_megapixel_image_is_refused_naming_the_file(tmp_path, tokenizer):
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))
    too_large = rf"too large to decode \(.*400000000 pixels.*\); shrink the image, or raise " \
                rf"PIL\.Image\.MAX_IMAGE_PIXELS \({Image.MAX_IMAGE_PIXELS}\)$"
    with pytest.raises(ValueError, match=rf"^t\.jsonl:3 column 'image': .*bomb\.png: {too_large}"):
        load_image("bomb.png", tmp_path, where="t.jsonl:3 column 'image'")
    with pytest.raises(ValueError, match=rf"^t\.parquet: row 0 column 'image': {too_large}"):
        load_image(png_header(20_000, 20_000), tmp_path, where="t.parquet: row 0 column 'image'")
    # Read from a task's data: the error names the data file, its line and column.
    source = write_jsonl(tmp_path / "vqa.jsonl", [{"question": "a", "answer": "b", "picture": "bomb.png"}])
    spec = TaskSpec("vqa", test=source, columns=(("image", "picture"),))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/vqa\.jsonl:1: column 'picture' \(field 'image'\): .*bomb\.png: "
                                         r"too large to decode"):
        prepare_task(spec, tokenizer, processor=object())


def test_images_over_the_limit_but_under_twice_it_are_refused_too(tmp_path, monkeypatch):
    """PIL only warns (DecompressionBombWarning) up to twice its limit, then decodes them."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    (tmp_path / "big.png").write_bytes(png((12, 12)))  # 144 pixels: a warning in PIL, not an error
    with pytest.raises(ValueError, match=r"^image: .*big\.png: 12 x 12 pixels, more than PIL\.Image\.MAX_IMAGE_PIXELS "
                                         r"\(100\); shrink the image, or raise the limit$"):
        load_image("big.png", tmp_path)
    assert load_image(Image.new("RGB", (10, 10)), tmp_path).size == (10, 10)
    with pytest.raises(ValueError, match=r"^image: 12 x 12 pixels, more than PIL\.Image\.MAX_IMAGE_PIXELS \(100\)"):
        load_image(Image.new("RGB", (12, 12)), tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit, as PIL's own
    assert load_image("big.png", tmp_path).size == (12, 12)
