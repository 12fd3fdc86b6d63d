"""EVAR's per-task settings for linear evaluation: the unit length each known task's clips are cut to.

    unit, why = unit_length("esc50", "auto", records)   # -> (5.0, "EVAR's unit for esc50")

EVAR (nttcslab/eval-audio-repr) cuts every clip of a task to one unit length, set per task in its configs;
a manifest of another task keeps the mean-duration rule (paper IV-A). Used by :mod:`m2dclap.linear_eval`.
"""

from __future__ import annotations

import re
from typing import Sequence

from .data.manifest import Record
from .eval_features import mean_duration
from .probe import LinearEvalError

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
}
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
