"""Labelled text datasets (JSONL or CSV with text and label columns) and the bundled movie-review data."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from importlib import resources


def bundled_path(name: str) -> str:
    """Path of a file of the bundled movie_reviews data (train.jsonl, test.jsonl, plots.txt, README.md)."""
    return str(resources.files("deberta_fast").joinpath("data", "movie_reviews", name))


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]


def read_labelled(path: str, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """Read a .jsonl / .json-lines or .csv file; raises ValueError naming the file, line and missing column."""
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    texts, labels = [], []
    lower = path.lower()
    if lower.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; columns are {reader.fieldnames}")
            for row in reader:
                texts.append(row[text_column])
                labels.append(str(row[label_column]))
    elif lower.endswith((".jsonl", ".json", ".ndjson")):
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object per line ({error})") from None
                missing = [c for c in (text_column, label_column) if c not in row]
                if missing:
                    raise ValueError(f"{path}:{number}: missing key(s) {missing}")
                texts.append(str(row[text_column]))
                labels.append(str(row[label_column]))
    else:
        raise ValueError(f"data file {path!r}: expected a .jsonl or .csv file")
    if not texts:
        raise ValueError(f"data file {path!r} has no rows")
    return LabelledTexts(texts, labels)


def label_names(*datasets: LabelledTexts) -> list[str]:
    """Sorted label names over all datasets: the id of a label is its index."""
    return sorted({label for data in datasets for label in data.labels})


def read_corpus(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]
