"""Task data (every format reads back the same rows; errors name file, line and column) and prompts."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxmerge.eval.data import DataSource, check_columns, choice_label, data_dir, load_image, read_located, read_rows
from jaxmerge.eval.prompts import PromptSpec, check_fields, render, template_fields

TABLE = [
    {"question": "2+2?", "answer": "4", "choices": ["3", "4", "5"]},
    {"question": "Capital of France?", "answer": "Paris", "choices": ["Paris", "Rome"]},
    {"question": "Say \"hi\", then a comma,", "answer": "hi,", "choices": ["hi,", "ho"]},
]
OTHER = [{"question": "1+1?", "answer": "2", "choices": ["2", "3"]}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


def write_table(tmp_path: Path, kind: str, rows: list[dict] = TABLE) -> DataSource:
    if kind == "jsonl":
        return DataSource(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    if kind == "json":
        return DataSource(str(write_jsonl(tmp_path / "t.json", rows)))
    if kind == "csv":
        return DataSource(str(write_csv(tmp_path / "t.csv", rows)))
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
        return DataSource(str(tmp_path / "t.parquet"))
    if kind == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        return DataSource(str(tmp_path / "ds"))
    if kind == "datasetdict_train":
        datasets.DatasetDict({"test": datasets.Dataset.from_list(OTHER),
                              "train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
        return DataSource(str(tmp_path / "dd"))
    if kind == "datasetdict_split":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(OTHER),
                              "validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
        return DataSource(str(tmp_path / "dd"), split="validation")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "dataset", "datasetdict_train",
                                  "datasetdict_split"])
def test_every_format_reads_back_the_table(tmp_path, kind):
    source = write_table(tmp_path, kind)
    assert read_rows(source, required=("question", "answer")) == TABLE
    assert set(check_columns(source, required=("question",))) == {"question", "answer", "choices"}


def test_formats_inferred_and_explicit(tmp_path):
    source = write_table(tmp_path, "csv")
    renamed = tmp_path / "table.txt"
    shutil.copy(source.path, renamed)
    with pytest.raises(ValueError, match=r"table\.txt.*extension '\.txt'"):
        read_rows(DataSource(str(renamed)))
    assert read_rows(DataSource(str(renamed), format="csv")) == TABLE
    with pytest.raises(ValueError, match=r"unknown format 'xml'.*jsonl, csv, parquet, datasets, hub"):
        DataSource(str(renamed), format="xml")
    with pytest.raises(FileNotFoundError, match=r"nothere.*format: hub"):
        read_rows(DataSource(str(tmp_path / "nothere")))
    with pytest.raises(ValueError, match=r"split 'test'.*not csv"):
        read_rows(DataSource(source.path, split="test"))
    assert data_dir(source) == tmp_path


def test_datasetdict_split_errors(tmp_path):
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(OTHER),
                          "test": datasets.Dataset.from_list(TABLE)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits dev, test and none is 'train'"):
        read_rows(DataSource(str(tmp_path / "dd")))
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits: dev, test"):
        check_columns(DataSource(str(tmp_path / "dd"), split="validation"))
    assert read_rows(DataSource(str(tmp_path / "dd"), split="dev")) == OTHER
    datasets.Dataset.from_list(TABLE).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(ValueError, match=r"split 'dev' given, but it holds one Dataset"):
        read_rows(DataSource(str(tmp_path / "one"), split="dev"))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "dataset"])
def test_column_mapping(tmp_path, kind):
    data = [{"q": row["question"], "label": row["answer"], "options": row["choices"]} for row in TABLE]
    source = write_table(tmp_path, kind, data)
    columns = {"question": "q", "answer": "label", "choices": "options"}
    rows = read_rows(source, columns, required=("question", "answer"))
    assert [{k: row[k] for k in ("question", "answer", "choices")} for row in rows] == TABLE
    assert rows[0]["q"] == "2+2?" and rows[0]["label"] == "4"  # the data's columns are kept
    assert check_columns(source, columns) == ["q", "label", "options", "question", "answer", "choices"]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "dataset"])
def test_missing_column_lists_the_columns(tmp_path, kind):
    source = write_table(tmp_path, kind)
    for check in (read_rows, check_columns):
        with pytest.raises(ValueError, match=r"no column 'label' \(mapped to field 'answer'\); "
                                             r"its columns: question, answer, choices"):
            check(source, {"answer": "label"})
        with pytest.raises(ValueError, match=r"no column 'image' for the required field; "
                                             r"its columns: question, answer, choices"):
            check(source, required=("image",))


def test_missing_value_names_file_line_and_column(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"q": "a", "label": 1}\n\n{"q": "b", "answer": "not the mapped column"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: column 'label' \(field 'answer'\) is missing"):
        read_rows(DataSource(str(path)), {"answer": "label"}, required=("answer",))
    assert [row.get("answer") for row in read_rows(DataSource(str(path)), {"answer": "label"})] == [1, None]

    path = tmp_path / "t.csv"
    path.write_text('question,answer\n"multi\nline",x\nb,\n', encoding="utf-8")  # row 2 starts on line 4
    with pytest.raises(ValueError, match=rf"{path}:4: column 'answer' is missing"):
        read_rows(DataSource(str(path)), required=("answer",))
    path.write_text("question,answer\na,x\nb,y,z\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: 3 cells, but the header has 2 columns"):
        read_rows(DataSource(str(path)))

    table = pa.Table.from_pylist([{"question": "a", "answer": "x"}, {"question": "b", "answer": None}])
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: row 1: column 'answer' is missing"):
        read_rows(DataSource(str(tmp_path / "t.parquet")), required=("answer",))
    datasets.Dataset.from_list(table.to_pylist()).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"ds: row 1: column 'answer' is missing"):
        read_rows(DataSource(str(tmp_path / "ds")), required=("answer",))


def test_malformed_and_empty_files(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "a"}\n{"question": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:2: not JSON"):
        read_rows(DataSource(str(path)))
    path.write_text('[{"question": "a"}]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:1: a JSON list, not an object"):
        read_rows(DataSource(str(path)))
    for text in ("", "\n\n"):
        path.write_text(text, encoding="utf-8")
        for check in (read_rows, check_columns):
            with pytest.raises(ValueError, match=rf"{path}: no rows"):
                check(DataSource(str(path)))
    path = tmp_path / "t.csv"
    for text in ("", "question,answer\n"):
        path.write_text(text, encoding="utf-8")
        for check in (read_rows, check_columns):
            with pytest.raises(ValueError, match=rf"{path}: no rows"):
                check(DataSource(str(path)))
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), tmp_path / "t.parquet")
    for check in (read_rows, check_columns):
        with pytest.raises(ValueError, match=r"t\.parquet: no rows"):
            check(DataSource(str(tmp_path / "t.parquet")))
    (tmp_path / "bad.parquet").write_text("not parquet", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable Parquet file"):
        read_rows(DataSource(str(tmp_path / "bad.parquet")))
    with pytest.raises(FileNotFoundError, match=r"gone\.jsonl: no such file"):
        read_rows(DataSource(str(tmp_path / "gone.jsonl")))
    (tmp_path / "notds").mkdir()
    with pytest.raises(ValueError, match=r"notds: not a datasets save_to_disk directory"):
        read_rows(DataSource(str(tmp_path / "notds")))


def test_choices(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('question,choices\na,"[""x"", ""y""]"\nb,x or y\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: column 'choices': choices 'x or y' is a string but not"):
        read_rows(DataSource(str(path)))

    def label(answer, choices=("3", "4", "5")):
        return choice_label({"answer": answer, "choices": list(choices)}, where="t.jsonl:7")

    assert label(1) == 1 and label("2") == 2 and label(np.int64(0)) == 0
    assert label("4") == 1 and label(" 5 ") == 2
    assert label("1", ["yes", "no"]) == 1 and label("no", ["yes", "no"]) == 1
    assert label("1", ["0", "1"]) == 1  # text and index agree
    with pytest.raises(ValueError, match=r"t\.jsonl:7: answer '1' is ambiguous: choice 0's text, or index 1"):
        label("1", ["1", "2", "3"])
    with pytest.raises(ValueError, match=r"t\.jsonl:7: answer index 3 is out of range for 3 choices"):
        label(3)
    with pytest.raises(ValueError, match=r"t\.jsonl:7: answer 'six' is neither an index nor one of the choices"):
        label("six")
    with pytest.raises(TypeError, match=r"t\.jsonl:7: field 'answer' is True"):
        label(True)
    with pytest.raises(ValueError, match=r"field 'choices' is 'x', not a non-empty list"):
        choice_label({"answer": 0, "choices": "x"})


ARC = [  # allenai/ai2_arc's shape; some of its questions number their choices "1".."4"
    {"id": "a", "question": "Which is a gas?",
     "choices": {"text": ["rock", "water", "steam", "ice"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "b", "question": "Legs of a spider?",
     "choices": {"text": ["4", "6", "8", "3"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"},
    {"id": "c", "question": "Sum of 1 and 1?", "choices": {"text": ["1", "2"], "label": ["A", "B"]}, "answerKey": "B"},
]
ARC_COLUMNS = {"choices": "choices.text", "choice_labels": "choices.label", "answer": "answerKey"}


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset"])
def test_arc_shaped_rows_read_through_columns(tmp_path, kind):
    source = write_table(tmp_path, kind, ARC)
    required = ("question", "answer", "choices")
    assert check_columns(source, ARC_COLUMNS, required) == ["id", "question", "choices", "answerKey",
                                                             "choice_labels", "answer"]
    located = read_located(source, ARC_COLUMNS, required)
    rows = [row for _, row in located]
    assert [row["choices"] for row in rows] == [["rock", "water", "steam", "ice"], ["4", "6", "8", "3"], ["1", "2"]]
    assert [row["choice_labels"] for row in rows] == [["A", "B", "C", "D"], ["1", "2", "3", "4"], ["A", "B"]]
    assert [row["choices"] for row in rows] != [row["choices"] for row in read_rows(source)]  # the raw column is kept
    # "3" among labels "1".."4" is the third choice; "B" is choice 1, not the choice whose text is "2"
    assert [choice_label(row, where, ARC_COLUMNS) for where, row in located] == [2, 2, 1]


def test_hellaswag_shaped_rows_read_through_columns(tmp_path):
    rows = [{"ind": 4, "ctx": "A man is sitting on a roof. he",
             "endings": ["is using wrap.", "starts pulling.", "is ripping level tiles off.", "holds a ladder."],
             "label": "3"},
            {"ind": 5, "ctx": "A woman kneels. she", "endings": ["sings.", "dances.", "rises.", "sits."], "label": "0"}]
    source = write_table(tmp_path, "jsonl", rows)
    columns = {"question": "ctx", "choices": "endings", "answer": "label"}
    check_columns(source, columns, ("question", "answer", "choices"))
    located = read_located(source, columns, ("question", "answer", "choices"))
    assert [row["question"] for _, row in located] == ["A man is sitting on a roof. he", "A woman kneels. she"]
    assert [row["choices"][-1] for _, row in located] == ["holds a ladder.", "sits."]
    assert [choice_label(row, where, columns) for where, row in located] == [3, 0]


def test_dotted_column_paths(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"q": {"text": "a", "meta": {"id": 7}}, "q.text": "literal"},
                       {"q": {"text": "b", "meta": None}},
                       {"q": {"meta": {"id": 9}}}])
    source = DataSource(str(path))
    rows = read_rows(source, {"question": "q.text", "row_id": "q.meta.id"})
    assert [row.get("question") for row in rows] == ["literal", "b", None]  # the literal column wins where it is
    assert [row.get("row_id") for row in rows] == [7, None, 9]
    assert check_columns(source, {"question": "q.text", "row_id": "q.meta.id"}) == ["q", "q.text", "question",
                                                                                    "row_id"]
    with pytest.raises(ValueError, match=rf"{path}:3: column 'q\.text' \(field 'answer'\) is missing or empty"):
        read_rows(source, {"question": "q.meta.id", "answer": "q.text"}, required=("answer",))
    for check in (read_rows, check_columns):
        with pytest.raises(ValueError, match=rf"{path}:1: no column 'q\.txt' \(mapped to field 'question'\): "
                                             r"'q' has no key 'txt' \(its keys: text, meta\)"):
            check(source, {"question": "q.txt"})
        with pytest.raises(ValueError, match=rf"{path}: no column 'x\.text' \(mapped to field 'question'\); "
                                             r"its columns: q"):
            check(source, {"question": "x.text"})
    write_jsonl(path, [{"q": {"text": "a"}}, {"q": ["b"]}])
    with pytest.raises(ValueError, match=rf"{path}:2: column 'q\.text' \(field 'question'\): 'q' is a list, not an "
                                         r"object with the key 'text'"):
        read_rows(source, {"question": "q.text"})
    with pytest.raises(ValueError, match=r"t\.csv:2: no column 'question\.text' \(mapped to field 'question'\): "
                                         r"'question' is a str, not an object"):
        check_columns(write_table(tmp_path, "csv"), {"question": "question.text"})


def test_label_answers(tmp_path):
    rows = [{**ARC[0], "answerKey": "E"}]
    source = write_table(tmp_path, "jsonl", rows)
    (where, row), = read_located(source, ARC_COLUMNS)
    with pytest.raises(ValueError, match=rf"{tmp_path}/t\.jsonl:1: answer 'E' is not one of the labels "
                                         r"\['A', 'B', 'C', 'D'\] \(field 'choice_labels' "
                                         r"\(column 'choices\.label'\)\), an index or a choice's text"):
        choice_label(row, where, ARC_COLUMNS)

    def label(answer, labels=("A", "B", "C"), choices=("x", "y", "z")):
        return choice_label({"answer": answer, "choices": list(choices), "choice_labels": list(labels)}, "t.jsonl:7")

    assert label(" B ") == 1 and label(2) == 2 and label("0") == 0 and label("z") == 2  # ints, indices, texts as before
    assert label("2", labels=(1, 2, 3)) == 1
    with pytest.raises(ValueError, match=r"t\.jsonl:7: answer 'A' is the label of choices \[0, 2\]"):
        label("A", labels=("A", "B", "A"))
    with pytest.raises(ValueError, match=r"t\.jsonl:7: field 'choice_labels' is \['A', 'B'\], not a list of one label "
                                         r"for each of the 3 choices"):
        label("A", labels=("A", "B"))
    with pytest.raises(ValueError, match=r"field 'choices' is \{'text': \['x'\]\}, not a non-empty list \(an object: "
                                         r"map choices to a path into it"):
        choice_label({"answer": "A", "choices": {"text": ["x"]}})
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('question,options,labels,key\nq,"[""x"", ""y""]","[""P"", ""Q""]",Q\n', encoding="utf-8")
    columns = {"choices": "options", "choice_labels": "labels", "answer": "key"}
    (where, row), = read_located(DataSource(str(csv_path)), columns)
    assert row["choice_labels"] == ["P", "Q"] and choice_label(row, where, columns) == 1


def png(color: tuple[int, int, int], size=(5, 4), mode="RGB") -> bytes:
    image = Image.new("RGB", size, color).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixel(image: Image.Image) -> tuple:
    assert image.mode == "RGB"
    return np.asarray(image)[0, 0].tolist(), image.size


def test_images_from_paths(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "img" / "grey.png").write_bytes(png((90, 90, 90), mode="L"))
    source = DataSource(str(write_jsonl(tmp_path / "t.jsonl", [{"question": "a", "picture": "img/red.png"},
                                                               {"question": "b", "picture": "img/grey.png"}])))
    rows = read_rows(source, {"image": "picture"}, required=("image",))
    assert [pixel(load_image(row["image"], data_dir(source))) for row in rows] == [([255, 0, 0], (5, 4)),
                                                                                 ([90, 90, 90], (5, 4))]
    write_jsonl(tmp_path / "t.jsonl", [{"question": "a", "picture": "img/red.png"},
                                       {"question": "b", "picture": "img/blue.png"}])
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/t\.jsonl:2: column 'picture' \(field 'image'\): "
                                                r"image 'img/blue\.png' not found"):
        read_rows(source, {"image": "picture"})
    with pytest.raises(FileNotFoundError, match=r"row 4: image 'img/blue\.png' not found at .*img/blue\.png"):
        load_image("img/blue.png", tmp_path, where="row 4")
    (tmp_path / "img" / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"junk\.png is not a readable image"):
        load_image("img/junk.png", tmp_path)
    assert pixel(load_image(Image.new("L", (2, 3), 7), tmp_path)) == ([7, 7, 7], (2, 3))


def test_images_from_bytes(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"question": "a", "image": png((0, 0, 255))}]), tmp_path / "t.parquet")
    (row,) = read_rows(DataSource(str(tmp_path / "t.parquet")), required=("image",))
    assert pixel(load_image(row["image"], tmp_path)) == ([0, 0, 255], (5, 4))
    with pytest.raises(ValueError, match=r"t\.parquet:1 column 'image': 12 bytes that are not a readable image"):
        load_image(b"not an image", tmp_path, where="t.parquet:1 column 'image'")
    with pytest.raises(TypeError, match=r"not int"):
        load_image(3, tmp_path)


def test_images_from_an_hf_image_feature(tmp_path):
    (tmp_path / "green.png").write_bytes(png((0, 255, 0), size=(3, 6)))
    dataset = datasets.Dataset.from_dict({"question": ["a"], "image": [str(tmp_path / "green.png")]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "green.png").unlink()  # save_to_disk embedded the bytes
    source = DataSource(str(tmp_path / "ds"))
    (row,) = read_rows(source, required=("image",))
    assert set(row["image"]) == {"bytes", "path"}
    assert pixel(load_image(row["image"], data_dir(source))) == ([0, 255, 0], (3, 6))
    (tmp_path / "blue.png").write_bytes(png((0, 0, 255)))
    assert pixel(load_image({"bytes": None, "path": "blue.png"}, tmp_path)) == ([0, 0, 255], (5, 4))


def fake_hub_cache(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    """A hub dataset as `load_dataset` leaves it in the cache (datasets' "cache" layout:
    <cache>/<namespace>___<name>/<config>/<version>/<hash>/), made from a local JSON load."""
    write_jsonl(tmp_path / "src.jsonl", rows)
    datasets.load_dataset("json", data_files={"train": str(tmp_path / "src.jsonl")}, cache_dir=str(tmp_path / "c0"))
    (built,) = [p for p in (tmp_path / "c0" / "json").glob("*/*/*") if p.is_dir()]
    namespace, short = name.split("/")
    cache = tmp_path / "cache"
    target = cache / f"{namespace}___{short}" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(built, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{short}-", 1))
    info = json.loads((target / "dataset_info.json").read_text(encoding="utf-8"))
    info.update(config_name="default", dataset_name=short)
    (target / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return cache


def test_hub_dataset_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", fake_hub_cache(tmp_path, "someone/tiny_qa", TABLE))
    lookups = []  # any network attempt (datasets falls back to the cache after a failed one, so record, not raise)

    def no_network(*args, **kwargs):
        lookups.append(args[:2])
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    online = datasets.config.HF_HUB_OFFLINE
    source = DataSource("someone/tiny_qa", format="hub")
    assert read_rows(source) == TABLE
    assert set(check_columns(source, required=("answer",))) == {"question", "answer", "choices"}
    with pytest.raises(ValueError, match=r"someone/tiny_qa: no split 'test'; its splits: train"):
        read_rows(DataSource("someone/tiny_qa", format="hub", split="test"))
    with pytest.raises(FileNotFoundError, match=r"someone/absent: hub dataset not in the local Hugging Face cache.*"
                                                r"download it first"):
        read_rows(DataSource("someone/absent", format="hub"))
    assert datasets.config.HF_HUB_OFFLINE == online  # restored
    assert lookups == []


WORDS = ["Q", "A", ":", "+", "?", "1", "2", "3", "4", "5"]
CHAT = ("{% for m in messages %}<|{{m.role}}|>{{m.content}}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def tokenizer():
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = CHAT
    return tok


ROWS = [{"question": "2+2?", "answer": "4", "choices": ["3", "4"]}, {"question": "1+1?", "answer": "2"}]
SHOTS = [{"question": "1+2?", "answer": "3"}, {"question": "2+3?", "answer": "5"}, {"question": "x", "answer": "y"}]


def test_template_fields_and_check_fields():
    assert template_fields("Q: {question} ({choices[0]}, {meta.id:>{width}}) {{literal}}") == {
        "question", "choices", "meta", "width"}
    assert template_fields(None) == {"question"}
    with pytest.raises(ValueError, match=r"positional placeholder \{\}"):
        template_fields("Q: {}")
    spec = PromptSpec("Q: {question}\nContext: {context}\nA:")
    with pytest.raises(ValueError, match=r"tasks\[0\]\.prompt\.template: field\(s\) 'context' not in the data "
                                         r"\(its fields: answer, question\)"):
        check_fields(spec, ["question", "answer"], "tasks[0].prompt")
    check_fields(spec, ["question", "context"], "tasks[0].prompt")  # the answer template is unused without shots
    with pytest.raises(ValueError, match=r"tasks\[1\]\.prompt\.answer_template: field\(s\) 'answer'"):
        check_fields(PromptSpec(few_shot=2), ["question"], "tasks[1].prompt")
    with pytest.raises(ValueError, match=r"tasks\[2\]\.prompt\.template: template 'Q: \{question': "):
        check_fields(PromptSpec("Q: {question"), ["question"], "tasks[2].prompt")
    with pytest.raises(ValueError, match=r"few_shot is -1"):
        PromptSpec(few_shot=-1)


def test_render_plain():
    assert render(PromptSpec(), ROWS) == ["2+2?", "1+1?"]
    assert render(PromptSpec(None), ROWS) == ["2+2?", "1+1?"]
    spec = PromptSpec("Q: {question}\nA:", few_shot=2, answer_template=" {answer}", system="Arithmetic.")
    assert render(spec, ROWS, examples=SHOTS) == [
        "Arithmetic.\n\nQ: 1+2?\nA: 3\n\nQ: 2+3?\nA: 5\n\nQ: 2+2?\nA:",
        "Arithmetic.\n\nQ: 1+2?\nA: 3\n\nQ: 2+3?\nA: 5\n\nQ: 1+1?\nA:"]
    assert render(PromptSpec("{question} [{choices[1]}]", separator="|"), ROWS[:1]) == ["2+2? [4]"]
    with pytest.raises(ValueError, match=r"row 1: field 'choices' is missing or empty"):
        render(PromptSpec("{question} {choices[0]}"), ROWS)
    with pytest.raises(ValueError, match=r"row 0: template .*IndexError"):
        render(PromptSpec("{choices[5]}"), ROWS)
    with pytest.raises(ValueError, match=r"example 1: field 'answer' is missing"):
        render(PromptSpec(few_shot=2), ROWS, examples=[SHOTS[0], {"question": "q"}])
    with pytest.raises(ValueError, match=r"few_shot is 4, but 3 example\(s\) are given"):
        render(PromptSpec(few_shot=4), ROWS, examples=SHOTS)


def test_render_chat(tokenizer):
    assert render(PromptSpec("Q: {question}", chat=True), ROWS, tokenizer) == [
        "<|user|>Q: 2+2?\n<|assistant|>", "<|user|>Q: 1+1?\n<|assistant|>"]
    spec = PromptSpec("Q: {question}", chat=True, system="Be brief.", few_shot=2, answer_template="A: {answer}")
    assert render(spec, ROWS[:1], tokenizer, examples=SHOTS) == [
        ("<|system|>Be brief.\n<|user|>Q: 1+2?\n<|assistant|>A: 3\n<|user|>Q: 2+3?\n<|assistant|>A: 5\n"
         "<|user|>Q: 2+2?\n<|assistant|>")]
    with pytest.raises(ValueError, match=r"chat prompts need the tokenizer"):
        render(spec, ROWS, examples=SHOTS)
    with pytest.raises(ValueError, match=r"row 1: field 'context' is missing"):
        render(PromptSpec("{context}", chat=True), [{"context": "c"}, {"question": "q"}], tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"the tokenizer has no chat template"):
        render(spec, ROWS, tokenizer, examples=SHOTS)
