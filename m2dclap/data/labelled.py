"""Labelled (AudioSet-style, multi-label) manifests for stage-1.1 fine-tuning: the label column, the class
list and the dataset of log-mel crops with multi-hot targets."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ..config import FrontendCfg
from .datasets import AudioCaptionDataset, collate
from .manifest import ManifestError, Record, parse_labels, raw_columns, read_manifest

log = logging.getLogger(__name__)


def read_labelled(manifest: str | Path, label_column: str = "labels") -> list[Record]:
    """Manifest records whose ``labels`` come from ``label_column`` (``;``-separated, or a JSONL list)."""
    records = read_manifest(manifest)
    if label_column != "labels":
        cells, seen = raw_columns(manifest, (label_column,))
        if cells[label_column] is None:
            raise ManifestError(f"{manifest}: no {label_column!r} column for the labels (columns: {', '.join(seen)})")
        for rec, cell in zip(records, cells[label_column], strict=True):
            rec.labels = parse_labels(cell)
    return records


def class_list(train: Sequence[Record], classes_file: str = "") -> list[str]:
    """Class names: the file's lines in order, else the sorted union of the training labels."""
    if classes_file:
        names = [t.strip() for t in Path(classes_file).read_text(encoding="utf-8").splitlines() if t.strip()]
    else:
        names = sorted({lab for r in train for lab in r.labels})
    if not names:
        raise ValueError("no class labels in the training split: give a labels column (--label-column)")
    return names


class TaggingDataset(Dataset):
    """Log-mel crops (as :class:`AudioCaptionDataset`) with multi-hot ``target`` (C,) and a ``valid`` flag.

    In evaluation a bad clip becomes an all-zero input with ``valid=False`` instead of being dropped, so
    every process gathers batches of equal size; in training it is dropped and reported like in pretraining.
    """

    def __init__(
        self,
        records: Sequence[Record],
        classes: Sequence[str],
        frontend_cfg: FrontendCfg,
        frames: int,
        training: bool,
        on_bad_audio: str = "skip",
        seed: int = 0,
    ):
        index = {c: i for i, c in enumerate(classes)}
        self.n_classes, self.training, self.frames = len(classes), training, frames
        self.n_mels = frontend_cfg.n_mels
        self.labels = [[index[lab] for lab in r.labels if lab in index] for r in records]
        unknown = sum(lab not in index for r in records for lab in r.labels)
        if unknown:
            log.warning("%d label(s) outside the %d training classes are ignored", unknown, len(classes))
        plain = [dataclasses.replace(r, captions=[]) for r in records]  # captions play no part here
        self.base = AudioCaptionDataset(
            plain, frontend_cfg, frames, training=training, on_bad_audio=on_bad_audio, seed=seed
        )

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        if "bad" in item:
            if self.training:
                return item
            item = {
                "lms": torch.zeros(1, self.n_mels, self.frames),
                "index": int(index),
                "id": self.base.records[index].id,
                "valid": False,
            }
        target = torch.zeros(self.n_classes)
        target[self.labels[index]] = 1.0
        return {**item, "target": target, "valid": item.get("valid", True)}


def collate_tagging(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`collate` plus ``target`` (B, C) and ``valid`` (B,) of the kept items."""
    out = collate(batch)
    good = [b for b in batch if "bad" not in b]
    out["target"] = torch.stack([b["target"] for b in good]) if good else None
    out["valid"] = torch.tensor([bool(b["valid"]) for b in good], dtype=torch.bool)
    return out
