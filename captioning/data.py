"""Captioning datasets over the ``captioning.preprocess`` cache (``index.csv`` + ``tokens/`` + ``clap/``).

* Training (EnCLAP ``data/collator.py`` style): one item per (clip, caption) pair, every caption once per
  epoch (or, with ``captions="one"``, one item per clip with a caption drawn per epoch), each with a random
  crop of at most ``max_frames`` codec frames (1021 for BART's 1024 positions), seeded by epoch and item so
  runs are reproducible and resumable.
* Evaluation: the first ``max_frames`` frames (EnCLAP truncates from the start) and every reference caption.

``collate`` pads tokens with the codec pad id 1024 to (B, 16, T_max), returns the right-padded
``token_mask`` (B, T_max), ``clap`` (B, D), the captions and ids; labels are made by the model's tokenizer
(``model.tokenize_captions``), via :func:`make_collate`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from m2dclap.fileio import csv_dicts

PAD_CODE = 1024
MAX_FRAMES = 1021


@dataclass
class CachedClip:
    id: str
    split: str
    tokens: Path
    clap: Path
    captions: list[str]
    audio: str = ""


def read_index(path: str | Path, split: str | Sequence[str] | None = None) -> list[CachedClip]:
    """Clips listed in a preprocess ``index.csv`` (or the cache folder holding it), optionally one split."""
    path = Path(path)
    if path.is_dir():
        path = path / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no preprocess index; run `python -m captioning.preprocess` first")
    root = path.parent
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    out = []
    header, rows = csv_dicts(path)  # bad bytes or rows: a ValueError naming the file and the line
    need = {"id", "tokens", "clap"}
    if not need <= set(header):
        raise ValueError(f"{path}: not a preprocess index (needs columns {sorted(need)})")
    cols = sorted((c for c in header if re.fullmatch(r"caption_\d+", c)), key=lambda c: int(c.split("_")[1]))
    for _, row in rows:
        s = row.get("split") or ""
        if splits is not None and s not in splits:
            continue
        caps = [row[c].strip() for c in cols if row[c].strip()]
        out.append(CachedClip(row["id"], s, root / row["tokens"], root / row["clap"], caps, row.get("audio", "")))
    return out


CAPTION_SAMPLING = ("all", "one")


class CaptionDataset(Dataset):
    """Items ``{"id", "tokens" (16, T) long, "clap" (D,) float, "caption" str, "captions" list[str]}``.

    Training items are ``(clip, caption)`` pairs, every caption once per epoch, as EnCLAP's training CSVs have
    one row per caption (``captions="all"``), or one item per clip with a caption drawn per epoch
    (``captions="one"``); clips longer than ``max_frames`` get a random crop per item and epoch. Evaluation
    items are clips (first ``max_frames`` frames, every reference caption).
    """

    def __init__(
        self,
        clips: Sequence[CachedClip],
        training: bool,
        max_frames: int = MAX_FRAMES,
        seed: int = 0,
        captions: str = "all",
    ):
        if captions not in CAPTION_SAMPLING:
            raise ValueError(f"captions must be one of {CAPTION_SAMPLING}, not {captions!r}")
        self.clips = [c for c in clips if (c.captions or not training)]
        if training and not self.clips:
            raise ValueError("no training clips with captions")
        self.training, self.max_frames, self.seed = training, int(max_frames), int(seed)
        self.sampling = captions if training else "one"
        # (clip index, caption index or -1 for "draw one")
        self.items = (
            [(ci, k) for ci, c in enumerate(self.clips) for k in range(len(c.captions))]
            if self.sampling == "all"
            else [(ci, -1) for ci in range(len(self.clips))]
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        ci, k = self.items[i]
        c = self.clips[ci]
        codes = np.load(c.tokens, mmap_mode="r")  # (16, T) int16: only the crop is read and converted
        clap = torch.from_numpy(np.load(c.clap).astype(np.float32))
        T, start = codes.shape[1], 0
        if self.training:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            caption = c.captions[k] if k >= 0 else c.captions[int(rng.integers(len(c.captions)))]
            if T > self.max_frames:
                start = int(rng.integers(T - self.max_frames + 1))
        else:
            caption = c.captions[0] if c.captions else ""  # evaluation truncates from the start
        tokens = torch.from_numpy(codes[:, start : start + self.max_frames].astype(np.int64))
        return {"id": c.id, "tokens": tokens, "clap": clap, "caption": caption, "captions": list(c.captions)}


def collate(items: Sequence[dict]) -> dict:
    T = max(int(it["tokens"].shape[1]) for it in items)
    K = int(items[0]["tokens"].shape[0])
    tokens = torch.full((len(items), K, T), PAD_CODE, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.bool)
    for b, it in enumerate(items):
        n = int(it["tokens"].shape[1])
        tokens[b, :, :n] = it["tokens"]
        mask[b, :n] = True
    return {
        "tokens": tokens,
        "token_mask": mask,
        "clap": torch.stack([it["clap"] for it in items]),
        "caption": [it["caption"] for it in items],
        "captions": [it["captions"] for it in items],
        "id": [it["id"] for it in items],
    }


def make_collate(tokenize: Callable[[list[str]], torch.Tensor] | None) -> Callable[[Sequence[dict]], dict]:
    """``collate`` plus ``labels`` (B, L) from ``tokenize`` (e.g. ``model.tokenize_captions``)."""

    def fn(items):
        batch = collate(items)
        if tokenize is not None:
            batch["labels"] = tokenize(batch["caption"])
        return batch

    return fn


_PUNCT = re.compile(r"[^\w\s'-]")


def normalize_caption(text: str) -> str:
    """Lower case, punctuation removed, single spaces (the word-level tokenizer's view of a caption)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def most_frequent_caption(clips: Sequence[CachedClip]) -> str:
    """The most frequent training caption (after normalisation); ties go to the one seen first."""
    counts = Counter(normalize_caption(c) for clip in clips for c in clip.captions)
    if not counts:
        raise ValueError("no captions")
    return counts.most_common(1)[0][0]


def build_word_tokenizer(captions: Sequence[str], min_count: int = 1):
    """A word-level BART-style tokenizer (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3) from captions."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for c in captions for w in normalize_caption(c).split())
    words = sorted(w for w, n in counts.items() if n >= min_count)
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s'-]"), " ")])
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


__all__ = [
    "MAX_FRAMES",
    "PAD_CODE",
    "CachedClip",
    "CaptionDataset",
    "build_word_tokenizer",
    "collate",
    "make_collate",
    "most_frequent_caption",
    "normalize_caption",
    "read_index",
]
