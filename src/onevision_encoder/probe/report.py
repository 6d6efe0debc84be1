"""The run folder: metrics recomputable from the predictions, report.json, predictions.jsonl, the head's
weights, a plot of loss and accuracy per epoch and a confusion-matrix picture.

Names other tools read: report.json `final` = {top1, top5, mean_class_accuracy} in percent, `epochs` (one
object per epoch: epoch, train_loss and the same three metrics), `num_classes`, `classes`; each line of
predictions.jsonl has `path`, `label` (an integer) and `top5` (class integers, best first) with `scores`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..encode.features import atomic_write
from ..plotting import plot_curves

REPORT_FILE = "report.json"
PREDICTIONS_FILE = "predictions.jsonl"
HEAD_FILE = "head.safetensors"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"
METRICS = ("top1", "top5", "mean_class_accuracy")


def metrics(predictions: list[dict]) -> dict[str, float]:
    """top-1, top-5 and mean per-class accuracy (over the classes present), in percent, from prediction
    lines alone (`label`, `top5`)."""
    if not predictions:
        return {name: 0.0 for name in METRICS}
    labels = np.array([p["label"] for p in predictions])
    top5 = [p["top5"] for p in predictions]
    correct = np.array([t[0] == y for t, y in zip(top5, labels)])
    in_top5 = np.array([y in t for t, y in zip(top5, labels)])
    per_class = [correct[labels == c].mean() for c in np.unique(labels)]
    return {"top1": 100 * float(correct.mean()), "top5": 100 * float(in_top5.mean()),
            "mean_class_accuracy": 100 * float(np.mean(per_class))}


def prediction_lines(paths: list[str], labels: list[int], rows: list[int], logits: torch.Tensor) -> list[dict]:
    """One line per evaluated clip: its path, label and top-5 classes with their probabilities."""
    probabilities = logits.float().softmax(-1)
    scores, classes = probabilities.topk(min(5, logits.shape[-1]), dim=-1)
    return [{"path": paths[i], "label": labels[i], "top5": c.tolist(), "scores": [round(v, 6) for v in s.tolist()]}
            for i, c, s in zip(rows, classes, scores)]


def write_run(out: str, report: dict, predictions: list[dict], head_state: dict[str, torch.Tensor]) -> None:
    """Everything a finished run leaves; report.json last, so that its presence means the run finished."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, PREDICTIONS_FILE), "".join(json.dumps(p) + "\n" for p in predictions).encode())
    save_file({k: v.detach().cpu().contiguous() for k, v in head_state.items()}, os.path.join(out, HEAD_FILE),
              metadata={"classes": json.dumps(report["classes"]), "model": report["model"]})
    epochs = report["epochs"]
    xs = [e["epoch"] for e in epochs]
    plot_curves(os.path.join(out, CURVES_FILE), {
        "train loss": {"train loss": (xs, [e["train_loss"] for e in epochs])},
        "validation accuracy (%)": {name: (xs, [e[name] for e in epochs]) for name in METRICS},
    }, xlabel="epoch", title=f"attentive probe: {os.path.basename(report['model'].rstrip('/'))}")
    confusion_picture(os.path.join(out, CONFUSION_FILE), predictions, report["classes"])
    atomic_write(os.path.join(out, REPORT_FILE), (json.dumps(report, indent=2) + "\n").encode())


def confusion_picture(path: str, predictions: list[dict], classes: list[str]) -> str:
    """Row-normalised confusion matrix (true class by row, predicted by column) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    counts = np.zeros((n, n))
    for p in predictions:
        counts[p["label"], p["top5"][0]] += 1
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(12, 2 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rates, vmin=0, vmax=1, cmap="viridis")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (rows sum to 1)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
