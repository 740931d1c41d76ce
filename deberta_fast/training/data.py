"""Labelled text datasets (JSONL or CSV with text and label columns) and the bundled movie-review data.

Reading is strict: every refusal is a ValueError naming the file and, where there is one, the line (a CSV row's
line is the line it starts on): a row without a text or label, a text that is not a string (JSONL ``null``,
numbers), a label that is missing / null / empty, a JSONL line that is not an object, bytes that are not UTF-8.
``check_labels`` refuses training data with fewer than two labels and evaluation labels unseen in training.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from importlib import resources


def bundled_path(name: str) -> str:
    """Path of a file of the bundled movie_reviews data (train.jsonl, test.jsonl, plots.txt, README.md)."""
    return str(resources.files("deberta_fast").joinpath("data", "movie_reviews", name))


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]
    path: str = ""
    lines: list[int] = field(default_factory=list)  # the line each row starts on


def _label(value, where: str, column: str) -> str:
    if value is None or isinstance(value, (dict, list)) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: the label {column!r} is {'missing' if value is None else repr(value)}; "
                         "expected a non-empty string or a number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text {column!r} is {'missing' if value is None else repr(value)}; "
                         "expected a string")
    return value


def read_labelled(path: str, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """Read a .jsonl / .json-lines or .csv file; raises ValueError naming the file and line of any bad row."""
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    texts, labels, lines = [], [], []
    lower = path.lower()
    try:
        if lower.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"{path}: missing column(s) {missing}; columns are {reader.fieldnames}")
                start = reader.line_num + 1
                for row in reader:
                    where = f"{path}:{start}"
                    if None in row:
                        raise ValueError(f"{where}: more fields than the header's {len(reader.fieldnames)} columns")
                    texts.append(_text(row[text_column], where, text_column))
                    labels.append(_label(row[label_column], where, label_column))
                    lines.append(start)
                    start = reader.line_num + 1
        elif lower.endswith((".jsonl", ".json", ".ndjson")):
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    where = f"{path}:{number}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{where}: not a JSON object per line ({error})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{where}: expected a JSON object with {text_column!r} and "
                                         f"{label_column!r}; got a {type(row).__name__}")
                    missing = [c for c in (text_column, label_column) if c not in row]
                    if missing:
                        raise ValueError(f"{where}: missing key(s) {missing}")
                    texts.append(_text(row[text_column], where, text_column))
                    labels.append(_label(row[label_column], where, label_column))
                    lines.append(number)
        else:
            raise ValueError(f"data file {path!r}: expected a .jsonl or .csv file")
    except UnicodeDecodeError as error:
        line = _line_of_byte(path, error.start) if isinstance(error.object, bytes) else None
        raise ValueError(f"{path}{f':{line}' if line else ''}: not UTF-8 text ({error.reason} at a byte "
                         f"0x{error.object[error.start]:02x}); save the file as UTF-8") from None
    if not texts:
        raise ValueError(f"data file {path!r} has no rows")
    return LabelledTexts(texts, labels, path, lines)


def _line_of_byte(path: str, offset_in_chunk: int) -> int | None:
    """Line number of the first byte that is not UTF-8 (the decoder reports offsets within its chunk)."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return data.count(b"\n", 0, error.start) + 1
    return None


def check_labels(train: LabelledTexts, evaluation: LabelledTexts) -> None:
    """Training needs two labels or more; every evaluation label must occur in training (an unseen one would
    become a class the head never trained on)."""
    seen = set(train.labels)
    if len(seen) < 2:
        raise ValueError(f"{train.path}: the training data has a single label {sorted(seen)}; a classifier needs "
                         "at least two")
    for index, label in enumerate(evaluation.labels):
        if label not in seen:
            line = evaluation.lines[index] if index < len(evaluation.lines) else index + 1
            raise ValueError(f"{evaluation.path}:{line}: label {label!r} does not occur in the training data "
                             f"{train.path} (labels {sorted(seen)})")


def label_names(*datasets: LabelledTexts) -> list[str]:
    """Sorted label names over all datasets: the id of a label is its index."""
    return sorted({label for data in datasets for label in data.labels})


def read_corpus(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]
