"""Training configurations: pretraining stages (one dataclass, the paper's presets per stage, IV-A2) and stage 1.1
(AudioSet fine-tuning, Table IV)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import apply_overrides
from ..stages import STAGES


@dataclass
class TrainCfg:
    """One pretraining run (one stage). Every field can be overridden from the command line."""

    stage: str = "1"  # "1" (M2D + CLAP), "2" (CLAP, frozen audio encoder), "2.1" (as 2, no masking)
    preset: str = "tiny"  # architecture preset for a fresh model (stage 1)
    init: str = ""  # checkpoint to start from (stage 2 starts from stage-1 weights)
    data: str = ""  # manifest (CSV/JSONL); empty = the embedded synthetic corpus
    captions: str = ""  # pre-computed caption embeddings (.npy {id: array}) for stage 1
    text_model: str = ""  # stage 2: Hugging Face text encoder (name or folder); empty = the preset's
    exclude: str = ""  # file listing clips never to train on (downstream test sets)
    output_dir: str = "runs/pretrain"  # checkpoints, resolved config, final model, logs
    epochs: int = 300  # passes over the training set
    warmup_epochs: float = 20.0  # linear warm-up, then half-cosine to min_lr
    max_steps: int = 0  # stop after this many optimiser steps (0 = run all epochs)
    batch_size: int = 512  # per process (paper: 4 GPUs x 512 = 2048)
    grad_accum: int = 1  # micro-batches per optimiser step
    blr: float = 3e-4  # base learning rate; lr = blr * effective batch / 256
    lr: float = 0.0  # absolute learning rate (overrides blr when > 0)
    min_lr: float = 0.0  # end of the cosine
    weight_decay: float = 0.05  # AdamW, not on biases, norms, tokens
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    clip_grad: float = 3.0  # gradient-norm clip
    mask_ratio: float = 0.7  # M2D masking ratio
    lambda_m2d: float = 1.0  # weight of L_m2d (Eq. 5)
    lambda_clap: float = 0.01  # weight of L_clap (Eq. 5)
    ema_start: float = 0.99995  # target EMA decay at the first step
    ema_end: float = 0.99999  # target EMA decay at the last step
    crop_seconds: float = 6.08  # random crop length (608 frames in stage 1)
    norm_stats_clips: int = 500  # clips used to compute the log-mel statistics of a fresh model
    mixed_precision: str = "no"  # no, fp16, bf16
    checkpoint_every: int = 200  # optimiser steps between resumable checkpoints
    keep_checkpoints: int = 2  # resumable checkpoints kept
    on_bad_audio: str = "skip"  # skip (report and go on) or fail
    num_workers: int = 0  # DataLoader workers
    seed: int = 0  # everything random derives from it
    log_every: int = 10  # optimiser steps between log lines
    tracker: str = "auto"  # auto (TensorBoard when installed), none, tensorboard

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_config(stage: str, **overrides: Any) -> TrainCfg:
    """The paper's preset for ``stage`` with CLI-style overrides (strings are converted to field types)."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; available: {', '.join(STAGES)} "
                       "(stage 1.1: python -m m2dclap.train.finetune, or scripts/pretrain.py --stage 1.1)")
    return apply_overrides(TrainCfg(stage=stage, **STAGES[stage]), overrides)


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
