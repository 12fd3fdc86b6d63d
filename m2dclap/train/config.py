"""Training configurations: pretraining stages (one dataclass, the paper's presets per stage, IV-A2) and stage 1.1
(AudioSet fine-tuning, Table IV)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..cli import option
from ..config import apply_overrides
from ..stages import STAGES


@dataclass
class TrainCfg:
    """One pretraining run (one stage). Every field can be overridden from the command line."""

    stage: str = option("1", help='"1" (M2D + CLAP), "2" (CLAP, frozen audio encoder), "2.1" (as 2, no masking)')
    preset: str = option("tiny", help="architecture preset for a fresh model (stage 1)")
    init: str = option("", help="checkpoint to start from (stage 2 starts from stage-1 weights)")
    data: str = option("", help="manifest (CSV/JSONL); empty = the embedded synthetic corpus")
    captions: str = option("", help="pre-computed caption embeddings (.npy {id: array}) for stage 1")
    text_model: str = option("", help="stage 2: Hugging Face text encoder (name or folder); empty = the preset's")
    exclude: str = option("", help="file listing clips never to train on (downstream test sets)")
    output_dir: str = option("runs/pretrain", help="checkpoints, resolved config, final model, logs")
    epochs: int = option(300, help="passes over the training set")
    warmup_epochs: float = option(20.0, help="linear warm-up, then half-cosine to min_lr")
    max_steps: int = option(0, help="stop after this many optimiser steps (0 = run all epochs)")
    batch_size: int = option(512, help="per process (paper: 4 GPUs x 512 = 2048)")
    grad_accum: int = option(1, help="micro-batches per optimiser step")
    blr: float = option(3e-4, help="base learning rate; lr = blr * effective batch / 256")
    lr: float = option(0.0, help="absolute learning rate (overrides blr when > 0)")
    min_lr: float = option(0.0, help="end of the cosine")
    weight_decay: float = option(0.05, help="AdamW, not on biases, norms, tokens")
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas")
    clip_grad: float = option(3.0, help="gradient-norm clip")
    mask_ratio: float = option(0.7, help="M2D masking ratio")
    lambda_m2d: float = option(1.0, help="weight of L_m2d (Eq. 5)")
    lambda_clap: float = option(0.01, help="weight of L_clap (Eq. 5)")
    ema_start: float = option(0.99995, help="target EMA decay at the first step")
    ema_end: float = option(0.99999, help="target EMA decay at the last step")
    crop_seconds: float = option(6.08, help="random crop length (608 frames in stage 1)")
    norm_stats_clips: int = option(500, help="clips used to compute the log-mel statistics of a fresh model")
    mixed_precision: str = option("no", help="no, fp16, bf16")
    checkpoint_every: int = option(200, help="optimiser steps between resumable checkpoints")
    keep_checkpoints: int = option(2, help="resumable checkpoints kept")
    on_bad_audio: str = option("skip", help="skip (report and go on) or fail")
    num_workers: int = option(0, help="DataLoader workers")
    seed: int = option(0, help="everything random derives from it")
    log_every: int = option(10, help="optimiser steps between log lines")
    tracker: str = option("auto", help="auto (TensorBoard when installed), none, tensorboard")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_config(stage: str, **overrides: Any) -> TrainCfg:
    """The paper's preset for ``stage`` with CLI-style overrides (strings are converted to field types)."""
    if stage not in STAGES:
        raise KeyError(
            f"unknown stage {stage!r}; available: {', '.join(STAGES)} "
            "(stage 1.1: python -m m2dclap.train.finetune, or scripts/pretrain.py --stage 1.1)"
        )
    return apply_overrides(TrainCfg(stage=stage, **STAGES[stage]), overrides)


@dataclass
class FinetuneCfg:
    """One stage-1.1 run; defaults are the paper's AS2M column of Table IV. Every field is a CLI option."""

    init: str = option("", help="stage-1 model to fine-tune (save_pretrained folder, official .pth or registered name)")
    data: str = option("", help="manifest with labels and train/val splits (AudioSet: 527 classes)")
    output_dir: str = option("runs/stage1.1", help="checkpoints, best/ and model/ folders, config and summary")
    label_column: str = option("labels", help="manifest column of ';'-separated class labels")
    classes: str = option("", help="file with one class label per line (fixes the order); empty = sorted train labels")
    input_size: tuple[int, int] = option((80, 1001), help="(mels, frames) per input; the pos-embed is resampled to it")
    epochs: int = option(70, help="passes over the training split (Table IV)")
    warmup_epochs: float = option(15.0, help="linear warm-up, then half-cosine to min_lr (Table IV)")
    max_steps: int = option(
        0, help="stop after this many optimiser steps (0 = all epochs); the schedule spans them all"
    )
    batch_size: int = option(64, help="clips per process and step (Table IV)")
    grad_accum: int = option(1, help="micro-batches per optimiser step")
    eval_batch_size: int = option(0, help="validation batch (0 = batch_size)")
    optimizer: str = option("lars", help="lars (AS2M), sgd (AS20K, ESC-50, SPCV2) or adamw (VC1), as EVAR")
    lr: float = option(2.0, help="peak learning rate (Table IV; the BCE is a mean over all classes, hence its size)")
    min_lr: float = option(1e-7, help="end of the cosine (EVAR's CosineLRScheduler lr_min)")
    momentum: float = option(0.9, help="LARS/SGD momentum")
    weight_decay: float = option(0.0, help="on weights only (EVAR passes 0 to LARS and SGD, 1e-4 to AdamW)")
    lars_trust: float = option(0.001, help="LARS trust coefficient eta")
    lars_always_adapt: bool = option(False, help="trust ratio even without weight decay (off = the official timm LARS)")
    clip_grad: float = option(0.0, help="gradient-norm clip (0 = off, as EVAR)")
    mixup: float = option(0.5, help="alpha of the Beta(alpha, alpha) mixing weights, every batch (0 = off; Table IV)")
    log_mixup_exp: bool = option(True, help="mix log-mels as log(l e^a + (1-l) e^b), a sound mixture, not linearly")
    freq_mask: int = option(30, help="SpecAugment: one frequency band per clip, width < freq_mask mel bins (Table IV)")
    time_mask: int = option(192, help="SpecAugment: one time band per clip, width < time_mask frames (Table IV)")
    training_mask: float = option(0.5, help="structured patchout ratio: whole patch rows/columns dropped in training")
    pooling: str = option(
        "auto", help="tokens (mean patch token, D), frames (z'', F'*D), auto (tokens iff training_mask>0)"
    )
    head_init_std: float = option(0.01, help="std of the linear head's initial weights (EVAR TaskHead)")
    mixed_precision: str = option("no", help="no, fp16, bf16")
    checkpoint_every: int = option(1000, help="optimiser steps between resumable checkpoints")
    keep_checkpoints: int = option(2, help="resumable checkpoints kept")
    log_every: int = option(50, help="optimiser steps between log lines")
    on_bad_audio: str = option("skip", help="skip (report and go on) or fail")
    num_workers: int = option(0, help="DataLoader workers")
    seed: int = option(42, help="everything random derives from it (EVAR's default)")
    tracker: str = option("auto", help="auto (TensorBoard when installed), none, tensorboard")

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
