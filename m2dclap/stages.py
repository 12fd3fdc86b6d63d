"""The paper's training recipes per stage (section IV-A2): plain settings, shared by every command that
trains a stage. Stage 2.1 is defined here once: pretraining's ``--stage 2.1`` and retrieval fine-tuning
(``retrieval.finetune``) both take their defaults from ``STAGES["2.1"]``. Stage 1.1 (AudioSet fine-tuning)
has its own options, ``m2dclap.train.config.FinetuneCfg`` (Table IV, AS2M)."""

from __future__ import annotations

from typing import Any

STAGES: dict[str, dict[str, Any]] = {
    # M2D + CLAP on pre-computed caption embeddings, a fresh audio encoder
    "1": dict(
        mask_ratio=0.7, lambda_m2d=1.0, lambda_clap=0.01, epochs=300, warmup_epochs=20, blr=3e-4, crop_seconds=6.08
    ),
    # CLAP with a trainable text encoder, the audio encoder frozen
    "2": dict(
        mask_ratio=0.3, lambda_m2d=0.0, lambda_clap=1.0, epochs=30, warmup_epochs=5, blr=3e-6, crop_seconds=10.01
    ),
    # stage 2 without masking (the fine-tuning of a stage-2 model, e.g. for retrieval)
    "2.1": dict(
        mask_ratio=0.0, lambda_m2d=0.0, lambda_clap=1.0, epochs=30, warmup_epochs=5, blr=3e-6, crop_seconds=10.01
    ),
}
