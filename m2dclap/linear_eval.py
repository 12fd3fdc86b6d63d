"""Linear evaluation of frozen clip features (paper IV-B1): EVAR's protocol, with EVAR's per-task units.

    python -m m2dclap.linear_eval --checkpoint CKPT --data manifest.csv --task esc50 --out results.json --cache feats/

Each clip of the manifest becomes its clip feature z'' (``model.audio_features(...)['clip']``, (F'*D,), 3840-d
for ViT-B), extracted once and cached. As in EVAR (paper IV-A: "we randomly cropped or zero-padded the average
audio length"), every clip is first cut to one unit length: zeros appended when shorter; when longer, a
random crop (seeded per clip) for train and val and the first unit for test, as EVAR's test loader. The
unit is EVAR's for the task named by ``--task`` (esc50 5 s, us8k 4 s, ...: :mod:`m2dclap.eval_protocol`),
else the mean duration of the manifest's clips, unless ``--unit-seconds`` says otherwise (``0`` keeps every
clip whole; the encoder then averages over its chunks). The features are standardised with the mean and
standard deviation of train and val together and a single linear layer is trained on them with Adam
(lr 3e-5, weight decay 1e-8) for up to 200 epochs; the epoch with the best validation score is kept (early
stopping, patience 20, an equal score counting as better) and scored on test.

Single-label tasks (every row has one label) use cross-entropy and report accuracy. Multi-label tasks (any
row has several ``;``-separated labels) use binary cross-entropy and report macro mAP: the average precision
of each class averaged over all classes, a class without a positive in the scored split counting 0 (EVAR's
figure with current scikit-learn).

Without a val split, 10 % of train is drawn (seeded) as validation, again until it holds every train class.
The probe is trained with three seeds and their test scores averaged. ESC-50 and US8K are scored leaving one
fold out at a time (``--folds``, automatic with ``--task esc50``/``us8k`` and a ``fold`` column), the
folds' scores averaged. Options that depart from EVAR's protocol: ``--unit-seconds`` (and a manifest of a
task EVAR does not evaluate, which gets the mean-duration unit), ``--seeds`` other than 3, and ``--epochs``,
``--patience``, ``--lr``, ``--probe-batch-size`` other than their defaults.

Library use::

    result = linear_eval("ckpt/", "manifest.csv", cache_dir="feats/")
    probe = train_linear_probe(x_train, y_train, x_val, y_val)   # features already at hand (m2dclap.probe)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import eval_protocol as protocol
from .cli import CliError, UsageError, option, resolve_device, run_cli
from .data.manifest import SPLITS, ManifestError, Record, atomic_write_text, parse_labels, raw_columns, read_manifest
from .embed_files import report_skipped

# clip features and their cache live in m2dclap.eval_features; their names stay importable from here
from .eval_features import Features, clip_features, extract_clip_features, fit_to_unit, mean_duration  # noqa: F401
from .eval_protocol import carve_val

# the probe lives in m2dclap.probe; its names stay importable from here
from .probe import (  # noqa: F401
    LinearEvalError,
    chance_level,
    cpu_threads,
    score_predictions,
    target_matrix,
    train_linear_probe,
    train_over_seeds,
)

log = logging.getLogger(__name__)

_SPLIT_ALIASES = {"valid": "val", "validation": "val"}  # as the manifest reader


# ---------------------------------------------------------------------------------------------------
# Labels and splits from the manifest
# ---------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """The labelled clips of a manifest, by split."""

    records: list[Record]  # every record of the manifest, in order (all get features)
    labels: dict[str, list[str]]  # id -> labels, for records with labels and a split
    splits: dict[str, str]  # id -> "train" | "val" | "test"
    n_unlabelled: int  # records with a split but no labels (left out)
    n_no_split: int  # records with labels but no split (left out)

    @property
    def multilabel(self) -> bool:
        return any(len(v) > 1 for v in self.labels.values())

    def ids(self, split: str) -> list[str]:
        return [r.id for r in self.records if self.splits.get(r.id) == split and r.id in self.labels]


def _fold(cell: Any) -> str | None:
    text = "" if cell is None else str(cell).strip()
    return text.removesuffix(".0") if text else None  # a fold read as a float: 1.0 -> "1"


def _parse_split(cell: Any, path: Path, rec: Record) -> str | None:
    if cell is None or not str(cell).strip():
        return None
    s = _SPLIT_ALIASES.get(str(cell).strip().lower(), str(cell).strip().lower())
    if s not in SPLITS:
        raise LinearEvalError(f"{path}: clip {rec.id!r} has split {cell!r}; use one of {', '.join(SPLITS)}")
    return s


def read_task(
    manifest: str | Path, label_column: str = "labels", split_column: str = "split", folds: bool = False
) -> Task:
    """Read labels and splits from ``manifest``; raise :class:`LinearEvalError` for a missing column,
    a manifest without labels, or an empty train or test split. ``folds``: ``split_column`` holds fold names
    (any value), kept as the splits."""
    path = Path(manifest)
    records = read_manifest(path)
    if not records:
        raise LinearEvalError(f"{path}: the manifest has no rows")
    raw, seen = raw_columns(path, (label_column, split_column))
    raw_labels, raw_splits = raw[label_column], raw[split_column]
    for column, cells in ((label_column, raw_labels), (split_column, raw_splits)):
        if cells is None:
            raise LinearEvalError(
                f"{path}: no {column!r} column (columns: {', '.join(seen)}); "
                f"name the {'label' if column == label_column else 'split'} column with "
                f"--{'label' if column == label_column else 'split'}-column"
            )
    labels, splits = {}, {}
    n_unlabelled = n_no_split = 0
    for rec, lab_cell, split_cell in zip(records, raw_labels, raw_splits):
        labs = parse_labels(lab_cell)
        split = _fold(split_cell) if folds else _parse_split(split_cell, path, rec)
        n_unlabelled += bool(split and not labs)
        n_no_split += bool(labs and not split)
        if labs and split:
            labels[rec.id], splits[rec.id] = list(dict.fromkeys(labs)), split
    if not labels:
        raise LinearEvalError(
            f"{path}: no clip has both labels in column {label_column!r} and a split in "
            f"column {split_column!r}; nothing to evaluate"
        )
    task = Task(records, labels, splits, n_unlabelled, n_no_split)
    if not folds:
        check_splits(task, path)
    if n_unlabelled or n_no_split:
        log.warning("%s: left out %d clip(s) without labels and %d without a split", path, n_unlabelled, n_no_split)
    return task


def check_splits(task: Task, where: Path | str, bad: set[str] = frozenset()) -> None:
    """Train and test must hold labelled clips (after dropping ``bad`` ids); val may be carved from train."""
    for split in ("train", "test"):
        if not [i for i in task.ids(split) if i not in bad]:
            extra = " once the unreadable clips are left out" if bad else ""
            raise LinearEvalError(f"{where}: the {split} split is empty{extra} (no labelled clip has split {split!r})")


# ---------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------
def linear_eval(
    checkpoint: str | Path,
    manifest: str | Path,
    label_column: str = "labels",
    split_column: str = "split",
    batch_size: int = 16,
    epochs: int = 200,
    patience: int = 20,
    lr: float = 3e-5,
    probe_batch_size: int = 200,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool | None = None,
    unit_seconds: float | str | None = "auto",
    task_name: str | None = None,
    n_seeds: int = 3,
    folds: bool | None = None,
    fold_column: str = "fold",
) -> dict[str, Any]:
    """Linear evaluation of ``checkpoint``'s clip features on ``manifest``; returns the result dict.
    ``unit_seconds``: the clips' common length (``"auto"``: EVAR's unit of ``task_name`` when it names a task
    EVAR evaluates, else their mean duration; None or 0: whole clips). ``folds``: leave one fold of
    ``fold_column`` out at a time and average (None: when ``task_name`` is esc50 or us8k and the column exists)."""
    evar_task = None if task_name is None else protocol.task_name(task_name)
    if folds is None:  # EVAR's folds for its fold tasks when the manifest has the column
        folds = evar_task in protocol.FOLD_TASKS and raw_columns(manifest, (fold_column,))[0][fold_column] is not None
    task = read_task(manifest, label_column, fold_column if folds else split_column, folds=folds)
    unit_seconds, unit_rule = protocol.unit_length(evar_task, unit_seconds, task.records)
    every = [r.id for r in task.records]

    def features(from_start: Sequence[str]) -> tuple[Features, dict[str, Any]]:
        args = (cache_dir, batch_size, device, progress, unit_seconds, seed)
        return clip_features(checkpoint, manifest, task.records, *args, from_start=from_start)

    # a fold's test clips are cropped from the start, its train clips at random: two sets of features
    feats, info = features(() if folds else task.ids("test"))
    feats_test = features(every)[0] if folds and unit_seconds else feats
    have = set(feats.ids) & set(feats_test.ids)
    multilabel = task.multilabel
    classes = sorted({lab for i in task.labels if i in have for lab in task.labels[i]})
    if folds:
        plans = protocol.fold_plans(task.splits, [i for i in every if i in have and i in task.labels])
    else:
        check_splits(task, manifest, {i for i in every if i not in have})
        plans = [(None, {s: [i for i in task.ids(s) if i in have] for s in SPLITS})]
    t0 = time.perf_counter()
    parts = []
    for fold, ids in plans:
        carved = not ids["val"]
        if carved:
            ids["train"], ids["val"] = carve_val(ids["train"], seed, labels=task.labels)
            log.info("no val split: %d of the train clips serve as validation", len(ids["val"]))
        x = {s: (feats_test if s == "test" else feats).rows(ids[s]) for s in SPLITS}
        y = {s: target_matrix(ids[s], task.labels, classes, multilabel) for s in SPLITS}
        unseen = sorted(
            {c for i in ids["test"] for c in task.labels[i]} - {c for i in ids["train"] for c in task.labels[i]}
        )
        if unseen:
            log.warning("test labels never seen in train: %s", ", ".join(unseen[:10]))
        with cpu_threads(1):
            runs = train_over_seeds(
                x,
                y,
                [seed + k for k in range(n_seeds)],
                n_classes=len(classes),
                epochs=epochs,
                patience=patience,
                lr=lr,
                batch_size=probe_batch_size,
                device=device or "cpu",
            )
        runs |= {"fold": fold, "chance": chance_level(y["train"], y["test"]), "val_from_train": carved}
        parts.append(runs | {f"n_{s}": len(ids[s]) for s in SPLITS})
    runs = protocol.average_folds(parts)
    if runs["maybe_unconverged"]:  # still improving at the cap: the figure understates the features
        log.warning(
            "the best validation epoch is %d of at most %d: the probe may not have converged; "
            "raise --epochs or --lr (the paper's lr 3e-5 is slow on small sets)",
            runs["best_epoch"],
            epochs,
        )
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": str(manifest),
        "label_column": label_column,
        "split_column": fold_column if folds else split_column,
        "task": "multi-label" if multilabel else "single-label",
        **{k: v for k, v in runs.items() if k not in ("per_class_ap", "fold", "seeds")},  # value: mean over seeds
        "n_classes": len(classes),
        "classes": classes,
        "feature_dim": int(feats.clip.shape[1]),
        "n_bad": len({p for p, _ in feats.bad + feats_test.bad}),
        "bad_files": [{"path": p, "error": e} for p, e in dict(feats.bad + feats_test.bad).items()],
        "n_unlabelled": task.n_unlabelled,
        "n_no_split": task.n_no_split,
        "epochs": epochs,
        "patience": patience,
        "lr": lr,
        "probe_batch_size": probe_batch_size,
        "seed": seed,  # of the crops and the val draw; the probe's seeds are seed, seed + 1, ...
        "n_seeds": n_seeds,
        "evar_task": evar_task,
        "unit_rule": unit_rule,  # why the clips were cut to unit_seconds
        **info,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "seeds": runs["seeds"],  # each seed's figures and history (of each fold)
    }
    if multilabel:
        ap = runs["per_class_ap"]
        result["n_classes_scored"] = int((~np.isnan(ap)).sum())
        result["classes_without_positive"] = [c for c, a in zip(classes, ap) if np.isnan(a)]  # AP 0 in the mean
        result["per_class_ap"] = {c: float(a) for c, a in zip(classes, ap) if not np.isnan(a)}
    return result


def format_result(result: dict[str, Any]) -> str:
    """One line: the metric, its chance level, the epochs, the split sizes and the skipped files."""
    val = " (carved from train)" if result["val_from_train"] else ""
    bad = f"; {result['n_bad']} unreadable file(s) skipped" if result["n_bad"] else ""
    unit = f"{result['unit_seconds']:.4g} s" if result.get("unit_seconds") else "whole clips"
    unit = f"; unit {unit} ({result.get('unit_rule', '--unit-seconds')})"
    values = result.get("seed_values") or [result["value"]]
    folds = f", mean of {len(result['fold_values'])} folds" if result.get("fold_values") else ""
    seeds = f", mean of {len(values)} seeds: {' '.join(f'{v:.4f}' for v in values)}" if len(values) > 1 else ""
    return (
        f"linear eval {result['metric']} {result['value']:.4f}{folds}{seeds} (chance {result['chance']:.4f}){unit}; "
        f"epochs run {result['epochs_run']}, best epoch {result['best_epoch']}"
        f"{' (in the last tenth of --epochs: may not have converged)' if result.get('maybe_unconverged') else ''}; "
        f"train {result['n_train']} / val {result['n_val']}{val} / test {result['n_test']}{bad}"
    )


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
PROG = "python -m m2dclap.linear_eval"
DESCRIPTION = (
    "Linear evaluation of frozen M2D / M2D-CLAP clip features (paper IV-B1) with EVAR's protocol and its "
    "per-task units (--task): clips cut to the task's unit (test from the start), features standardised on "
    "train+val, one linear layer, Adam (weight decay 1e-8), early stopping on val (drawn from train when "
    "absent), three seeds averaged, leave-one-fold-out for esc50/us8k. Departing from it: --unit-seconds, "
    "--seeds other than 3, --epochs/--patience/--lr/--probe-batch-size other than the defaults, and a task "
    "EVAR does not evaluate (unit: the mean clip duration). Accuracy for single-label "
    "tasks, macro mAP over all classes when any clip has several ';'-separated labels (a class without a "
    "positive in the test split scores 0, as EVAR with current scikit-learn). Clips that cannot be read "
    "(undecodable, empty, NaN/Inf, or too short when --unit-seconds 0) are skipped and named on stderr "
    "and in the result."
)


@dataclass(kw_only=True)
class LinearEvalOptions:
    checkpoint: str = option(
        aliases="-c", help="model: a save_pretrained folder, an official .pth file, or a registered pretrained name"
    )
    data: str = option(metavar="MANIFEST", help="manifest (.csv or .jsonl) with splits")
    label_column: str = option("labels", help="column holding the labels (default: labels)")
    split_column: str = option(
        "split",
        help="column holding train/val/test (default: split); without a val split, 10%% of train (seeded) "
        "validates, drawn again until it holds every train class (EVAR)",
    )
    batch_size: int = option(16, minimum=1, help="clips per model call (default: 16)")
    probe_batch_size: int = option(
        200, minimum=1, help="mini-batch of the linear layer's training, capped at the train size (default: 200)"
    )
    epochs: int = option(
        200,
        minimum=1,
        help="most training epochs (default: 200); a best epoch in the last "
        "tenth of them is reported as possibly unconverged",
    )
    patience: int = option(20, minimum=1, help="early-stopping patience in epochs (default: 20)")
    lr: float = option(3e-5, help="Adam learning rate (default: 3e-5)")
    out: Path | None = option(None, metavar="JSON", help="write the full result here")
    cache: Path | None = option(
        None,
        metavar="DIR",
        help="keep the extracted features here (one .npz per checkpoint and manifest) and reuse them",
    )
    unit_seconds: str = option(
        "auto",
        metavar="auto|S",
        help="cut every clip to this length first, as EVAR does: zeros appended, or a crop (random for "
        "train/val, from the start for test) (default auto: EVAR's unit of --task, else the mean clip "
        "duration of the manifest; 0: whole clips)",
    )
    task: str | None = option(
        None,
        metavar="NAME",
        help="the EVAR task the manifest holds, for its unit length: "
        + ", ".join(f"{k} {v:g} s" for k, v in protocol.EVAR_UNIT_SECONDS.items())
        + " (default: none; the mean clip duration)",
    )
    seed: int = option(0, help="seed of the crops and the val draw; the probe's seeds are SEED, SEED+1, ...")
    folds: bool = option(
        False,
        help="leave one fold of --fold-column out at a time as test (val drawn from the other folds) and average "
        "the folds' scores, as EVAR for ESC-50 (5 folds) and US8K (10); automatic with --task esc50/us8k when "
        "the column exists",
    )
    fold_column: str = option("fold", help="column holding each clip's fold (default: fold)")
    seeds: int = option(
        3, minimum=1, metavar="N", help="train the probe with N seeds and average their scores (default: 3, EVAR)"
    )
    device: str | None = option(None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    quiet: bool = option(False, aliases="-q", help="only warnings; no progress bar")


def _unit_seconds(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--unit-seconds must be 'auto' or a number of seconds, not {text!r}") from None
    if not value >= 0:
        raise UsageError("--unit-seconds must not be negative")
    return value


def run(opts: LinearEvalOptions) -> int:
    """The command: checks the options, evaluates, prints the result line; 1 when clips were skipped."""
    if not opts.lr > 0:
        raise UsageError("--lr must be positive")
    unit_seconds = _unit_seconds(opts.unit_seconds)
    if opts.task is not None:
        try:
            protocol.task_name(opts.task)
        except ValueError as e:
            raise UsageError(f"--task: {e}") from None
    device = resolve_device(opts.device)
    try:
        result = linear_eval(
            opts.checkpoint,
            opts.data,
            opts.label_column,
            opts.split_column,
            opts.batch_size,
            opts.epochs,
            opts.patience,
            opts.lr,
            opts.probe_batch_size,
            opts.cache,
            opts.seed,
            device,
            progress=False if opts.quiet else None,
            unit_seconds=unit_seconds,
            task_name=opts.task,
            n_seeds=opts.seeds,
            folds=True if opts.folds else None,
            fold_column=opts.fold_column,
        )
    except (LinearEvalError, ManifestError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(opts.out, json.dumps(result, indent=2) + "\n")
    print(format_result(result))
    # the figures leave these clips out: exit 1 so that a script notices
    return report_skipped([(b["path"], b["error"]) for b in result["bad_files"]], what="clip", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, LinearEvalOptions, argv, prog=PROG, description=DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
