"""Stage 1.1: supervised AudioSet fine-tuning of the stage-1 audio encoder (paper III-B2a, IV-A2c, Table IV).

    python -m m2dclap.train.finetune --init runs/stage1/model --data as2m.csv --output-dir runs/stage1.1

The recipe is the official EVAR one for AS2M (reference/m2d-official.md section 1, ``util/ft-as2m.sh``):
LARS at lr 2.0, batch 64, 70 epochs with 15 of warm-up, mixup 0.5, SpecAugment 30/192, structured patchout
0.5, no random resize crop, the position embedding resampled to 80x1001. The classifier is EVAR's TaskHead:
``BatchNorm1d(affine=False)`` then one linear layer on a pooled encoder feature, trained with BCE. With
structured patchout the pooled feature is the mean of the visible patch tokens (D dims), because the frame
feature of Eq. 2 is not defined when whole frequency rows are dropped (paper IV-B3; the official runtime
switches to flat features whenever ``training_mask > 0``); without it, z'' (F'*D dims) can be used.

Only the encoder changes: the audio projector, text tower and temperature are saved untouched, so the result
loads with ``m2dclap.load``. The head is saved beside it as ``head.safetensors`` + ``head.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import FrontendCfg, apply_overrides
from ..data.datasets import AudioCaptionDataset, collate
from ..data.manifest import ManifestError, Record, parse_labels, raw_columns, read_manifest, split_records
from .. import metrics
from ..fileio import atomic_write_text, usual_permissions
from ..encoder import AudioEncoder, clip_features
from ..m2d import take
from ..model import M2DCLAP
from .lars import LARS
from .loop import (TrainState, fill_batch, lr_at, optimizer_step, param_groups, start_run,
                   resume_and_track, save_checkpoint)

log = logging.getLogger(__name__)

HEAD_WEIGHTS, HEAD_META = "head.safetensors", "head.json"


@dataclass
class FinetuneCfg:
    """One stage-1.1 run; defaults are the paper's AS2M column of Table IV. Every field is a CLI option."""

    init: str = ""  # stage-1 model to fine-tune (save_pretrained folder, official .pth or registered name)
    data: str = ""  # manifest with labels and train/val splits (AudioSet: 527 classes)
    output_dir: str = "runs/stage1.1"  # checkpoints, best/ and model/ folders, config and summary
    label_column: str = "labels"  # manifest column of ';'-separated class labels
    classes: str = ""  # file with one class label per line (fixes the order); empty = sorted train labels
    input_size: tuple[int, int] = (80, 1001)  # (mels, frames) per input; the pos-embed is resampled to it
    epochs: int = 70  # passes over the training split (Table IV)
    warmup_epochs: float = 15.0  # linear warm-up, then half-cosine to min_lr (Table IV)
    max_steps: int = 0  # stop after this many optimiser steps (0 = all epochs); the schedule still spans all epochs
    batch_size: int = 64  # clips per process and step (Table IV)
    grad_accum: int = 1  # micro-batches per optimiser step
    eval_batch_size: int = 0  # validation batch (0 = batch_size)
    optimizer: str = "lars"  # lars (AS2M), sgd (AS20K, ESC-50, SPCV2) or adamw (VC1), as EVAR
    lr: float = 2.0  # peak learning rate (Table IV; the BCE is a mean over all classes, hence its size)
    min_lr: float = 1e-7  # end of the cosine (EVAR's CosineLRScheduler lr_min)
    momentum: float = 0.9  # LARS/SGD momentum
    weight_decay: float = 0.0  # on weights only (EVAR passes 0 to LARS and SGD, 1e-4 to AdamW)
    lars_trust: float = 0.001  # LARS trust coefficient eta
    lars_always_adapt: bool = False  # trust ratio even without weight decay (off = the official timm LARS)
    clip_grad: float = 0.0  # gradient-norm clip (0 = off, as EVAR)
    mixup: float = 0.5  # alpha of the Beta(alpha, alpha) mixing weights, every batch (0 = off; Table IV)
    log_mixup_exp: bool = True  # mix log-mels as log(l e^a + (1-l) e^b), a sound mixture, not linearly
    freq_mask: int = 30  # SpecAugment: one frequency band per clip, width < freq_mask mel bins (Table IV)
    time_mask: int = 192  # SpecAugment: one time band per clip, width < time_mask frames (Table IV)
    training_mask: float = 0.5  # structured patchout ratio: whole patch rows/columns dropped in training
    pooling: str = "auto"  # tokens (mean patch token, D), frames (z'', F'*D), auto (tokens iff training_mask > 0)
    head_init_std: float = 0.01  # std of the linear head's initial weights (EVAR TaskHead)
    mixed_precision: str = "no"  # no, fp16, bf16
    checkpoint_every: int = 1000  # optimiser steps between resumable checkpoints
    keep_checkpoints: int = 2  # resumable checkpoints kept
    log_every: int = 50  # optimiser steps between log lines
    on_bad_audio: str = "skip"  # skip (report and go on) or fail
    num_workers: int = 0  # DataLoader workers
    seed: int = 42  # everything random derives from it (EVAR's default)
    tracker: str = "auto"  # auto (TensorBoard when installed), none, tensorboard

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def head_pooling(self) -> str:
        return ("tokens" if self.training_mask > 0 else "frames") if self.pooling == "auto" else self.pooling


def finetune_config(**overrides: Any) -> FinetuneCfg:
    """The AS2M defaults with CLI-style overrides (strings are converted to the field types), checked."""
    cfg = apply_overrides(FinetuneCfg(), overrides)
    if cfg.optimizer not in ("lars", "sgd", "adamw"):
        raise ValueError(f"optimizer must be lars, sgd or adamw, got {cfg.optimizer!r}")
    if cfg.pooling not in ("auto", "tokens", "frames"):
        raise ValueError(f"pooling must be auto, tokens or frames, got {cfg.pooling!r}")
    if not 0.0 <= cfg.training_mask < 1.0:
        raise ValueError(f"training_mask must be in [0, 1), got {cfg.training_mask}")
    if cfg.mixup < 0 or cfg.freq_mask < 0 or cfg.time_mask < 0:
        raise ValueError("mixup, freq_mask and time_mask must be >= 0")
    return cfg


# ------------------------------------------------------------------------------------------- augmentation
def random_structured_mask(batch: int, grid: tuple[int, int], ratio: float, device: torch.device | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Structured patchout over a (F', T') patch grid -> (B, F', T') bool, True = dropped.

    The official recipe: n_f = floor(u * (F' * ratio + 1)) frequency rows (u ~ U[0, 1), at most F' - 1), then
    n_t = floor(T' * max(ratio + 0.5 / T' - n_f / F', 0)) time columns, so rows and columns together drop about
    ``ratio`` of the patches. The counts are drawn once per batch (the kept tokens must stack); which rows and
    columns are dropped is drawn per clip.
    """
    Fp, Tp = grid
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"structured mask ratio must be in [0, 1), got {ratio}")
    u = float(torch.rand((), generator=generator))
    n_f = min(Fp - 1, int((Fp * ratio + 1) * u))
    n_t = min(Tp - 1, int(Tp * max(ratio + 0.5 / Tp - n_f / Fp, 0.0)))
    rows = _choose(batch, Fp, n_f, generator)  # (B, F'), exactly n_f True per clip
    cols = _choose(batch, Tp, n_t, generator)  # (B, T'), exactly n_t True per clip
    return (rows[:, :, None] | cols[:, None, :]).to(device)


def _choose(batch: int, size: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    ranks = torch.rand(batch, size, generator=generator).argsort(1).argsort(1)  # a random permutation per row
    return ranks < n


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, F', T') dropped-patch mask -> (B, n_keep) indices of the kept tokens, in (f t) token order."""
    flat = mask.flatten(1)  # (B, F', T') -> (B, F'*T'), frequency-major like the patch tokens
    n_keep = int((~flat[0]).sum())
    return flat.to(torch.uint8).argsort(dim=1, stable=True)[:, :n_keep]


def sample_bands(batch: int, size: int, max_width: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SpecAugment band per clip: width = floor(u * max_width) (in [0, max_width), as torchaudio's masking)
    and a start uniform over the positions where the band fits. Returns (starts, widths), each (B,)."""
    widths = (torch.rand(batch, generator=generator) * max_width).long().clamp(max=size)
    starts = (torch.rand(batch, generator=generator) * (size - widths + 1)).long().clamp(max=size - widths)
    return starts, widths


def mask_bands(x: torch.Tensor, dim: int, starts: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Set ``x[b, ..., starts[b]:starts[b] + widths[b], ...]`` along ``dim`` to 0 (the mean, after normalising)."""
    idx = torch.arange(x.shape[dim], device=x.device)
    band = (idx >= starts.to(x.device)[:, None]) & (idx < (starts + widths).to(x.device)[:, None])  # (B, size)
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = x.shape[dim]
    return x.masked_fill(band.view(shape), 0.0)


def spec_augment(lms: torch.Tensor, freq_mask: int, time_mask: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One frequency and one time mask per clip on a normalised log-mel (B, 1, F, T)."""
    B, _, n_mels, frames = lms.shape
    if freq_mask > 0:
        lms = mask_bands(lms, -2, *sample_bands(B, n_mels, freq_mask, generator))
    if time_mask > 0:
        lms = mask_bands(lms, -1, *sample_bands(B, frames, time_mask, generator))
    return lms


def mix(lms: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor,
        log_mixup_exp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix clip b with clip perm[b] at weight lam[b]: un-normalised log-mels (B, 1, F, T), targets (B, C).

    Log-mixup-exp, log(l e^a + (1 - l) e^b), adds the mel powers, i.e. it sounds like the two clips played
    together (what mixing waveforms gives, as EVAR does for wave inputs); a linear mix of log-mels would be a
    geometric mean of powers, which no real mixture produces. Targets always mix linearly.
    """
    lam = lam.to(lms.device, torch.float32)
    w = lam.view(-1, *([1] * (lms.dim() - 1)))
    if log_mixup_exp:
        mixed = torch.logaddexp(lms + w.log(), lms[perm] + (1 - w).log())  # log 0 = -inf drops a side exactly
    else:
        mixed = w * lms + (1 - w) * lms[perm]
    return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets[perm]


def mixup(lms: torch.Tensor, targets: torch.Tensor, alpha: float, log_mixup_exp: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """EVAR's Mixup: per-clip lam ~ Beta(alpha, alpha) and a random partner from the same batch."""
    if alpha <= 0:
        return lms, targets
    B = lms.shape[0]
    lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((B,))
    return mix(lms, targets, lam, torch.randperm(B), log_mixup_exp)


# ------------------------------------------------------------------------------------------------ metric
def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """AP of one class (scikit-learn's definition, ties form one threshold); NaN without a positive."""
    return metrics.average_precision(target.cpu().numpy(), scores.double().cpu().numpy())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[float]]:
    """Macro mAP of (N, C) scores against (N, C) 0/1 targets over the classes with a positive; per-class APs."""
    mean, aps, _ = metrics.mean_average_precision((targets > 0.5).cpu().numpy(), scores.double().cpu().numpy(),
                                                  no_positive="exclude")
    return mean, [float(a) for a in aps]


# ------------------------------------------------------------------------------------------------- model
class TaggingHead(nn.Module):
    """EVAR's TaskHead: BatchNorm1d(affine=False) on the pooled feature, then a linear classifier."""

    def __init__(self, in_features: int, n_classes: int, init_std: float = 0.01):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False)
        self.fc = nn.Linear(in_features, n_classes)
        nn.init.normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))  # (B, in_features) -> (B, n_classes) logits


class AudioTagger(nn.Module):
    """Audio encoder + tagging head on normalised log-mels (B, 1, F, T) -> logits (B, n_classes).

    Training with ``training_mask > 0`` drops patch rows/columns (structured patchout) and pools the visible
    tokens; otherwise the input goes through the chunked ``encode_lms`` (any length) and is pooled over all
    patches (``tokens``) or as z'' (``frames``, paper Eq. 2 then the mean over time).
    """

    def __init__(self, encoder: AudioEncoder, n_classes: int, pooling: str = "tokens", training_mask: float = 0.0,
                 head_init_std: float = 0.01):
        super().__init__()
        if pooling not in ("tokens", "frames"):
            raise ValueError(f"pooling must be tokens or frames, got {pooling!r}")
        if pooling == "frames" and training_mask > 0:
            raise ValueError("frame features (Eq. 2) are not defined for a structured mask that drops frequency "
                             "rows: use pooling 'tokens' with training_mask > 0 (paper IV-B3)")
        self.encoder = encoder
        self.pooling, self.training_mask = pooling, float(training_mask)
        D, gf = encoder.cfg.embed_dim, encoder.grid_size[0]
        self.head = TaggingHead(D if pooling == "tokens" else gf * D, n_classes, head_init_std)

    def features(self, lms: torch.Tensor) -> torch.Tensor:
        if self.training and self.training_mask > 0:
            tokens, grid = self.encoder.patchify(lms)  # (B, 1, F, T) -> (B, F'*T', D)
            mask = random_structured_mask(tokens.shape[0], grid, self.training_mask, tokens.device)
            tokens = take(tokens, visible_indices(mask))  # (B, F'*T', D) -> (B, n_keep, D)
            return self.encoder.forward_tokens(tokens)[:, 1:].mean(1)  # drop CLS, mean: (B, D)
        z = self.encoder.encode_lms(lms)  # (B, F', T', D)
        return z.flatten(1, 2).mean(1) if self.pooling == "tokens" else clip_features(z)

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(lms))


def save_finetuned(model: M2DCLAP, tagger: AudioTagger, classes: Sequence[str], directory: str | Path,
                   **metadata: Any) -> Path:
    """The whole model with ``save_pretrained`` (CLAP parts as loaded) plus the head and its class names."""
    from safetensors.torch import save_file

    directory = model.save_pretrained(directory, stage="1.1", **metadata)
    state = {k: v.detach().contiguous().cpu() for k, v in tagger.head.state_dict().items()}
    save_file(state, str(Path(directory) / HEAD_WEIGHTS))
    meta = {"classes": list(classes), "pooling": tagger.pooling, "in_features": tagger.head.fc.in_features,
            "input_size": list(model.cfg.encoder.input_size)}
    (Path(directory) / HEAD_META).write_text(json.dumps(meta, indent=2))
    usual_permissions(Path(directory) / HEAD_WEIGHTS)  # safetensors writes 0600 files
    return Path(directory)


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[M2DCLAP, AudioTagger]:
    """A stage-1.1 folder -> (the model, its tagger sharing the model's encoder); ``tagger.classes`` names
    the logits."""
    from safetensors.torch import load_file

    from ..checkpoint import CheckpointError, load

    path = Path(path)
    if not (path / HEAD_META).exists() or not (path / HEAD_WEIGHTS).exists():
        raise CheckpointError(f"{path}: no {HEAD_META}/{HEAD_WEIGHTS}: not a fine-tuned (stage 1.1) model")
    model = load(path, device, audio_only=True)  # tagging needs no text tower
    meta = json.loads((path / HEAD_META).read_text())
    tagger = AudioTagger(model.encoder, len(meta["classes"]), meta["pooling"])
    tagger.head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
    tagger.classes = list(meta["classes"])
    return model, tagger.to(device).eval()


@torch.no_grad()
def tag_audio(model: M2DCLAP, tagger: AudioTagger, audio: Any, sample_rate: int | None = None) -> torch.Tensor:
    """Class probabilities (B, n_classes) for waveforms of any length (chunked like the official runtime)."""
    tagger.eval()
    probs = [torch.sigmoid(tagger(model.log_mel(w).to(model.dtype))).float()
             for w in model.prepare_audio(audio, sample_rate)]
    return torch.cat(probs)


# -------------------------------------------------------------------------------------------------- data
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

    def __init__(self, records: Sequence[Record], classes: Sequence[str], frontend_cfg: FrontendCfg,
                 frames: int, training: bool, on_bad_audio: str = "skip", seed: int = 0):
        index = {c: i for i, c in enumerate(classes)}
        self.n_classes, self.training, self.frames = len(classes), training, frames
        self.n_mels = frontend_cfg.n_mels
        self.labels = [[index[lab] for lab in r.labels if lab in index] for r in records]
        unknown = sum(lab not in index for r in records for lab in r.labels)
        if unknown:
            log.warning("%d label(s) outside the %d training classes are ignored", unknown, len(classes))
        plain = [dataclasses.replace(r, captions=[]) for r in records]  # captions play no part here
        self.base = AudioCaptionDataset(plain, frontend_cfg, frames, training=training, on_bad_audio=on_bad_audio,
                                        seed=seed)

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        if "bad" in item:
            if self.training:
                return item
            item = {"lms": torch.zeros(1, self.n_mels, self.frames), "index": int(index),
                    "id": self.base.records[index].id, "valid": False}
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


# ------------------------------------------------------------------------------------------------- train
class FinetuneState(TrainState):
    """Training progress plus the best validation result so far (saved with every checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.best_map, self.best_step, self.eval_step = -1.0, -1, -1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_map": self.best_map, "best_step": self.best_step,
                "eval_step": self.eval_step}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self.best_map, self.best_step = float(d["best_map"]), int(d["best_step"])
        self.eval_step = int(d["eval_step"])


def build_optimizer(cfg: FinetuneCfg, tagger: nn.Module) -> torch.optim.Optimizer:
    """Biases, norms and tokens get no decay and (LARS) no trust ratio; weights get both."""
    groups = param_groups(tagger, cfg.weight_decay, {"encoder." + n for n in tagger.encoder.no_weight_decay()})
    groups[1]["lars_adapt"] = False
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.lars_trust,
                    always_adapt=cfg.lars_always_adapt)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, amsgrad=True)


@dataclass
class _Run:
    """Everything the inner loop touches."""

    cfg: FinetuneCfg
    accelerator: Any
    model: M2DCLAP
    tagger: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    val_loader: DataLoader | None
    train_ds: TaggingDataset
    classes: list[str]
    state: FinetuneState
    sched: dict[str, float]
    norm: torch.Tensor  # (mean, std) of the model's log-mel normalisation


def finetune(cfg: FinetuneCfg, resume: bool = False) -> dict[str, Any]:
    """Run stage 1.1; returns a summary (steps, best validation mAP, output folders)."""
    from ..checkpoint import load

    if not cfg.init or not cfg.data:
        raise ValueError("stage 1.1 needs the stage-1 model (--init) and a labelled manifest (--data)")
    accelerator, out_dir = start_run(cfg, "finetune_config.json")
    model = load(cfg.init)  # with its CLAP parts: the saved stage-1.1 model keeps them for stage 2
    if cfg.input_size[0] != model.cfg.frontend.n_mels:
        raise ValueError(f"input_size {cfg.input_size} does not match the model's {model.cfg.frontend.n_mels} mels")
    model.encoder.set_input_size(cfg.input_size)  # bicubic pos-embed resampling ("adjust positional encoding")
    model.set_trainable(audio_encoder=True, audio_proj=False, text=False)
    train_recs, val_recs = split_records(read_labelled(cfg.data, cfg.label_column))
    classes = class_list(train_recs, cfg.classes)
    make = dict(classes=classes, frontend_cfg=model.cfg.frontend, frames=cfg.input_size[1],
                on_bad_audio=cfg.on_bad_audio, seed=cfg.seed)
    train_ds = TaggingDataset(train_recs, training=True, **make)
    tagger = AudioTagger(model.encoder, len(classes), cfg.head_pooling, cfg.training_mask, cfg.head_init_std)
    optimizer = build_optimizer(cfg, tagger)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate_tagging, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise ValueError(f"{len(train_ds)} training clips are fewer than one batch of {cfg.batch_size}")
    val_loader = None
    if val_recs:  # its own generator: validating never draws from the global RNG, so resumes stay exact
        val_loader = DataLoader(TaggingDataset(val_recs, training=False, **make), collate_fn=collate_tagging,
                                batch_size=cfg.eval_batch_size or cfg.batch_size, num_workers=cfg.num_workers,
                                generator=torch.Generator().manual_seed(cfg.seed))
    else:
        log.warning("%s has no val split: no validation, best/ is not written", cfg.data)
    tagger, optimizer, loader = accelerator.prepare(tagger, optimizer, loader)
    val_loader = accelerator.prepare(val_loader) if val_loader is not None else None
    set_seed(cfg.seed + accelerator.process_index)  # own augmentation draws per process (samplers are seeded)
    state = FinetuneState()
    accelerator.register_for_checkpointing(state)
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    horizon = cfg.epochs * steps_per_epoch
    sched = dict(total=horizon, stop=min(cfg.max_steps, horizon) if cfg.max_steps > 0 else horizon,
                 warmup=int(cfg.warmup_epochs * steps_per_epoch), peak=cfg.lr, floor=cfg.min_lr)
    resume_and_track(accelerator, state, out_dir, resume, "stage1.1", cfg)
    finished = _finished_summary(cfg, state, sched, out_dir) if resume else None
    if finished is not None:  # a no-op: the summary, model/ and best/ of the finished run stay as they are
        accelerator.end_training()
        return finished
    norm = model.norm_stats.detach().clone().to(accelerator.device)
    run = _Run(cfg, accelerator, model, tagger, optimizer, loader, val_loader, train_ds, classes, state, sched,
               norm)
    start = state.step
    history = _run_epochs(run)
    if val_loader is not None and state.eval_step != state.step:
        _validate(run, history)
    save_checkpoint(accelerator, state, out_dir, cfg.keep_checkpoints)
    return _finish(run, history, start)


def _finished_summary(cfg: FinetuneCfg, state: FinetuneState, sched: dict[str, float], out_dir: Path
                      ) -> dict[str, Any] | None:
    """The summary of a run that a resume finds finished (nothing left to train and ``summary.json`` written
    at that step), else None. Finishing again would overwrite it with an empty history."""
    if state.step < sched["stop"] and state.epoch < cfg.epochs:
        return None
    try:
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # killed before the summary: finish the run (model/ and summary.json)
        return None
    if not isinstance(summary, dict) or summary.get("steps") != state.step:
        return None
    log.warning("%s: the run already finished at step %d; nothing to resume (summary.json, model/ and best/ are "
                "left as they are; raise --max-steps or --epochs to train further)", out_dir, state.step)
    return {**summary, "already_finished": True}


def _finish(run: _Run, history: list[dict[str, float]], start: int) -> dict[str, Any]:
    cfg, state, acc = run.cfg, run.state, run.accelerator
    out_dir = Path(cfg.output_dir)
    summary = {"stage": "1.1", "steps": state.step, "resumed_from": start, "skipped_clips": state.skipped,
               "classes": len(run.classes), "pooling": cfg.head_pooling,
               "best_map": state.best_map if state.best_step >= 0 else None,
               "best_step": state.best_step if state.best_step >= 0 else None,
               "val_history": [h for h in history if "val_map" in h],
               "final_losses": next((h for h in reversed(history) if "loss" in h), {})}
    if acc.is_main_process:
        save_finetuned(run.model, acc.unwrap_model(run.tagger), run.classes, out_dir / "model", steps=state.step)
        summary["model"] = str(out_dir / "model")
        summary["best"] = str(out_dir / "best") if state.best_step >= 0 else None
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def _train_step(run: _Run, batch: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """One micro-batch: mixup (raw log-mel), normalise, SpecAugment, forward, BCE, backward, step."""
    cfg, acc, state = run.cfg, run.accelerator, run.state
    with acc.accumulate(run.tagger):
        x, y = mixup(batch["lms"], batch["target"], cfg.mixup, cfg.log_mixup_exp)
        x = spec_augment((x - run.norm[0]) / run.norm[1], cfg.freq_mask, cfg.time_mask)  # (B, 1, F, T)
        loss = F.binary_cross_entropy_with_logits(run.tagger(x).float(), y.float())
        acc.backward(loss)
        lr = lr_at(state.step, int(run.sched["total"]), int(run.sched["warmup"]), run.sched["peak"],
                   run.sched["floor"])
        optimizer_step(acc, run.optimizer, run.tagger.parameters(), cfg.clip_grad, lr)
    return loss.detach(), lr


def _run_epochs(run: _Run) -> list[dict[str, float]]:
    """The inner loop; validates after every epoch; returns the log history."""
    cfg, acc, state = run.cfg, run.accelerator, run.state
    history: list[dict[str, float]] = []
    bar = tqdm(total=int(run.sched["stop"]), initial=state.step, desc="stage 1.1", unit="step",
               disable=not acc.is_local_main_process, dynamic_ncols=True)
    running, n, last_good, t0 = 0.0, 0, None, time.time()
    run.tagger.train()
    while state.step < run.sched["stop"] and state.epoch < cfg.epochs:
        run.train_ds.set_epoch(state.epoch)
        run.loader.set_epoch(state.epoch)
        batches = acc.skip_first_batches(run.loader, state.batch_in_epoch) if state.batch_in_epoch else run.loader
        for batch in batches:
            state.batch_in_epoch += 1
            state.skipped += len(batch.get("skipped", []))
            if batch["size"] == 0:  # every clip was bad: repeat the last good batch (equal shapes everywhere)
                if last_good is None:
                    raise ValueError(f"the first batch had only unreadable clips: {batch['skipped']}")
                batch = last_good
            last_good = batch
            batch, _ = fill_batch(batch, cfg.batch_size)
            loss, lr = _train_step(run, batch)
            running, n = running + float(loss), n + 1
            if not acc.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == run.sched["stop"]:
                logs = dict(loss=running / n, lr=lr, step=state.step, epoch=state.epoch,
                            samples_per_s=n * cfg.batch_size * acc.num_processes / max(time.time() - t0, 1e-9))
                history.append(logs)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                acc.log(logs, step=state.step)
                log.info("stage 1.1 step %d: loss=%.4g lr=%.3g", state.step, logs["loss"], lr)
                running, n, t0 = 0.0, 0, time.time()
            if state.step % cfg.checkpoint_every == 0:
                save_checkpoint(acc, state, Path(cfg.output_dir), cfg.keep_checkpoints)
            if state.step >= run.sched["stop"]:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            if run.val_loader is not None:
                _validate(run, history)
            continue
        break
    bar.close()
    return history


@torch.no_grad()
def evaluate(tagger: nn.Module, loader: DataLoader, accelerator: Any, norm: torch.Tensor
             ) -> tuple[float, list[float], int]:
    """Macro mAP on a labelled loader: (mAP, per-class AP (NaN = no positive), clips that could not be read)."""
    was_training = tagger.training
    tagger.eval()
    scores, targets, valid = [], [], []
    for batch in loader:
        logits = tagger((batch["lms"] - norm[0]) / norm[1]).float()
        s, t, v = accelerator.gather_for_metrics((logits, batch["target"], batch["valid"].to(torch.uint8)))
        scores.append(s.cpu())
        targets.append(t.cpu())
        valid.append(v.cpu().bool())
    tagger.train(was_training)
    keep = torch.cat(valid)
    mAP, aps = mean_average_precision(torch.cat(scores)[keep], torch.cat(targets)[keep])
    return mAP, aps, int((~keep).sum())


def _validate(run: _Run, history: list[dict[str, float]]) -> None:
    """Validation mAP; a new best is saved to ``best/`` (model + head)."""
    acc, state = run.accelerator, run.state
    mAP, _, bad = evaluate(run.tagger, run.val_loader, acc, run.norm)
    state.eval_step = state.step
    history.append({"val_map": mAP, "step": state.step, "epoch": state.epoch, "val_unreadable": bad})
    acc.log({"val_map": mAP}, step=state.step)
    improved = mAP == mAP and mAP > state.best_map
    log.info("stage 1.1 step %d: val mAP %.4f%s", state.step, mAP, " (best)" if improved else "")
    if improved:
        state.best_map, state.best_step = mAP, state.step
        if acc.is_main_process:
            save_finetuned(run.model, acc.unwrap_model(run.tagger), run.classes, Path(run.cfg.output_dir) / "best",
                           steps=state.step, val_map=mAP)
        acc.wait_for_everyone()


# ------------------------------------------------------------------------------------------------- CLI
def _field_help() -> dict[str, str]:
    """One-line help per FinetuneCfg field, from its source comment."""
    out = {}
    for line in inspect.getsource(FinetuneCfg).splitlines():
        m = re.match(r"\s+(\w+): [^=]+= .*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m m2dclap.train.finetune",
        description="Stage 1.1 of M2D-CLAP: fine-tune the stage-1 audio encoder on a labelled (AudioSet-style, "
                    "multi-label) manifest with BCE, the paper's AS2M recipe (Table IV). Writes resumable "
                    "checkpoints, best/ (best validation mAP) and model/ (last step), each loadable with "
                    "m2dclap.load, with the classifier head in head.safetensors + head.json.")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("-v", "--verbose", action="store_true", help="log every logged step")
    helps, defaults = _field_help(), FinetuneCfg()
    opts = p.add_argument_group("fine-tuning options (FinetuneCfg; defaults are the paper's AS2M settings)")
    for f in dataclasses.fields(FinetuneCfg):
        default = getattr(defaults, f.name)
        shown = "x".join(map(str, default)) if isinstance(default, tuple) else default
        opts.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                          metavar=type(default).__name__.upper(),
                          help=f"{helps.get(f.name, '')} [{shown!s}]".replace("%", "%%"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "verbose")}
    try:
        summary = finetune(finetune_config(**overrides), resume=args.resume)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
