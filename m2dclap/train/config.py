"""Training configuration: one dataclass, stage presets with the paper's hyper-parameters (IV-A2)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import apply_overrides


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


# The paper's settings per stage (section IV-A2). Stage 1.1 (AudioSet fine-tuning) has its own config,
# m2dclap.train.finetune.FinetuneCfg (Table IV, AS2M), and runs with `python -m m2dclap.train.finetune`.
STAGES: dict[str, dict[str, Any]] = {
    "1": dict(mask_ratio=0.7, lambda_m2d=1.0, lambda_clap=0.01, epochs=300, warmup_epochs=20, blr=3e-4,
              crop_seconds=6.08),
    "2": dict(mask_ratio=0.3, lambda_m2d=0.0, lambda_clap=1.0, epochs=30, warmup_epochs=5, blr=3e-6,
              crop_seconds=10.01),
    "2.1": dict(mask_ratio=0.0, lambda_m2d=0.0, lambda_clap=1.0, epochs=30, warmup_epochs=5, blr=3e-6,
                crop_seconds=10.01),
}


def stage_config(stage: str, **overrides: Any) -> TrainCfg:
    """The paper's preset for ``stage`` with CLI-style overrides (strings are converted to field types)."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; available: {', '.join(STAGES)} "
                       "(stage 1.1: python -m m2dclap.train.finetune, or scripts/pretrain.py --stage 1.1)")
    return apply_overrides(TrainCfg(stage=stage, **STAGES[stage]), overrides)
