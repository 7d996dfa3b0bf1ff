"""Task data: rows from JSONL, CSV, Parquet, a `datasets` directory or a cached hub dataset.

`DataSource(path)` names the data; its format follows from the path (`.jsonl`/`.json`:
JSON lines, `.csv`, `.parquet`, a directory: `datasets.save_to_disk` output), or is given,
`format="hub"` for a Hugging Face hub dataset read offline from the local cache.
`read_rows(source, columns, required)` returns the rows as dicts, each with our canonical
field names ("question", "answer", "choices", "image", ...) mapped from the data's columns
and its other columns kept (`read_located`: each with where it is, for errors);
`check_columns` checks the same columns cheaply (header, schema or first row), to validate
a config before any model is loaded.

A mapped column may be a dotted path into nested objects, as lm-eval's task files and
Hugging Face datasets nest them: `choices.text` reads row["choices"]["text"] (a column
literally named "choices.text" wins where the data has one). So ARC's rows
{"question", "choices": {"text", "label"}, "answerKey": "C"} read with
`{"choices": "choices.text", "choice_labels": "choices.label", "answer": "answerKey"}`:
`choice_label` turns a label answer into its choice's index.

Errors name the file, the line (JSONL; CSV with the header as line 1) or row index
(Parquet, datasets) and the column at fault. pyarrow and datasets are imported only when
their format is read.

Values: CSV cells are strings, an empty cell reads as None (missing); a "choices" or
"choice_labels" value given as a JSON string of a list is parsed; an "image" value given as
a path must name an existing file, relative to the data file's directory (`data_dir`); an
image of more pixels than PIL decodes (`PIL.Image.MAX_IMAGE_PIXELS`) is refused before it
is decoded.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

FORMATS = ("jsonl", "csv", "parquet", "datasets", "hub")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
SPLIT_FORMATS = ("datasets", "hub")

Located = list[tuple[str, dict]]  # (where: "file:line" or "file: row i", row) pairs


class WrongType(ValueError, TypeError):
    """A value of the wrong type in the data (an answer `true`, an image `3`): a ValueError, as
    every data error is (one line from the command line), and a TypeError, as it was."""


@dataclass(frozen=True)
class DataSource:
    """Where a task's rows are. path: a file, a `save_to_disk` directory, or (format "hub") a
    hub dataset name. format: one of FORMATS; None: from the path. split: which split of a
    DatasetDict (datasets, hub); None: "train" if there is one."""

    path: str
    format: str | None = None
    split: str | None = None

    def __post_init__(self):
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"{self.path}: unknown format {self.format!r} (known: {', '.join(FORMATS)})")


def source_format(source: DataSource) -> str:
    """The source's format: given, or inferred from the path."""
    if source.format is not None:
        fmt = source.format
    else:
        path = Path(source.path)
        if path.is_dir():
            fmt = "datasets"
        elif path.suffix.lower() in EXTENSIONS:
            fmt = EXTENSIONS[path.suffix.lower()]
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory (for a hub dataset set format: hub)")
        else:
            raise ValueError(f"{path}: cannot tell the format from the extension {path.suffix!r} "
                             f"(.jsonl/.json, .csv, .parquet or a datasets directory); set format to one of "
                             f"{', '.join(FORMATS)}")
    if source.split is not None and fmt not in SPLIT_FORMATS:
        raise ValueError(f"{source.path}: split {source.split!r} applies to the {' and '.join(SPLIT_FORMATS)} "
                         f"formats only, not {fmt}")
    return fmt


def data_dir(source: DataSource) -> Path:
    """The directory that relative image paths in the data are relative to: the data file's
    directory, a datasets directory itself, the working directory for a hub dataset."""
    fmt = source_format(source)
    if fmt == "hub":
        return Path.cwd()
    if fmt == "datasets":
        return Path(source.path)
    return Path(source.path).parent


def read_rows(source: DataSource, columns: Mapping[str, str] = {}, required: Sequence[str] = ()) -> list[dict]:
    """The source's rows. columns: canonical field -> the data's column, or a dotted path into
    nested objects ("choices.text": row["choices"]["text"]; a column literally named so wins
    where a row has one); each row holds the fields (the mapped column's value) and all its
    columns. required: fields every row must have (not missing, not None), looked up in the
    column `columns` maps them to, else in the column of the same name."""
    return [row for _, row in read_located(source, columns, required)]


def read_located(source: DataSource, columns: Mapping[str, str] = {}, required: Sequence[str] = ()) -> Located:
    """`read_rows`'s rows, each with where it is ("file:line", "file: row i"), for errors."""
    fmt = source_format(source)
    name, data_columns, located = _read(source, fmt)
    if not located:
        raise ValueError(f"{name}: no rows")
    _check_present(name, data_columns, columns, required, located)
    base = data_dir(source)
    rows: Located = []
    for where, raw in located:
        row = dict(raw)
        for field, column in columns.items():
            value = _column_value(raw, column, f"{where}: {column_label(field, columns)}")
            if value is _MISSING:
                row.pop(field, None)
            else:
                row[field] = value
        for field in required:
            if row.get(field) is None:
                raise ValueError(f"{where}: {column_label(field, columns)} is missing or empty")
        for field in ("choices", "choice_labels"):
            if row.get(field) is not None:
                row[field] = _parse_list(row[field], f"{where}: {column_label(field, columns)}", field)
        image = row.get("image")
        if isinstance(image, str) and not (base / image).is_file():
            raise FileNotFoundError(f"{where}: {column_label('image', columns)}: image {image!r} not found at "
                                    f"{base / image}")
        rows.append((where, row))
    return rows


def check_columns(source: DataSource, columns: Mapping[str, str] = {}, required: Sequence[str] = ()) -> list[str]:
    """Checks that the data has every mapped column and a column for every required field,
    reading only the header (CSV), schema (Parquet), first row (JSONL: its keys are the
    columns) or the memory-mapped dataset. A dotted path needs its first key among the columns
    and, in JSONL, the rest of it in the first row. Returns the fields a row will have: the
    data's columns, then the mapped fields not among them."""
    fmt = source_format(source)
    name, data_columns, first = _columns(source, fmt, [column for column in columns.values() if "." in column])
    _check_present(name, data_columns, columns, required, first)
    return list(data_columns) + [field for field in columns if field not in data_columns]


def load_image(value: Any, base_dir: Path | str, where: str = "image") -> Image.Image:
    """An RGB image from a path (relative to base_dir), raw encoded bytes, a dict
    {"bytes": ..., "path": ...} (the HF Image feature's storage; bytes first) or a PIL image.
    where: what to name in errors (e.g. "data.jsonl:3 column 'image'"). An image of more pixels
    than PIL decodes (Image.MAX_IMAGE_PIXELS; PIL itself refuses only twice that) is refused
    from its header, before it is decoded."""
    if isinstance(value, Image.Image):
        return _within_limit(value, where).convert("RGB")
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return _decode(bytes(data), f"{where} ({path})" if path else where)
        if path is None:
            raise ValueError(f"{where}: image dict has neither bytes nor a path")
        value = path
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(bytes(value), where)
    if isinstance(value, (str, os.PathLike)):
        path = Path(base_dir) / value
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {str(value)!r} not found at {path}")
        return _open(path, f"{where}: {path}", f"{where}: {path} is not a readable image")
    raise WrongType(f"{where}: an image is a path, bytes, a {{'bytes', 'path'}} dict or a PIL image, "
                    f"not {type(value).__name__}")


def choice_label(row: Mapping[str, Any], where: str = "row", columns: Mapping[str, str] = {}) -> int:
    """The index of a choice row's answer in row["choices"]: the answer is an index (an int, a
    float without a fraction, as pandas writes an int column with gaps, or a string of digits)
    or one choice's text. A digit string that is a choice's text and, as an index, another
    choice's is refused as ambiguous. where: the row, as errors name it ("data.jsonl:3");
    columns: the task's field -> column mapping, to name the answer's column.

    With choice labels (row["choice_labels"], one per choice: ARC's choices.label), a string
    answer that is a label (ARC's answerKey "C") stands for its choice, before any other
    reading: ARC numbers some questions' choices "1".."4", and answerKey "3" there is the third
    choice, not index 3. An int answer is an index still; a string that is no label is read
    as without labels, and one that is nothing is an error naming the labels."""
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, list) or not choices:
        column = columns.get("choices", "choices")
        hint = (f" (an object: map choices to a path into it, '{column}.<key>', e.g. choices: {column}.text and "
                f"choice_labels: {column}.label)" if isinstance(choices, Mapping) else "")
        raise ValueError(f"{where}: {_field_label('choices', columns)} is {choices!r}, not a non-empty list{hint}")
    labels = row.get("choice_labels")
    labelled = _labelled_choice(labels, answer, len(choices), where, columns)
    if labelled is not None:
        return labelled
    if isinstance(answer, numbers.Integral) and not isinstance(answer, bool):
        index = int(answer)
    elif isinstance(answer, numbers.Real) and not isinstance(answer, bool) and float(answer).is_integer():
        index = int(answer)
    elif isinstance(answer, str):
        text = answer.strip()
        matches = [i for i, choice in enumerate(choices) if str(choice).strip() == text]
        as_index = int(text) if text.isascii() and text.isdigit() else None
        if len(matches) > 1:
            raise ValueError(f"{where}: answer {answer!r} is the text of choices {matches}")
        if matches and as_index is not None and as_index < len(choices) and as_index != matches[0]:
            raise ValueError(f"{where}: answer {answer!r} is ambiguous: choice {matches[0]}'s text, or index "
                             f"{as_index}; give the index as an integer (JSONL, Parquet) or the choice's text")
        if matches:
            return matches[0]
        if as_index is None and labels is not None:
            raise ValueError(f"{where}: answer {answer!r} is not one of the labels {labels!r} "
                             f"({_field_label('choice_labels', columns)}), an index or a choice's text")
        if as_index is None:
            raise ValueError(f"{where}: answer {answer!r} is neither an index nor one of the choices {choices!r}")
        index = as_index
    else:
        raise WrongType(f"{where}: {_field_label('answer', columns)} is {answer!r}, not a choice's index (an integer) "
                        "or text")
    if not 0 <= index < len(choices):
        raise ValueError(f"{where}: answer index {index} is out of range for {len(choices)} choices")
    return index


def _labelled_choice(labels: Any, answer: Any, count: int, where: str, columns: Mapping[str, str]) -> int | None:
    """The index of the choice whose label a string answer is; None without labels, for an
    answer that is no string, or is none of them."""
    if labels is None:
        return None
    if not isinstance(labels, list) or len(labels) != count:
        raise ValueError(f"{where}: {_field_label('choice_labels', columns)} is {labels!r}, not a list of one "
                         f"label for each of the {count} choices")
    if not isinstance(answer, str):
        return None
    matches = [i for i, label in enumerate(labels) if str(label).strip() == answer.strip()]
    if len(matches) > 1:
        raise ValueError(f"{where}: answer {answer!r} is the label of choices {matches} (labels {labels!r})")
    return matches[0] if matches else None


def column_label(field: str, columns: Mapping[str, str]) -> str:
    """A field as errors name it: its column, and the field if the column is another."""
    column = columns.get(field, field)
    return f"column {column!r}" if column == field else f"column {column!r} (field {field!r})"


def _field_label(field: str, columns: Mapping[str, str]) -> str:
    column = columns.get(field, field)
    return f"field {field!r}" if column == field else f"field {field!r} (column {column!r})"


_MISSING = object()  # what a row holds for a column it lacks


def _column_value(raw: Mapping[str, Any], column: str, where: str) -> Any:
    """raw[column]; where the row has no such column, the value at the dotted path through
    nested objects ("choices.text": raw["choices"]["text"]). _MISSING where the row lacks the
    column, a key on the path, or a value on the way is null. where: the column, as errors
    name it, for a value on the way that is not an object."""
    if column in raw:  # a column literally named "a.b" wins over the path
        return raw[column]
    value: Any = raw
    for key in column.split("."):
        if value is None:
            return _MISSING
        if not isinstance(value, Mapping):
            raise WrongType(f"{where}: {_path_gap(raw, column)}")
        if key not in value:
            return _MISSING
        value = value[key]
    return value


def _path_gap(raw: Mapping[str, Any], column: str) -> str | None:
    """Where a dotted path stops short in a row ("'choices' has no key 'txt' (its keys: text,
    label)"); None where it reaches a value, or a null on the way (a missing value, not a
    missing column)."""
    keys = column.split(".")
    value: Any = raw
    for depth, key in enumerate(keys):
        at = repr(".".join(keys[:depth])) if depth else "the row"
        if value is None:
            return None
        if not isinstance(value, Mapping):
            return f"{at} is a {type(value).__name__}, not an object with the key {key!r}"
        if key not in value:
            return f"{at} has no key {key!r} (its keys: {', '.join(map(str, value))})"
        value = value[key]
    return None


def _check_present(name: str, data_columns: Sequence[str], columns: Mapping[str, str], required: Sequence[str],
                   located: Located = ()):
    """Every mapped column, and a column for every required field, is among the data's
    columns. A dotted path not among them is there when its first key is and, where rows are
    given (`located`), the rest of it reaches a value in one of them (else the error names the
    first row and where the path stops in it)."""
    have = ", ".join(data_columns)

    def present(column: str) -> bool:
        return column in data_columns or ("." in column and column.split(".")[0] in data_columns)

    for field, column in columns.items():
        if not present(column):
            raise ValueError(f"{name}: no column {column!r} (mapped to field {field!r}); its columns: {have}")
        if column not in data_columns and located:
            (where, first), rest = located[0], located[1:]
            stop = _path_gap(first, column)
            if stop is not None and all(_path_gap(raw, column) is not None for _, raw in rest):
                raise ValueError(f"{where}: no column {column!r} (mapped to field {field!r}): {stop}")
    for field in required:
        if not present(columns.get(field, field)):
            raise ValueError(f"{name}: no {column_label(field, columns)} for the required field; its columns: {have}")


def _parse_list(value: Any, where: str, what: str) -> Any:
    """A list value (choices, choice labels) as a list: a tuple converted, a JSON list in a string (CSV) parsed."""
    if isinstance(value, tuple):
        return list(value)
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
        if isinstance(parsed, list):
            return parsed
    except json.JSONDecodeError:
        pass
    raise ValueError(f"{where}: {what} {value[:80]!r} is a string but not a JSON list")


def _decode(data: bytes, where: str) -> Image.Image:
    return _open(io.BytesIO(data), where, f"{where}: {len(data)} bytes that are not a readable image")


def _open(file, name: str, unreadable: str) -> Image.Image:
    """An image file (a path or a binary file object) as RGB, its size checked from its header
    before it is decoded. name: the image in errors; unreadable: the error's text for a file
    PIL cannot read."""
    try:
        with warnings.catch_warnings():  # PIL's warning between its limit and twice it: refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                return _within_limit(image, name).convert("RGB")
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses it from the header
        raise ValueError(f"{name}: too large to decode ({e}); shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS "
                         f"({Image.MAX_IMAGE_PIXELS})") from None
    except OSError as e:
        raise ValueError(f"{unreadable} ({e})") from None


def _within_limit(image: Image.Image, name: str) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ValueError(f"{name}: {image.width} x {image.height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS "
                         f"({limit}); shrink the image, or raise the limit")
    return image


def _check_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _read(source: DataSource, fmt: str) -> tuple[str, list[str], Located]:
    """(name for errors, columns, located rows)."""
    path = Path(source.path)
    if fmt == "jsonl":
        located = _jsonl(path, limit=None)
        return str(path), list(dict.fromkeys(column for _, row in located for column in row)), located
    if fmt == "csv":
        header, located = _csv(path, limit=None)
        return str(path), header, located
    if fmt == "parquet":
        import pyarrow

        _check_file(path)
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except pyarrow.ArrowException as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        return str(path), table.column_names, [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]
    name, dataset = _dataset(source, fmt)
    return name, list(dataset.column_names), [(f"{name}: row {i}", row) for i, row in enumerate(dataset.to_list())]


def _columns(source: DataSource, fmt: str, paths: Sequence[str] = ()) -> tuple[str, list[str], Located]:
    """(name for errors, columns, the first row), reading as little as the format allows: of
    Parquet and datasets, the first row's columns that dotted `paths` start in, if any; no rows
    is an error."""
    path = Path(source.path)
    if fmt == "jsonl":
        located = _jsonl(path, limit=1)
        if not located:
            raise ValueError(f"{path}: no rows")
        return str(path), list(located[0][1]), located
    if fmt == "csv":
        header, located = _csv(path, limit=1)
        if not located:
            raise ValueError(f"{path}: no rows")
        return str(path), header, located
    if fmt == "parquet":
        import pyarrow

        _check_file(path)
        try:
            import pyarrow.parquet as pq

            metadata = pq.read_metadata(path)
        except pyarrow.ArrowException as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        if metadata.num_rows == 0:
            raise ValueError(f"{path}: no rows")
        names = list(metadata.schema.to_arrow_schema().names)
        heads = _path_heads(paths, names)
        if not heads:
            return str(path), names, []
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1, columns=heads))
        return str(path), names, [(f"{path}: row 0", batch.to_pylist()[0])]
    name, dataset = _dataset(source, fmt)
    if len(dataset) == 0:
        raise ValueError(f"{name}: no rows")
    heads = _path_heads(paths, dataset.column_names)
    return name, list(dataset.column_names), [(f"{name}: row 0", dataset.select_columns(heads)[0])] if heads else []


def _path_heads(paths: Sequence[str], names: Sequence[str]) -> list[str]:
    """The columns that dotted paths (not themselves columns) start in."""
    return sorted({p.split(".")[0] for p in paths if p not in names and p.split(".")[0] in names})


def _jsonl(path: Path, limit: int | None) -> Located:
    _check_file(path)
    located: Located = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg}); JSONL holds one JSON object a line") from None
            if not line.lstrip().startswith("{"):  # valid JSON, but not an object
                raise ValueError(f"{path}:{number}: a JSON {type(row).__name__}, not an object; JSONL holds one "
                                 f"JSON object a line")
            located.append((f"{path}:{number}", row))
            if limit is not None and len(located) >= limit:
                break
    return located


def _csv(path: Path, limit: int | None) -> tuple[list[str], Located]:
    _check_file(path)
    located: Located = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: no rows (an empty file, not even a header)")
            duplicates = sorted({column for column in header if header.count(column) > 1})
            if duplicates:
                raise ValueError(f"{path}:1: duplicate column(s) {', '.join(map(repr, duplicates))} in the header")
            end = reader.line_num
            for cells in reader:
                start, end = end + 1, reader.line_num
                if not cells:  # a blank line
                    continue
                if len(cells) != len(header):
                    raise ValueError(f"{path}:{start}: {len(cells)} cells, but the header has {len(header)} columns")
                values = {c: (v if v != "" else None) for c, v in zip(header, cells, strict=True)}
                located.append((f"{path}:{start}", values))
                if limit is not None and len(located) >= limit:
                    break
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return header, located


def _dataset(source: DataSource, fmt: str):
    """(name for errors, the datasets.Dataset of the chosen split)."""
    import datasets

    if fmt == "datasets":
        path = Path(source.path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory")
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{path}: not a datasets save_to_disk directory ({e})") from None
    else:
        # Offline whatever the environment says: the hub is never asked; a dataset downloaded
        # before is found in the local cache (config.HF_DATASETS_CACHE).
        offline = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True
        try:
            data = datasets.load_dataset(source.path, download_mode="reuse_cache_if_exists")
        except (ConnectionError, FileNotFoundError) as e:
            raise FileNotFoundError(
                f"{source.path}: hub dataset not in the local Hugging Face cache "
                f"({datasets.config.HF_DATASETS_CACHE}); "
                f"download it first (datasets.load_dataset({source.path!r}) on a machine with network access, "
                f"same HF_HOME) or point path at a local file ({type(e).__name__}: {e})") from None
        finally:
            datasets.config.HF_HUB_OFFLINE = offline
    name = source.path
    if isinstance(data, datasets.DatasetDict):
        splits = ", ".join(data)
        split = source.split
        if split is None:
            if "train" not in data:
                raise ValueError(f"{name}: splits {splits} and none is 'train'; set split to one of them")
            split = "train"
        if split not in data:
            raise ValueError(f"{name}: no split {split!r}; its splits: {splits}")
        return f"{name} [{split}]", data[split]
    if source.split is not None:
        raise ValueError(f"{name}: split {source.split!r} given, but it holds one Dataset, without splits")
    return name, data
