"""Classification quality for binary sentence-pair labels, as GLUE reports MRPC.

Label 1 (paraphrase) is the positive class, so F1 is GLUE's MRPC F1.
"""

from __future__ import annotations

from collections.abc import Iterable


def binary_report(pairs: Iterable[tuple[int, int]]) -> dict:
    """Accuracy, F1, precision, recall and confusion counts of ``(predicted, expected)`` pairs.

    Labels are 0 or 1. Every value is a plain number (JSON-ready); a ratio with
    a zero denominator is 0.0, never NaN. An empty input gives ``n == 0``.
    """
    tp = fp = tn = fn = 0
    for predicted, expected in pairs:
        if predicted == 1:
            tp, fp = (tp + 1, fp) if expected == 1 else (tp, fp + 1)
        else:
            fn, tn = (fn + 1, tn) if expected == 1 else (fn, tn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": round((tp + tn) / n, 4) if n else 0.0, "f1": round(f1, 4),
            "precision": round(precision, 4), "recall": round(recall, 4),
            "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn}}
