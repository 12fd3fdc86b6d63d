"""The data of retrieval fine-tuning (``retrieval.finetune``): dataset specs such as ``clotho,audiocaps:val,m.csv``
read into captioned records, the training items (a random crop of a clip and one of its captions, seeded per
epoch for exact resume) and their collate, which drops unreadable clips and names them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

import m2dclap
from m2dclap.data.manifest import Record
from m2dclap.embed_files import load_clip

from .datasets import read_retrieval_dataset

log = logging.getLogger(__name__)

TRAIN_SPLITS = {"clotho": "development", "audiocaps": "train", "wavcaps": "", "manifest": "train", "synthetic": "train"}
VAL_SPLITS = {"clotho": "validation", "audiocaps": "val", "wavcaps": "", "manifest": "val", "synthetic": "val"}


def read_sets(cfg: Any, spec: str, splits: dict[str, str]) -> list[tuple[str, list[Record]]]:
    """``clotho,audiocaps:val,path/to/manifest.csv`` -> ``[(name, records)]``; missing clips are reported.
    ``cfg`` (a ``RetrievalFinetuneCfg``) gives the dataset roots and audio file name patterns."""
    roots = {
        "clotho": cfg.clotho_root,
        "audiocaps": cfg.audiocaps_root,
        "wavcaps": cfg.wavcaps_json,
        "synthetic": cfg.synthetic_root,
    }
    patterns = {"audiocaps": cfg.audiocaps_pattern, "wavcaps": cfg.wavcaps_pattern}
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, split = item.partition(":")
        if name in roots and name != "synthetic" and not roots[name]:
            flag = "--wavcaps-json" if name == "wavcaps" else f"--{name}-root"
            raise ValueError(f"dataset {name!r} in {spec!r} needs {flag}")
        if name not in roots:  # a manifest file, optionally manifest.csv:split
            path, split = (name, split) if Path(name).suffix.lower() in (".csv", ".jsonl") else (item, "")
            data = read_retrieval_dataset("manifest", path, split or splits["manifest"])
            if not data.records and not split:  # no such split: the rows without a split, never other splits'
                data = read_retrieval_dataset("manifest", path, "")
                data = dataclasses.replace(data, records=[r for r in data.records if r.split is None])
            label = Path(path).stem
        else:
            data = read_retrieval_dataset(
                name,
                roots[name] or None,
                split or splits[name],
                audio_dir=cfg.wavcaps_audio or None if name == "wavcaps" else None,
                audio_pattern=patterns.get(name),
            )
            label = f"{name}:{split or splits[name]}" if split or splits[name] else name
        records = [r for r in data.records if r.captions]
        if not records:
            raise ValueError(f"{item}: no captioned clips ({data.source}, {len(data.missing)} missing)")
        out.append((label, records))
    if not out:
        raise ValueError(f"no datasets in {spec!r}")
    return out


class CaptionedClips(Dataset):
    """Training items ``{"wave", "caption", "group"}``: a random crop of a clip and one of its captions.

    ``group`` identifies the audio file (the same file listed by two datasets shares it), so duplicates in a
    batch become positives. All randomness comes from ``(seed, epoch, index)``, so a resumed run repeats the
    interrupted one.
    """

    def __init__(
        self,
        records: Sequence[Record],
        sample_rate: int,
        crop_seconds: float,
        sample: str = "captions",
        seed: int = 0,
        on_bad_audio: str = "skip",
        min_samples: int = 1,
    ):
        if sample not in ("captions", "clips"):
            raise ValueError(f"sample must be 'captions' or 'clips', got {sample!r}")
        if on_bad_audio not in ("skip", "fail"):
            raise ValueError(f"on_bad_audio must be 'skip' or 'fail', got {on_bad_audio!r}")
        self.records, self.sample_rate = list(records), sample_rate
        self.crop = max(1, int(round(crop_seconds * sample_rate)))
        self.seed, self.epoch, self.on_bad_audio = seed, 0, on_bad_audio
        self.min_samples = min_samples  # shorter clips are bad audio, like undecodable ones
        groups: dict[str, int] = {}
        self.group = [groups.setdefault(str(Path(r.audio).resolve()), len(groups)) for r in self.records]
        if sample == "captions":
            self.items = [(i, c) for i, r in enumerate(self.records) for c in range(len(r.captions))]
        else:
            self.items = [(i, -1) for i in range(len(self.records))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip, cap = self.items[index]
        rec = self.records[clip]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            wave = load_clip(rec.audio, self.sample_rate, self.min_samples)
        except m2dclap.AudioError as e:
            if self.on_bad_audio == "fail":
                raise
            log.warning("skipping a bad clip: %s", e)
            return {"bad": str(rec.audio)}
        if wave.shape[0] > self.crop:
            start = int(rng.integers(0, wave.shape[0] - self.crop + 1))
            wave = wave[start : start + self.crop]
        caption = rec.captions[cap if cap >= 0 else int(rng.integers(len(rec.captions)))]
        return {"wave": wave, "caption": caption, "group": self.group[clip]}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Waves stay a list (lengths differ); unreadable items are dropped and listed under ``skipped``."""
    good = [it for it in items if "bad" not in it]
    return {
        "waves": [it["wave"] for it in good],
        "captions": [it["caption"] for it in good],
        "groups": torch.tensor([it["group"] for it in good], dtype=torch.long),
        "skipped": [it["bad"] for it in items if "bad" in it],
    }
