"""Pretraining stages 1, 2 and 2.1 as a task of the training engine (paper III-B, IV-A2).

The task builds the stage's model (a fresh one, or the stage-1 model with a trainable text encoder), its
training clips and AdamW; its step is M2D + CLAP on one micro-batch (Eq. 5) and its update hook moves M2D's
EMA target and clamps the temperature. The loop, checkpoints and resume are the engine's.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..audio import compute_norm_stats
from ..config import TextCfg, get_model_config
from ..data.capemb import load_caption_embeddings
from ..data.datasets import AudioCaptionDataset, collate
from ..data.manifest import apply_exclusions, read_exclusion_list, read_manifest, split_records
from ..layers import sincos_2d_pos_embed
from ..m2d import M2DCLAPPretrainer, ema_momentum
from ..model import M2DCLAP
from .config import TrainCfg
from .engine import Engine, LoopCfg, cosine_schedule, loader_and_adamw, repeat_rows, start_run

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainCfg, caption_dim: int | None) -> M2DCLAP:
    """Stage 1: a fresh model whose text side is the frozen sentence model behind the pre-computed
    embeddings (plus a learnable linear map). Stage 2/2.1: the stage-1 (or given) model with a trainable
    Hugging Face text encoder; the audio encoder and projector weights are kept."""
    from ..checkpoint import load

    if cfg.stage == "1":
        if cfg.init:
            return load(cfg.init)
        text = TextCfg(
            kind="sentence", name=cfg.text_model or "all-MiniLM-L6-v2", pooling="mean", width=caption_dim or 768
        )
        model_cfg = get_model_config(cfg.preset)
        model_cfg.text = text
        return M2DCLAP(model_cfg)
    if not cfg.init:
        raise ValueError(f"stage {cfg.stage} trains on top of a stage-1 model: give --init CHECKPOINT")
    source = load(cfg.init)
    if source.cfg.text.kind == "hf" and not cfg.text_model:
        return source  # already has a trainable text encoder (stage 2 -> 2.1)
    model_cfg = copy.deepcopy(source.cfg)
    preset_text = get_model_config(cfg.preset).text
    model_cfg.text = (
        preset_text
        if not cfg.text_model
        else TextCfg(kind="hf", name=cfg.text_model, pooling=preset_text.pooling, width=_hf_width(cfg.text_model))
    )
    model = M2DCLAP(model_cfg)
    keep = {
        k: v for k, v in source.state_dict().items() if k.startswith(("encoder.", "audio_proj.")) or k == "norm_stats"
    }
    # When the new text encoder is the model whose embeddings stage 1 learned from (same width), the
    # stage-1 text map and temperature are a warm start; otherwise they start fresh.
    same_text = source.cfg.text.name == model_cfg.text.name and source.cfg.text.width == model_cfg.text.width
    if same_text:
        keep.update({k: v for k, v in source.state_dict().items() if k.startswith("text_proj.") or k == "logit_scale"})
    model.load_state_dict(keep, strict=False)
    return model


def _hf_width(name: str) -> int:
    from transformers import AutoConfig

    from ..clap import resolve_text_model

    return AutoConfig.from_pretrained(resolve_text_model(name)).hidden_size


def extend_input_frames(model: M2DCLAP, frames: int) -> None:
    """Let the encoder take ``frames``-frame inputs (stage 2 uses whole 10-s clips).

    A pure sin-cos embedding is regenerated on the larger grid, which keeps the positions the frozen encoder
    was trained on unchanged; a learned/resampled one is resampled bicubically as the official code does.
    """
    enc = model.encoder
    if frames <= enc.cfg.input_size[1]:
        return
    new_size = (enc.cfg.input_size[0], frames)
    pure = sincos_2d_pos_embed(enc.cfg.embed_dim, enc.cfg.grid_size)
    if torch.allclose(enc.pos_embed.detach().cpu().float(), pure, atol=1e-5):
        enc.cfg.input_size = new_size
        enc.pos_embed = torch.nn.Parameter(
            sincos_2d_pos_embed(enc.cfg.embed_dim, enc.cfg.grid_size), requires_grad=False
        )
    else:
        enc.set_input_size(new_size)


def build_datasets(
    cfg: TrainCfg, model: M2DCLAP, manifest: Path, caption_embeddings: dict | None = None
) -> tuple[AudioCaptionDataset, int]:
    records, _ = split_records(read_manifest(manifest))  # no train split: the rows without a split
    if cfg.exclude:
        records, removed = apply_exclusions(records, read_exclusion_list(cfg.exclude))
        log.info("excluded %d clips listed in %s", removed, cfg.exclude)
    if not records:
        raise ValueError(f"{manifest}: no training clips")
    emb = caption_embeddings if cfg.stage == "1" else None
    crop = int(round(cfg.crop_seconds * model.sample_rate / model.cfg.frontend.hop_length))
    ds = AudioCaptionDataset(
        records,
        model.cfg.frontend,
        crop,
        training=True,
        caption_embeddings=emb,
        on_bad_audio=cfg.on_bad_audio,
        seed=cfg.seed,
    )
    return ds, crop


def fresh_norm_stats(ds: AudioCaptionDataset, n: int) -> tuple[float, float]:
    """Log-mel statistics from up to ``n`` training crops (the official runtime uses 5000)."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return compute_norm_stats([it["lms"] for it in items if "lms" in it])


def refill_as_positives(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """Refill a batch that lost bad clips back to ``size`` by repeating good ones, so every process
    gathers equal shapes; repeats are marked as positives of each other through their clip index."""
    out = repeat_rows(batch, size, batch["lms"].shape[0])
    out["positive_groups"] = torch.as_tensor(out["index"])
    return out


def train(cfg: TrainCfg, manifest: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run one stage; returns a summary (steps, losses, skipped clips, output paths)."""
    accelerator, out_dir = start_run(cfg, "train_config.json")
    caption_emb, caption_dim = None, None
    if cfg.stage == "1":
        if not cfg.captions:
            raise ValueError(
                "stage 1 needs pre-computed caption embeddings: --captions FILE "
                "(make them with scripts/embed_captions.py)"
            )
        caption_emb = load_caption_embeddings(cfg.captions)  # read once: the file can hold millions of clips
        caption_dim = next(iter(caption_emb.values())).shape[-1]
    model = build_model(cfg, caption_dim)
    ds, crop = build_datasets(cfg, model, Path(manifest), caption_emb)
    extend_input_frames(model, crop)
    if cfg.stage == "1" and not cfg.init:
        with torch.no_grad():
            model.norm_stats.copy_(torch.tensor(fresh_norm_stats(ds, cfg.norm_stats_clips)))
        log.info("log-mel statistics of the training data: %s", model.norm_stats.tolist())
    model.set_trainable(audio_encoder=cfg.stage == "1", audio_proj=True, text=cfg.stage != "1")
    trainer = M2DCLAPPretrainer(
        model, cfg.mask_ratio, cfg.lambda_m2d, cfg.lambda_clap, accelerator.num_processes, accelerator.process_index
    )
    loader, optimizer, peak_lr, eff_batch = loader_and_adamw(
        cfg, ds, collate, trainer, model.no_weight_decay(), accelerator.num_processes
    )
    text_key = "caption_emb" if cfg.stage == "1" else "caption"

    def step(module: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        lms = (batch["lms"] - model.norm_stats[0]) / model.norm_stats[1]  # normalise (B, 1, F, T)
        text = {"text_emb": batch[text_key]} if cfg.stage == "1" else {"texts": batch[text_key]}
        return module(lms, positive_groups=batch.get("positive_groups"), **text)

    def after_update(engine: Engine) -> None:
        engine.acc.unwrap_model(engine.model).update_target(
            ema_momentum(engine.state.step, engine.stop, cfg.ema_start, cfg.ema_end)
        )
        model.clamp_logit_scale()

    loop = LoopCfg.from_run(cfg, name=f"stage {cfg.stage}")
    engine = Engine(
        accelerator,
        loop,
        trainer,
        optimizer,
        loader,
        step,
        cosine_schedule(peak_lr, cfg.min_lr, cfg.warmup_epochs),
        after_update=after_update,
        on_epoch=ds.set_epoch,
        rows=lambda b: b["size"],
        refill=refill_as_positives,
    )
    if resume:
        engine.resume(f"stage{cfg.stage}", cfg.to_dict())
    else:
        engine.start_trackers(f"stage{cfg.stage}", cfg.to_dict())
    # The modules keep the modes they were built or loaded in (a Hugging Face text encoder loads in eval
    # mode, so stage 2 trains it without dropout): the default run's figures were measured that way.
    history = engine.fit()
    state = engine.state
    summary = {
        "stage": cfg.stage,
        "steps": state.step,
        "skipped_clips": state.skipped,
        "skipped_files": sorted(engine.skipped_items),
        "peak_lr": peak_lr,
        "effective_batch": eff_batch,
        "final_losses": history[-1] if history else {},
    }
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(engine.model).model
        final.save_pretrained(out_dir / "model", stage=cfg.stage, steps=state.step)
        summary["model"] = str(out_dir / "model")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary
