"""Torch datasets for pretraining: log-mel crops with captions or pre-computed caption embeddings.

Items are un-normalised log-mel spectrograms; the model applies its checkpoint's normalisation statistics
(``m2dclap.audio.normalize_lms``). All randomness of an item (crop, caption, embedding row) comes from a
generator seeded by ``(seed, epoch, index)``, so a resumed run that calls :meth:`set_epoch` sees exactly the
crops of the interrupted one, whatever the worker count.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..audio import AudioError, LogMelSpectrogram
from ..config import FrontendCfg
from ..embed_files import load_clip
from .manifest import Record

log = logging.getLogger(__name__)

BAD_AUDIO_POLICIES = ("skip", "fail")


class AudioCaptionDataset(Dataset):
    """Records -> ``{"lms": (1, n_mels, crop_frames), "caption", "caption_emb", "index", "id"}``.

    Args:
        records: manifest records; an ``audio`` path ending in ``.npy`` is an official pre-computed log-mel
            of shape [1, n_mels, T] (un-normalised), anything else is decoded with ``load_audio``.
        frontend_cfg: the model's log-mel frontend.
        crop_frames: frames per item (the encoder's input width).
        training: random crops and random captions; otherwise the first ``crop_frames`` frames and the first
            caption (and the first embedding row).
        caption_embeddings: ``{record id: [D] or [n, D]}``; adds ``caption_emb`` (float32) to every item.
        on_bad_audio: ``"skip"`` logs a warning and returns ``{"bad": path, "index": i}`` (dropped by
            :func:`collate`), ``"fail"`` raises :class:`~m2dclap.audio.AudioError` naming the file.
        seed: base seed of the per-item randomness.

    An item has ``caption`` only if its record has captions; :func:`collate` requires all or none.
    """

    def __init__(
        self,
        records: Sequence[Record],
        frontend_cfg: FrontendCfg,
        crop_frames: int,
        training: bool = True,
        caption_embeddings: Mapping[str, Any] | None = None,
        on_bad_audio: str = "skip",
        seed: int = 0,
    ):
        if on_bad_audio not in BAD_AUDIO_POLICIES:
            raise ValueError(f"on_bad_audio must be one of {BAD_AUDIO_POLICIES}, got {on_bad_audio!r}")
        if crop_frames < 1:
            raise ValueError(f"crop_frames must be >= 1, got {crop_frames}")
        self.records = list(records)
        self.cfg = frontend_cfg
        self.crop_frames = int(crop_frames)
        self.training = training
        self.caption_embeddings = caption_embeddings
        self.on_bad_audio = on_bad_audio
        self.seed = int(seed)
        self.epoch = 0
        self.frontend = LogMelSpectrogram(frontend_cfg)
        if caption_embeddings is not None:
            missing = [r.id for r in self.records if r.id not in caption_embeddings]
            if missing:
                raise KeyError(
                    f"no caption embedding for {len(missing)} of {len(self.records)} clip id(s), "
                    f"first {missing[0]!r}"
                    + (f" (also {', '.join(map(repr, missing[1:4]))})" if len(missing) > 1 else "")
                )

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and captions ``__getitem__`` draws (call before building the iterator).

        DataLoader workers copy the dataset when an epoch's iterator is created, so with
        ``persistent_workers=True`` the new epoch would not reach them: use non-persistent workers.
        """
        self.epoch = int(epoch)

    def item_rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch (same triple, same draws)."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        try:
            lms = self.log_mel(rec.audio)  # (n_mels, T)
        except AudioError as e:
            if self.on_bad_audio == "fail":
                raise
            log.warning("skipping a bad clip: %s", e)
            return {"bad": str(rec.audio), "index": int(index)}
        rng = self.item_rng(index)
        item: dict[str, Any] = {"lms": self.crop(lms, rng).unsqueeze(0), "index": int(index), "id": rec.id}
        if rec.captions:
            item["caption"] = rec.captions[int(rng.integers(len(rec.captions)))] if self.training else rec.captions[0]
        if self.caption_embeddings is not None:
            item["caption_emb"] = self._embedding(rec.id, rng)
        return item

    def log_mel(self, path: Path) -> torch.Tensor:
        """Un-normalised log-mel (n_mels, T) of a clip; :class:`AudioError` naming the file if it is unusable."""
        path = Path(path)
        if path.suffix.lower() == ".npy":
            return self._load_lms_npy(path)
        wave = load_clip(path, self.cfg.sample_rate, self.cfg.min_samples)  # (T,); too short is bad audio
        with torch.no_grad():
            return self.frontend(wave)  # (T,) -> (n_mels, frames)

    def _load_lms_npy(self, path: Path) -> torch.Tensor:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise AudioError(f"{path}: cannot read the log-mel .npy ({e})") from None
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]  # official [1, n_mels, T] -> (n_mels, T)
        if arr.ndim != 2 or arr.shape[0] != self.cfg.n_mels or arr.shape[1] == 0 or arr.dtype.kind != "f":
            raise AudioError(
                f"{path}: expected a float log-mel of shape [1, {self.cfg.n_mels}, T], "
                f"got {arr.dtype} {tuple(arr.shape)}"
            )
        lms = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if not torch.isfinite(lms).all():
            raise AudioError(f"{path}: log-mel contains NaN/Inf values")
        return lms

    def crop(self, lms: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(n_mels, T) -> (n_mels, crop_frames): random crop when training, the first frames otherwise."""
        n_frames = lms.shape[-1]
        if n_frames < self.crop_frames:
            # As the official SpectrogramDataset: zero-pad in the raw log domain, before normalisation
            # (so padded frames read as log(1) = 0, not as silence).
            return F.pad(lms, (0, self.crop_frames - n_frames))
        start = int(rng.integers(n_frames - self.crop_frames + 1)) if self.training else 0
        return lms[:, start : start + self.crop_frames]

    def _embedding(self, rec_id: str, rng: np.random.Generator) -> torch.Tensor:
        try:
            emb = np.asarray(self.caption_embeddings[rec_id])  # type: ignore[index]
        except KeyError:
            raise KeyError(f"no caption embedding for clip id {rec_id!r}") from None
        if emb.ndim == 2:  # [n, D]: one caption's embedding per access, as the official CapEmbSpecDataset
            emb = emb[int(rng.integers(emb.shape[0]))] if self.training else emb[0]
        return torch.from_numpy(np.array(emb, dtype=np.float32))


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack good items and list the skipped ones.

    Returns ``{"lms": (B, 1, n_mels, crop), "index": (B,), "id": [B], "caption": [B] (if any),
    "caption_emb": (B, D) (if any), "skipped": [paths], "size": B}``. When every item is bad the batch has
    ``size == 0``, ``lms`` is ``None`` and ``skipped`` lists them all: the training loop counts and skips it.
    """
    good = [b for b in batch if "bad" not in b]
    skipped = [str(b["bad"]) for b in batch if "bad" in b]
    if not good:
        return {"lms": None, "index": torch.empty(0, dtype=torch.long), "id": [], "skipped": skipped, "size": 0}
    out: dict[str, Any] = {
        "lms": torch.stack([b["lms"] for b in good]),  # (B, 1, n_mels, crop_frames)
        "index": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "id": [b["id"] for b in good],
        "skipped": skipped,
        "size": len(good),
    }
    for key in ("caption", "caption_emb"):
        have = [key in b for b in good]
        if any(have) and not all(have):
            lacking = [b["id"] for b in good if key not in b]
            raise ValueError(
                f"collate: some items have {key!r} and some do not (e.g. {lacking[0]!r}); "
                "give every record of a training set captions, or none"
            )
        if all(have):
            values = [b[key] for b in good]
            out[key] = torch.stack(values) if key == "caption_emb" else values
    return out
