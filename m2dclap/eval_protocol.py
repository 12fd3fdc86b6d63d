"""EVAR's per-task settings for linear evaluation: the unit length each known task's clips are cut to, and
the validation set drawn from train when a manifest has none.

    unit, why = unit_length("esc50", "auto", records)   # -> (5.0, "EVAR's unit for esc50")
    train, val = carve_val(train_ids, seed, labels=labels)  # 10 % of train holding every train class

EVAR (nttcslab/eval-audio-repr) cuts every clip of a task to one unit length, set per task in its configs;
a manifest of another task keeps the mean-duration rule (paper IV-A). Used by :mod:`m2dclap.linear_eval`.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Sequence

import numpy as np

from .data.manifest import Record
from .eval_features import mean_duration
from .probe import LinearEvalError

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # of train, drawn as validation when the manifest has no val split
MAX_VAL_DRAWS = 100  # draws of the validation set before giving up on holding every train class

# EVAR's unit length in seconds of each task it evaluates, by its task name
EVAR_UNIT_SECONDS = {
    "us8k": 4.0,
    "esc50": 5.0,
    "fsd50k": 7.6358,
    "gtzan": 30.0,
    "nsynth": 4.0,
    "cremad": 2.5,
    "spcv2": 1.0,
    "vc1": 8.2,
    "voxforge": 5.8,
    "surge": 4.0,
    "audioset": 10.0,  # EVAR's as20k / as2m
}
FOLD_TASKS = ("esc50", "us8k")  # tasks EVAR evaluates leaving one fold out at a time (5 and 10 folds)
# other spellings of the names above (compared without case, spaces, '-' and '_')
TASK_ALIASES = {"urbansound8k": "us8k", "speechcommands": "spcv2", "speechcommandsv2": "spcv2", "voxceleb1": "vc1"}


def task_name(name: str) -> str:
    """EVAR's name of task ``name`` (``ESC-50`` -> ``esc50``); :class:`LinearEvalError` naming the known tasks."""
    key = re.sub(r"[\s_\-]", "", name.lower())
    key = TASK_ALIASES.get(key, key)
    if key not in EVAR_UNIT_SECONDS:
        raise LinearEvalError(f"unknown task {name!r}; known: {', '.join(EVAR_UNIT_SECONDS)}")
    return key


def unit_length(
    task: str | None, unit_seconds: float | str | None, records: Sequence[Record]
) -> tuple[float | None, str]:
    """The clips' unit length in seconds (None: whole clips) and why: an explicit ``unit_seconds`` (a number;
    0 or None keeps clips whole) wins, then EVAR's unit of a known ``task``, else the records' mean duration."""
    if unit_seconds != "auto":
        return (float(unit_seconds) or None) if unit_seconds else None, "--unit-seconds"
    if task is not None:
        name = task_name(task)
        return EVAR_UNIT_SECONDS[name], f"EVAR's unit for {name}"
    return mean_duration(records), "mean clip duration of the manifest"


def carve_val(
    train_ids: Sequence[str],
    seed: int,
    fraction: float = VAL_FRACTION,
    labels: Mapping[str, Sequence[str]] | None = None,
    max_draws: int = MAX_VAL_DRAWS,
) -> tuple[list[str], list[str]]:
    """Move a seeded ``fraction`` of train (at least one clip) to validation; returns (train, val).

    With ``labels`` (id -> labels), the fraction is drawn again from the same seeded generator until every
    class of train appears in validation, as EVAR does; after ``max_draws`` draws the one holding the most
    classes is kept and a warning names the classes it lacks."""
    if len(train_ids) < 2:
        raise LinearEvalError(
            f"no val split and only {len(train_ids)} train clip(s): cannot carve a validation set; add a val split"
        )
    n_val = max(1, round(fraction * len(train_ids)))
    rng = np.random.default_rng(seed)
    classes = {c for i in train_ids for c in labels[i]} if labels is not None else set()
    best, best_missing = None, None
    for _ in range(max_draws if labels is not None else 1):
        val = set(rng.permutation(len(train_ids))[:n_val].tolist())
        missing = classes - {c for n in val for c in labels[train_ids[n]]} if labels is not None else set()
        if best is None or len(missing) < len(best_missing):
            best, best_missing = val, missing
        if not missing:
            break
    if best_missing:
        log.warning(
            "no val split: none of %d draws of %d validation clip(s) holds every train class; the best lacks %d: %s",
            max_draws,
            n_val,
            len(best_missing),
            ", ".join(sorted(best_missing)[:10]),
        )
    return ([t for i, t in enumerate(train_ids) if i not in best], [t for i, t in enumerate(train_ids) if i in best])


def fold_plans(folds: Mapping[str, str], ids: Sequence[str]) -> list[tuple[str, dict[str, list[str]]]]:
    """EVAR's leave-one-fold-out: for each fold (id -> fold name in ``folds``) of the clips ``ids``, that fold
    is test and the others train; val is empty (drawn from train by :func:`carve_val`)."""
    names = sorted({folds[i] for i in ids}, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    if len(names) < 2:
        raise LinearEvalError(f"leave-one-fold-out needs two folds or more, found {len(names)}: {names}")
    return [
        (f, {"train": [i for i in ids if folds[i] != f], "val": [], "test": [i for i in ids if folds[i] == f]})
        for f in names
    ]


def average_folds(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One figure from the runs of each fold (:func:`m2dclap.probe.train_over_seeds` plus ``fold``, ``chance``,
    ``val_from_train`` and the split sizes): scores averaged over the folds (a single run is returned as is,
    with its ``seeds``); with folds, ``fold_values`` and ``folds`` keep each fold's figures."""
    if len(parts) == 1:
        return dict(parts[0])
    mean = lambda k: float(np.mean([p[k] for p in parts]))  # noqa: E731
    out = {
        "metric": parts[0]["metric"],
        "value": mean("value"),
        "seed_values": np.mean([p["seed_values"] for p in parts], axis=0).tolist(),  # each seed's mean over folds
        "fold_values": {p["fold"]: p["value"] for p in parts},
        "chance": mean("chance"),
        "val_value": mean("val_value"),
        "epochs_run": max(p["epochs_run"] for p in parts),
        "best_epoch": max(p["best_epoch"] for p in parts),
        "stopped_early": all(p["stopped_early"] for p in parts),
        "maybe_unconverged": any(p["maybe_unconverged"] for p in parts),
        "val_from_train": any(p["val_from_train"] for p in parts),
        **{f"n_{s}": round(mean(f"n_{s}")) for s in ("train", "val", "test")},  # per fold, on average
        "folds": [{k: v for k, v in p.items() if k not in ("per_class_ap", "seeds")} for p in parts],
        "seeds": [dict(r, fold=p["fold"]) for p in parts for r in p["seeds"]],
    }
    if "per_class_ap" in parts[0]:
        out["per_class_ap"] = np.mean([p["per_class_ap"] for p in parts], axis=0)
    return out
