"""What a training run saves and where: the progress state that travels inside every checkpoint, the atomic
resumable checkpoints (``save_state`` into a temporary folder, marked complete, renamed) and the keep-best spec of
the models an evaluation metric selects. The training engine (``m2dclap.train.engine``) drives them."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator


class TrainState:
    """Progress saved with every checkpoint (``accelerator.register_for_checkpointing``): the step counter,
    the data position, skipped clips, every evaluation and the models kept by the selection metric."""

    def __init__(self) -> None:
        self.step, self.epoch, self.batch_in_epoch, self.skipped = 0, 0, 0, 0
        self.evals: list[dict[str, Any]] = []  # one entry per evaluation: epoch, step, train_loss, metrics
        self.kept: list[dict[str, Any]] = []  # the kept models, best first: score, step, epoch, folder

    @property
    def best(self) -> dict[str, Any] | None:
        return self.kept[0] if self.kept else None

    def state_dict(self) -> dict[str, Any]:
        # lists travel as JSON: accelerate reloads custom states with torch.load(weights_only=True)
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped": self.skipped,
            "evals": json.dumps(self.evals),
            "kept": json.dumps(self.kept),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.epoch = int(d["step"]), int(d["epoch"])
        self.batch_in_epoch, self.skipped = int(d["batch_in_epoch"]), int(d["skipped"])
        self.evals, self.kept = json.loads(d.get("evals", "[]")), json.loads(d.get("kept", "[]"))


class KeepBest:
    """Keep-best / top-k by a metric: ``folder(entry)`` names where a kept model goes, ``save(path, entry)``
    writes it. A kept folder that falls out of the top ``k`` is deleted; with one fixed name (``best``)
    a new best overwrites it."""

    def __init__(self, folder: Callable[[dict[str, Any]], Path], save: Callable[[Path, dict[str, Any]], None]):
        self.folder, self.save = folder, save


def _complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest step first; half-written ones have no readable
    ``state.json`` and are left out."""
    found = []
    for d in Path(root).glob("ckpt-*"):
        try:
            found.append((json.loads((d / "state.json").read_text())["step"], d))
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return [d for _, d in sorted(found, key=lambda sd: sd[0])]


def latest_checkpoint(out_dir: Path, checkpoint_dir: str = "checkpoints") -> Path | None:
    """The complete checkpoint with the highest saved step; half-written ones have no ``state.json``."""
    complete = _complete_checkpoints(Path(out_dir) / checkpoint_dir)
    return complete[-1] if complete else None


def save_checkpoint(accelerator: Accelerator, state: TrainState, root: Path, keep: int) -> None:
    """``save_state`` into a temporary folder, then mark and rename it, so a kill never leaves a
    checkpoint that looks complete."""
    tmp, final = root / f".tmp-ckpt-{state.step:08d}", root / f"ckpt-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(
            json.dumps({"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch})
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
