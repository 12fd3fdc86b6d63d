"""The zero-shot evaluation's outputs: the printed report, the confusion-matrix / per-class AP PNG and strict
JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def format_report(result: dict[str, Any], max_rows: int | None = None) -> str:
    """The headline figure and a per-class table (class, n, accuracy or AP, prompt)."""
    key = "ap" if result["task"] == "multi-label" else "accuracy"
    name = "AP" if key == "ap" else "acc"
    lines = [
        f"{result['dataset']}: {result['task']}, {result['n_clips']} clips, {result['n_classes']} classes"
        + (f", {result['n_missing_files']} missing files" if result["n_missing_files"] else "")
        + (f", {result['n_failed_files']} unusable files skipped" if result["n_failed_files"] else "")
    ]
    if "clips" in result:
        unit = result.get("unit_seconds")
        lines.append(
            f"clips: cut from the start or zero-padded to EVAR's {unit:g} s unit"
            if unit
            else "clips: whole (--whole-clips, or a task without an EVAR unit)"
        )
    if result["n_clips"] == 0:
        lines.append("no clip could be evaluated")
        return "\n".join(lines)
    lines.append(f"{result['metric']}: {100 * result['score']:.2f}  (chance {100 * result['chance']:.2f})")
    if "mean_fold_accuracy" in result:
        folds = "  ".join(f"{f}:{100 * a:.1f}" for f, a in result["per_fold_accuracy"].items())
        lines.append(f"per fold: {folds}  (mean {100 * result['mean_fold_accuracy']:.2f})")
    if result.get("classes_without_positives"):
        lines.append(
            f"{len(result['classes_without_positives'])} class(es) without positives count as AP 0; "
            f"mAP over the others: {100 * result['mAP_classes_with_positives']:.2f}"
        )
    rows = result["per_class"]
    width = max([len("class")] + [len(r["class"]) for r in rows])
    lines.append(f"{'class':<{width}}  {'n':>6}  {name:>6}  prompt")
    for r in rows[:max_rows] if max_rows else rows:
        value = "   -  " if r[key] is None else f"{100 * r[key]:6.1f}"
        lines.append(f"{r['class']:<{width}}  {r['n']:>6}  {value}  {r['prompt']}")
    if max_rows and len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more classes in the JSON")
    return "\n".join(lines)


def require_matplotlib():
    """Import matplotlib with the Agg backend, or raise ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or install this suite with its 'plot' extra)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """A confusion-matrix PNG (single-label) or a per-class AP bar chart (multi-label)."""
    plt = require_matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = result["classes"]
    C = len(classes)
    size = min(4 + 0.3 * C, 40)
    if "confusion_matrix" in result:
        cm = np.asarray(result["confusion_matrix"], dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # rows: fraction of each true class
        fig, ax = plt.subplots(figsize=(size + 1.5, size))
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(C), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(C), classes, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if C <= 20:
            for i in range(C):
                for j in range(C):
                    if cm[i, j]:
                        ax.text(
                            j,
                            i,
                            int(cm[i, j]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black",
                        )
        fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
        title = f"{result['dataset']} zero-shot: accuracy {100 * result['score']:.1f}%"
    else:
        ap = [r["ap"] if r["ap"] is not None else 0.0 for r in result["per_class"]]
        fig, ax = plt.subplots(figsize=(8, min(2 + 0.22 * C, 120)))
        ax.barh(range(C), ap, color="tab:blue")
        ax.set_yticks(range(C), classes, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("average precision")
        title = f"{result['dataset']} zero-shot: mAP {100 * result['score']:.1f}%"
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def json_safe(obj: Any) -> Any:
    """NaN -> None, so the JSON is strict (json.dumps would write NaN)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
