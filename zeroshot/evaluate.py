"""Zero-shot evaluation of a CLAP checkpoint on a classification dataset, with EVAR's protocol (the official
evaluation package behind the paper's Table VII).

    python -m zeroshot.evaluate --checkpoint C --dataset esc50 --root ESC-50-master --out esc50.json --plot
    python -m zeroshot.evaluate --checkpoint C --dataset manifest --manifest corpus/manifest.csv --split test

EVAR's protocol: classes sorted by label; each test clip cut from its start or zero-padded to the task's unit
(ESC-50 5.0 s, US8K 4.0, GTZAN 30, NSynth 4.0, CREMA-D 2.5, FSD50K 7.6358, AudioSet 10) before encoding;
ESC-50 and US8K folds pooled; GTZAN's fault-filtered test list (``test_filtered.txt`` in --root or
``--split-file``) and CREMA-D's test speakers (1,551 of 7,438 clips). Departing from it: ``--split all``
(GTZAN, CREMA-D) scores every clip; ``--whole-clips`` encodes whole clips (manifests always
are); the table and the JSON (``clips``, ``unit_seconds``) say which ran.

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
from m2dclap.eval_protocol import EVAR_UNIT_SECONDS as ALL_EVAR_UNITS

from . import metrics
from .classifier import FilePredictions, ZeroShotClassifier
from .classify import load_model
from .datasets import DATASETS, DatasetError, ZeroShotDataset, read_zeroshot_dataset
from .report import format_report, json_safe, plot, require_matplotlib
from .templates import TemplateError, as_template_list

log = logging.getLogger(__name__)

PROG = "python -m zeroshot.evaluate"
# EVAR's unit length of each zero-shot task (seconds), from the one table the linear evaluation uses too: every
# test clip is cut to it from the start or padded with zeros
EVAR_UNIT_SECONDS = {k: v for k, v in ALL_EVAR_UNITS.items() if k in DATASETS}


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
    whole_clips: bool = False,
) -> dict[str, Any]:
    """Zero-shot evaluation of ``model`` on ``dataset``; returns :func:`score_predictions`'s figures.

    Each clip of a known task is cut from its start or zero-padded to the task's EVAR unit
    (``EVAR_UNIT_SECONDS``) before encoding; ``whole_clips`` (and any other task) encodes whole clips.
    ``result["clips"]`` says which ran."""
    clf = ZeroShotClassifier.from_dataset(model, dataset, template, scale)
    unit_seconds = None if whole_clips else EVAR_UNIT_SECONDS.get(dataset.name)
    unit_samples = round(unit_seconds * model.sample_rate) if unit_seconds else None
    t0 = time.perf_counter()
    preds = clf.predict_files([c.path for c in dataset.clips], batch_size, progress, workers, unit_samples=unit_samples)
    result = score_predictions(dataset, clf, preds)
    result["clips"] = "evar-unit" if unit_seconds else "whole"
    result["unit_seconds"] = unit_seconds
    result["templates"] = _templates_used(template, dataset)
    result["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return result


def _templates_used(template, dataset: ZeroShotDataset) -> list[str]:
    if not template:
        return [dataset.rule]
    return [template] if isinstance(template, str) else list(template)


# ----------------------------------------------------------------------------------------------- CLI

LAYOUTS = """dataset layouts under --root:
  esc50     meta/esc50.csv (filename,fold,target,category,...), audio/<filename>; folds 1-5 pooled
  us8k      metadata/UrbanSound8K.csv (slice_file_name,...,fold,classID,class), audio/fold<N>/<file>
  gtzan     genres/<genre>/*.wav or genres_original/<genre>/*.wav and test_filtered.txt (EVAR's split; or
            --split-file: relative paths to use; --split all: every clip)
  nsynth    examples.json (note_str -> instrument_family_str) and audio/<note_str>.wav, in ROOT or
            ROOT/nsynth-<split>
  cremad    AudioWAV/<actor>_<sentence>_<ANG|DIS|FEA|HAP|NEU|SAD>_<level>.wav; EVAR's test speakers (or
            --split-file: CSV file_name,split; --split all: every clip)
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
        help="manifest split (default test; 'all' for every clip), NSynth split (test), FSD50K ground-truth "
        "file (eval), GTZAN/CREMA-D split (test, EVAR's; 'all' for every clip departs from EVAR)",
    )
    split_file: str | None = option(
        None,
        group="dataset options",
        help="GTZAN: list of relative paths to use (default ROOT/<split>_filtered.txt, EVAR's fault-filtered "
        "split); CREMA-D: CSV with file_name,split (default: EVAR's test speakers)",
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
    whole_clips: bool = option(
        False,
        group="prompts and scoring",
        help="encode whole clips (departs from EVAR, which cuts each test clip from its start or pads it to the "
        "task's unit: " + ", ".join(f"{k} {v:g} s" for k, v in EVAR_UNIT_SECONDS.items()) + "; manifests: whole)",
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
        kw.update(split_file=args.split_file, split=args.split)
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
        result = evaluate(
            model, dataset, opts.template, opts.scale, opts.batch_size, not opts.quiet, opts.workers, opts.whole_clips
        )
    except (OSError, RuntimeError) as e:  # RuntimeError: e.g. a checkpoint without a text encoder
        raise CliError(str(e)) from None
    result["checkpoint"] = str(opts.checkpoint)
    print(format_report(result))
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe(result), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
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
