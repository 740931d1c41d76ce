"""Classification metrics: accuracy and macro-F1 (mean over classes of 2·P·R / (P + R); 0 for an empty class)."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    scores = []
    for cls in range(num_classes):
        true_positive = sum(1 for p, y in zip(predictions, labels) if p == cls and y == cls)
        predicted = sum(1 for p in predictions if p == cls)
        actual = sum(1 for y in labels if y == cls)
        if predicted == 0 or actual == 0:
            scores.append(0.0)
            continue
        precision, recall = true_positive / predicted, true_positive / actual
        scores.append(0.0 if true_positive == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / num_classes
