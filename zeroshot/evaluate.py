"""Zero-shot evaluation of a CLAP checkpoint on a classification dataset (the paper's Table VII protocol).

    python -m zeroshot.evaluate --checkpoint C --dataset esc50 --root ESC-50-master --out esc50.json --plot
    python -m zeroshot.evaluate --checkpoint C --dataset manifest --manifest corpus/manifest.csv --split test

Each class label becomes a prompt by the dataset's rule of the paper's Table VI ("dog can be heard",
"hiphop music can be heard", "angry person talking can be heard", ...) unless ``--template`` gives others
(repeat it for a prompt ensemble). Every readable clip is embedded (in batches, with a progress bar) and
scored against the class prompts by cosine similarity, softmax (single-label) or sigmoid (multi-label), as
EVAR does. Single-label tasks report accuracy (all folds pooled, as EVAR; per-fold figures too), multi-label
tasks the macro mAP (scikit-learn's ``average_precision_score`` figure). Also a per-class table, a JSON of
every figure with the exact prompts (``--out``) and a confusion-matrix PNG (``--plot``; a per-class AP chart
for multi-label tasks; needs matplotlib).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from m2dclap.cli import TEXT_MODEL_HELP, CliError, option, resolve_device, run_cli
from m2dclap.embed_files import report_skipped

from . import metrics
from .classifier import FilePredictions, ZeroShotClassifier
from .classify import load_model
from .datasets import DATASETS, DatasetError, ZeroShotDataset, read_zeroshot_dataset
from .templates import TemplateError, as_template_list

log = logging.getLogger(__name__)

PROG = "python -m zeroshot.evaluate"


# ----------------------------------------------------------------------------------------------- library


def score_predictions(
    dataset: ZeroShotDataset, classifier: ZeroShotClassifier, preds: FilePredictions
) -> dict[str, Any]:
    """Every figure of one evaluation: the headline metric with its chance level, per-class and per-fold
    figures, the confusion matrix (single-label) and the prompts."""
    clips = [dataset.clips[i] for i in preds.indices]
    probs = preds.probabilities.numpy()
    y = dataset.targets_of(clips)
    C = len(dataset.classes)
    result: dict[str, Any] = {
        "dataset": dataset.name,
        "task": "multi-label" if dataset.multi_label else "single-label",
        "n_clips": len(clips),
        "n_classes": C,
        "classes": dataset.classes,
        "prompts": {c: p for c, p in zip(dataset.classes, classifier.prompts)},
        "scale": classifier.scale,
        "missing_files": [str(p) for p in dataset.missing],
        "n_missing_files": len(dataset.missing),
        "failed_files": [{"path": str(p), "error": why} for p, why in preds.failed],
        "n_failed_files": len(preds.failed),
        # the figures are over the evaluated clips only: every clip left out, missing or unusable
        "n_skipped": len(dataset.missing) + len(preds.failed),
    }
    if not clips:
        result.update(metric="mAP" if dataset.multi_label else "accuracy", score=float("nan"))
        return result
    support = y.sum(0) if dataset.multi_label else np.bincount(y, minlength=C)
    if dataset.multi_label:
        mAP, ap, empty = metrics.mean_average_precision(y, probs)
        with_pos = [c for c in range(C) if c not in set(empty)]
        result.update(
            metric="mAP",
            score=mAP,
            mAP=mAP,
            mAP_classes_with_positives=float(np.mean(ap[with_pos])) if with_pos else float("nan"),
            classes_without_positives=[dataset.classes[c] for c in empty],
            # a random ranking's expected AP is about the class's prevalence
            chance=float(np.mean(support[with_pos] / len(clips))) if with_pos else float("nan"),
            per_class=[
                {
                    "class": dataset.classes[c],
                    "prompt": classifier.prompts[c][0],
                    "n": int(support[c]),
                    "ap": None if np.isnan(ap[c]) else float(ap[c]),
                }
                for c in range(C)
            ],
        )
        return result
    pred = probs.argmax(axis=1)
    cm = metrics.confusion_matrix(y, pred, C)
    per_class = metrics.per_class_accuracy(cm)
    acc = metrics.accuracy(probs, y)
    result.update(
        metric="accuracy",
        score=acc,
        accuracy=acc,
        chance=1.0 / C,
        per_class=[
            {
                "class": dataset.classes[c],
                "prompt": classifier.prompts[c][0],
                "n": int(support[c]),
                "accuracy": None if np.isnan(per_class[c]) else float(per_class[c]),
            }
            for c in range(C)
        ],
        confusion_matrix=cm.tolist(),
    )
    folds = sorted({c.fold for c in clips if c.fold is not None}, key=_fold_key)
    if len(folds) > 1:  # WavCaps averages per-fold accuracies; EVAR (and the headline figure) pools them
        per_fold = {f: float(np.mean([p == t for p, t, c in zip(pred, y, clips) if c.fold == f])) for f in folds}
        result["per_fold_accuracy"] = per_fold
        result["mean_fold_accuracy"] = float(np.mean(list(per_fold.values())))
    return result


def _fold_key(fold: str) -> tuple[int, Any]:
    return (0, int(fold)) if fold.isdigit() else (1, fold)


def evaluate(
    model,
    dataset: ZeroShotDataset,
    template=None,
    scale: float = 1.0,
    batch_size: int = 32,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Zero-shot evaluation of ``model`` on ``dataset``; returns :func:`score_predictions`'s figures."""
    clf = ZeroShotClassifier.from_dataset(model, dataset, template, scale)
    t0 = time.perf_counter()
    preds = clf.predict_files(
        [c.path for c in dataset.clips], batch_size=batch_size, progress=progress, workers=workers
    )
    result = score_predictions(dataset, clf, preds)
    result["templates"] = _templates_used(template, dataset)
    result["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return result


def _templates_used(template, dataset: ZeroShotDataset) -> list[str]:
    if not template:
        return [dataset.rule]
    return [template] if isinstance(template, str) else list(template)


def format_report(result: dict[str, Any], max_rows: int | None = None) -> str:
    """The headline figure and a per-class table (class, n, accuracy or AP, prompt)."""
    key = "ap" if result["task"] == "multi-label" else "accuracy"
    name = "AP" if key == "ap" else "acc"
    lines = [
        f"{result['dataset']}: {result['task']}, {result['n_clips']} clips, {result['n_classes']} classes"
        + (f", {result['n_missing_files']} missing files" if result["n_missing_files"] else "")
        + (f", {result['n_failed_files']} unusable files skipped" if result["n_failed_files"] else "")
    ]
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


def _json_safe(obj: Any) -> Any:
    """NaN -> None, so the JSON is strict (json.dumps would write NaN)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- CLI

LAYOUTS = """dataset layouts under --root:
  esc50     meta/esc50.csv (filename,fold,target,category,...), audio/<filename>; folds 1-5 pooled
  us8k      metadata/UrbanSound8K.csv (slice_file_name,...,fold,classID,class), audio/fold<N>/<file>
  gtzan     genres/<genre>/*.wav or genres_original/<genre>/*.wav; --split-file: relative paths to use
  nsynth    examples.json (note_str -> instrument_family_str) and audio/<note_str>.wav, in ROOT or
            ROOT/nsynth-<split>
  cremad    AudioWAV/<actor>_<sentence>_<ANG|DIS|FEA|HAP|NEU|SAD>_<level>.wav; --split-file: CSV file_name,split
  fsd50k    FSD50K.ground_truth/<split>.csv (fname,labels,mids) [+ vocabulary.csv], FSD50K.<split>_audio/
  audioset  --segments CSV (YTID, start_seconds, end_seconds, positive_labels), class_labels_indices.csv,
            audio at --audio-pattern
  manifest  the suite's CSV/JSONL manifest (audio, labels, split columns)
Missing audio files are listed and counted (an error with --strict); unusable ones (undecodable, empty,
NaN/Inf, shorter than one STFT window) are skipped and listed. Both are named on stderr and counted in the
JSON (n_skipped), since the figures leave them out: exit status 1, as when no clip could be evaluated."""


@dataclass(kw_only=True)
class EvaluateOptions:
    checkpoint: str = option(help="model folder, official .pth file or registered name")
    text_model: str | None = option(None, metavar="PATH", help=TEXT_MODEL_HELP)
    dataset: str = option(choices=DATASETS, help="which reader (layouts in zeroshot.datasets)")
    root: str | None = option(
        None, help="the dataset's folder (for manifest: where manifest.csv is, unless --manifest)"
    )
    manifest: str | None = option(
        None, group="manifest options", help="a suite manifest (.csv/.jsonl); default ROOT/manifest.csv"
    )
    label_column: str = option("labels", group="manifest options", help="the column holding ';'-separated labels")
    task: Literal["auto", "single", "multi"] = option(
        "auto",
        group="manifest options",
        help="single: first label is the class (accuracy); multi: all labels "
        "(mAP); auto: multi if any clip has several labels (default)",
    )
    split: str | None = option(
        None,
        group="dataset options",
        help="manifest split (default test; 'all' for every clip), NSynth split (test), "
        "FSD50K ground-truth file (eval), CREMA-D split in --split-file (test)",
    )
    split_file: str | None = option(
        None, group="dataset options", help="GTZAN: list of relative paths to use; CREMA-D: CSV with file_name,split"
    )
    folds: str | None = option(
        None, group="dataset options", help="ESC-50/US8K: comma-separated folds to use (default: all, pooled)"
    )
    segments: str | None = option(
        None, group="dataset options", help="AudioSet: segments CSV under ROOT (eval_segments.csv)"
    )
    class_index: str | None = option(
        None, group="dataset options", help="AudioSet: class_labels_indices.csv under ROOT"
    )
    audio_pattern: str | None = option(
        None,
        group="dataset options",
        help="AudioSet: audio path under ROOT, with {ytid} {start} {end} "
        "{start_ms} {end_ms} {start_s} {end_s} (audio/{ytid}.wav)",
    )
    strict: bool = option(False, group="dataset options", help="missing audio files are an error, not a warning")
    template: list[str] | None = option(
        None,
        append=True,
        group="prompts and scoring",
        help="a rule name (esc50, us8k, gtzan, nsynth, cremad, fsd50k, audioset, "
        "default) or a format string with {} or {label}; repeat for a prompt "
        "ensemble (default: the dataset's rule)",
    )
    scale: float = option(
        1.0,
        group="prompts and scoring",
        help="multiply cosine similarities before softmax/sigmoid (1 = EVAR; metrics do not change)",
    )
    batch_size: int = option(32, minimum=1, group="running", help="clips per model call")
    workers: int | None = option(
        None,
        minimum=0,
        group="running",
        help="audio readers (default: m2dclap.embed_files' choice, reader processes when "
        "there are more than two cores, else one thread; 0: in the main process)",
    )
    device: str | None = option(None, group="running", help="cpu, cuda, cuda:1 (default: cuda if available)")
    limit: int | None = option(None, group="running", help="evaluate only the first N clips (smoke tests)")
    out: str | None = option(
        None, group="running", help="write every figure, the prompts and the skipped files to this JSON"
    )
    plot: str | None = option(
        None,
        const="",
        metavar="PNG",
        group="running",
        help="save a confusion matrix (multi-label: per-class AP) PNG; default path: --out "
        "with .png, else zeroshot_<dataset>.png",
    )
    quiet: bool = option(False, group="running", help="no progress bar or info messages")


def _dataset_from_args(args: EvaluateOptions) -> ZeroShotDataset:
    name = args.dataset
    folds = [f for f in args.folds.split(",") if f.strip()] if args.folds else None
    if name == "manifest":
        if not args.manifest and not args.root:
            raise DatasetError("--dataset manifest needs --manifest M or --root DIR (holding manifest.csv)")
        manifest = Path(args.manifest) if args.manifest else Path(args.root) / "manifest.csv"
        return read_zeroshot_dataset(
            name,
            manifest,
            label_column=args.label_column,
            split=args.split or "test",
            task=args.task,
            strict=args.strict,
        )
    if not args.root:
        raise DatasetError(f"--dataset {name} needs --root (the dataset's folder)")
    root = Path(args.root)
    kw: dict[str, Any] = {"strict": args.strict}
    if name in ("esc50", "us8k"):
        kw["folds"] = folds
    elif name == "gtzan":
        kw["split_file"] = args.split_file
    elif name == "nsynth":
        kw["split"] = args.split
    elif name == "cremad":
        kw.update(split_file=args.split_file, split=args.split)
    elif name == "fsd50k":
        kw["split"] = args.split
    elif name == "audioset":
        kw.update(segments=args.segments, class_index=args.class_index, audio_pattern=args.audio_pattern)
    return read_zeroshot_dataset(name, root, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, EvaluateOptions, argv, prog=PROG, description=__doc__, epilog=LAYOUTS)


def run(opts: EvaluateOptions) -> int:
    if opts.plot is not None:
        try:
            require_matplotlib()
        except ImportError as e:
            raise CliError(str(e)) from None
    try:
        if opts.template:
            as_template_list(opts.template)
        dataset = _dataset_from_args(opts)
    except (DatasetError, TemplateError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    if opts.limit is not None:
        dataset.clips = dataset.clips[: max(0, opts.limit)]
    device = resolve_device(opts.device)
    log.info(
        "%s: %d clips, %d classes (%s)",
        dataset.name,
        len(dataset.clips),
        len(dataset.classes),
        "multi-label" if dataset.multi_label else "single-label",
    )
    if not dataset.clips:
        raise CliError(f"{dataset.name}: no clip to evaluate")
    try:
        model = load_model(opts.checkpoint, device, opts.text_model)
        result = evaluate(model, dataset, opts.template, opts.scale, opts.batch_size, not opts.quiet, opts.workers)
    except (OSError, RuntimeError) as e:  # RuntimeError: e.g. a checkpoint without a text encoder
        raise CliError(str(e)) from None
    result["checkpoint"] = str(opts.checkpoint)
    print(format_report(result))
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(result), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if opts.plot is not None and result["n_clips"]:
        png = (
            Path(opts.plot)
            if opts.plot
            else Path(opts.out).with_suffix(".png")
            if opts.out
            else Path(f"zeroshot_{dataset.name}.png")
        )
        print(f"wrote {plot(result, png)}")
    left_out = [(str(p), f"{p}: missing") for p in dataset.missing]
    left_out += [(f["path"], f["error"]) for f in result["failed_files"]]
    rc = report_skipped(left_out, what="clip", stream=sys.stderr)
    return rc if result["n_clips"] else 1


if __name__ == "__main__":
    sys.exit(main())
