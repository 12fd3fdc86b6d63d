"""The Accelerate training loop for pretraining stages 1, 2 and 2.1 (the only importer of accelerate).

prepare -> accumulate -> backward -> clip_grad_norm_ -> step; EMA and temperature clamp after each
optimiser step; resumable checkpoints with ``save_state`` written atomically; the step counter lives in
the saved state (``TrainState``), never in a directory name.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..audio import compute_norm_stats
from ..config import TextCfg, get_model_config
from ..data.capemb import load_caption_embeddings
from ..data.datasets import AudioCaptionDataset, collate
from ..data.manifest import apply_exclusions, read_exclusion_list, read_manifest, split_records
from ..layers import sincos_2d_pos_embed
from ..m2d import M2DCLAPPretrainer, ema_momentum
from ..model import M2DCLAP
from .config import TrainCfg

log = logging.getLogger(__name__)


class TrainState:
    """Progress saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.step, self.epoch, self.batch_in_epoch, self.skipped = 0, 0, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "skipped": self.skipped}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.step, self.epoch = int(d["step"]), int(d["epoch"])
        self.batch_in_epoch, self.skipped = int(d["batch_in_epoch"]), int(d["skipped"])


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainCfg, caption_dim: int | None) -> M2DCLAP:
    """Stage 1: a fresh model whose text side is the frozen sentence model behind the pre-computed
    embeddings (plus a learnable linear map). Stage 2/2.1: the stage-1 (or given) model with a trainable
    Hugging Face text encoder; the audio encoder and projector weights are kept."""
    from ..checkpoint import load

    if cfg.stage == "1":
        if cfg.init:
            return load(cfg.init)
        text = TextCfg(kind="sentence", name=cfg.text_model or "all-MiniLM-L6-v2", pooling="mean",
                       width=caption_dim or 768)
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
    model_cfg.text = preset_text if not cfg.text_model else TextCfg(
        kind="hf", name=cfg.text_model, pooling=preset_text.pooling, width=_hf_width(cfg.text_model))
    model = M2DCLAP(model_cfg)
    keep = {k: v for k, v in source.state_dict().items()
            if k.startswith(("encoder.", "audio_proj.")) or k == "norm_stats"}
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
        enc.pos_embed = torch.nn.Parameter(sincos_2d_pos_embed(enc.cfg.embed_dim, enc.cfg.grid_size),
                                           requires_grad=False)
    else:
        enc.set_input_size(new_size)


def param_groups(module: torch.nn.Module, weight_decay: float, no_decay_names: set[str]) -> list[dict]:
    """AdamW groups: no decay for biases, norms and other 1-D parameters or tokens."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        short = name.split("model.", 1)[-1]
        (no_decay if p.ndim <= 1 or short in no_decay_names or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak`` then half-cosine to ``floor``, per optimiser step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------------- data
def build_datasets(cfg: TrainCfg, model: M2DCLAP, manifest: Path,
                   caption_embeddings: dict | None = None) -> tuple[AudioCaptionDataset, int]:
    records, _ = split_records(read_manifest(manifest))  # no train split: the rows without a split
    if cfg.exclude:
        records, removed = apply_exclusions(records, read_exclusion_list(cfg.exclude))
        log.info("excluded %d clips listed in %s", removed, cfg.exclude)
    if not records:
        raise ValueError(f"{manifest}: no training clips")
    emb = caption_embeddings if cfg.stage == "1" else None
    crop = int(round(cfg.crop_seconds * model.sample_rate / model.cfg.frontend.hop_length))
    ds = AudioCaptionDataset(records, model.cfg.frontend, crop, training=True, caption_embeddings=emb,
                             on_bad_audio=cfg.on_bad_audio, seed=cfg.seed)
    return ds, crop


def fresh_norm_stats(ds: AudioCaptionDataset, n: int) -> tuple[float, float]:
    """Log-mel statistics from up to ``n`` training crops (the official runtime uses 5000)."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return compute_norm_stats([it["lms"] for it in items if "lms" in it])


def loader_and_optimizer(cfg, ds, collate_fn, module: torch.nn.Module, no_weight_decay: set[str],
                         num_processes: int, what: str = "training clips"):
    """The shuffled training loader and AdamW of a contrastive run (pretraining, retrieval fine-tuning):
    ``(loader, optimizer, peak lr, effective batch)``; the peak is ``lr`` or ``blr`` x effective batch / 256."""
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise ValueError(f"{len(ds)} {what} are fewer than one batch of {cfg.batch_size}")
    eff_batch = cfg.batch_size * cfg.grad_accum * num_processes
    peak = cfg.lr if cfg.lr > 0 else cfg.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay, no_weight_decay), lr=peak,
                                  betas=tuple(cfg.betas))
    return loader, optimizer, peak, eff_batch


def repeat_rows(batch: dict[str, Any], size: int, n: int, keep: Sequence[str] = ("skipped",)) -> dict[str, Any]:
    """The batch with its ``n`` rows repeated cyclically up to ``size``: every tensor with ``n`` rows and every
    list of ``n`` items, except the entries named in ``keep`` (per-batch, not per-row)."""
    idx = torch.arange(size) % n
    return {k: v if k in keep else
            v[idx] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else
            [v[i] for i in idx.tolist()] if isinstance(v, list) and len(v) == n else v
            for k, v in batch.items()}


def fill_batch(batch: dict[str, Any], size: int) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Refill a batch that lost bad clips back to ``size`` by repeating good ones, so every process
    gathers equal shapes; repeats are marked as positives of each other through their clip index."""
    n = batch["lms"].shape[0]
    if n == size:
        return batch, None
    out = repeat_rows(batch, size, n)
    return out, out["index"] if isinstance(out["index"], torch.Tensor) else torch.tensor(out["index"])


# ------------------------------------------------------------------------------------------ checkpoints
def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint with the highest saved step; half-written ones have no ``state.json``."""
    best, best_step = None, -1
    for d in (out_dir / "checkpoints").glob("ckpt-*"):
        marker = d / "state.json"
        if not marker.exists():
            continue
        try:
            step = json.loads(marker.read_text())["step"]
        except (json.JSONDecodeError, KeyError):
            continue
        if step > best_step:
            best, best_step = d, step
    return best


def save_checkpoint(accelerator: Accelerator, state: TrainState, out_dir: Path, keep: int) -> None:
    """``save_state`` into a temporary folder, then mark and rename it, so a kill never leaves a
    checkpoint that looks complete."""
    root = out_dir / "checkpoints"
    tmp = root / f".tmp-ckpt-{state.step:08d}"
    final = root / f"ckpt-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps(state.state_dict()))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        complete = sorted((d for d in root.glob("ckpt-*") if (d / "state.json").exists()),
                          key=lambda d: json.loads((d / "state.json").read_text())["step"])
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def optimizer_step(accelerator: Accelerator, optimizer: torch.optim.Optimizer, params, clip_grad: float,
                   lr: float) -> None:
    """Clip the gradient norm on the micro-batch that syncs gradients, set the scheduled learning rate, step
    and clear the gradients (inside ``accelerator.accumulate``, Accelerate skips the step until the sync)."""
    if accelerator.sync_gradients and clip_grad > 0:
        accelerator.clip_grad_norm_(params, clip_grad)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def resume_and_track(accelerator: Accelerator, state: TrainState, out_dir: Path, resume: bool, run_name: str,
                     cfg: Any) -> None:
    """Load the latest complete checkpoint when resuming (the state object is restored with it), then
    start the trackers with the resolved config."""
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            log.info("no complete checkpoint in %s: starting from scratch", out_dir / "checkpoints")
        else:
            accelerator.load_state(str(ckpt))
            log.info("resumed from %s at step %d (epoch %d)", ckpt, state.step, state.epoch)
    if accelerator.log_with and not accelerator.trackers:
        accelerator.init_trackers(run_name, config={k: str(v) for k, v in cfg.to_dict().items()})


# ------------------------------------------------------------------------------------------------- train
def make_accelerator(cfg: TrainCfg, out_dir: Path) -> Accelerator:
    tracker = None
    if cfg.tracker in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401  (optional)
            tracker = "tensorboard"
        except ImportError:
            if cfg.tracker == "tensorboard":
                raise ImportError("--tracker tensorboard needs the tensorboard package") from None
    # Without a GPU, ask for the CPU explicitly: then `accelerate launch --multi_gpu --num_processes N`
    # (torchrun) gives real multi-process CPU training instead of N unrelated single-process runs.
    has_gpu = torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    return Accelerator(cpu=not has_gpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                       log_with=tracker, project_config=ProjectConfiguration(project_dir=str(out_dir)),
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def start_run(cfg: Any, config_name: str) -> tuple[Accelerator, Path]:
    """The accelerator of a run, the seed set, and its resolved config written into ``cfg.output_dir``."""
    out_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out_dir)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / config_name).write_text(json.dumps(cfg.to_dict(), indent=2))
    return accelerator, out_dir


def train(cfg: TrainCfg, manifest: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run one stage; returns a summary (steps, losses, skipped clips, output paths)."""
    accelerator, out_dir = start_run(cfg, "train_config.json")
    caption_emb, caption_dim = None, None
    if cfg.stage == "1":
        if not cfg.captions:
            raise ValueError("stage 1 needs pre-computed caption embeddings: --captions FILE "
                             "(make them with scripts/embed_captions.py)")
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
    trainer = M2DCLAPPretrainer(model, cfg.mask_ratio, cfg.lambda_m2d, cfg.lambda_clap,
                                accelerator.num_processes, accelerator.process_index)
    loader, optimizer, peak_lr, eff_batch = loader_and_optimizer(
        cfg, ds, collate, trainer, model.no_weight_decay(), accelerator.num_processes)
    trainer, optimizer, loader = accelerator.prepare(trainer, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps <= 0 else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    resume_and_track(accelerator, state, out_dir, resume, f"stage{cfg.stage}", cfg)
    sched = dict(total=total, warmup=warmup, peak=peak_lr, floor=cfg.min_lr)
    history = run_epochs(cfg, accelerator, trainer, optimizer, loader, ds, state, sched)
    if state.step % cfg.checkpoint_every:  # else the loop has just saved this step
        save_checkpoint(accelerator, state, out_dir, cfg.keep_checkpoints)
    summary = {"stage": cfg.stage, "steps": state.step, "skipped_clips": state.skipped, "peak_lr": peak_lr,
               "effective_batch": eff_batch, "final_losses": history[-1] if history else {}}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(trainer).model
        final.save_pretrained(out_dir / "model", stage=cfg.stage, steps=state.step)
        summary["model"] = str(out_dir / "model")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary


def run_epochs(cfg: TrainCfg, accelerator: Accelerator, trainer, optimizer, loader, ds, state: TrainState,
               sched: dict[str, float]) -> list[dict[str, float]]:
    """The inner loop; returns the logged loss history."""
    inner = accelerator.unwrap_model(trainer)
    model = inner.model
    params = [p for p in trainer.parameters() if p.requires_grad]
    history: list[dict[str, float]] = []
    out_dir = Path(cfg.output_dir)
    bar = tqdm(total=sched["total"], initial=state.step, desc=f"stage {cfg.stage}", unit="step",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    running: dict[str, float] = {}
    last_good = None
    t0 = time.time()
    while state.step < sched["total"] and state.epoch < cfg.epochs:
        ds.set_epoch(state.epoch)
        loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in batches:
            state.batch_in_epoch += 1
            state.skipped += len(batch.get("skipped", []))
            if batch["size"] == 0:  # every clip was bad: repeat the last good batch so that all processes
                if last_good is None:  # still meet in the same collectives
                    raise ValueError(f"the first batch had only unreadable clips: {batch['skipped']}")
                batch = last_good
            last_good = batch
            batch, groups = fill_batch(batch, cfg.batch_size)
            with accelerator.accumulate(trainer):
                lms = (batch["lms"] - model.norm_stats[0]) / model.norm_stats[1]  # normalise (B, 1, F, T)
                text = {"text_emb": batch["caption_emb"]} if cfg.stage == "1" else {"texts": batch["caption"]}
                out = trainer(lms, positive_groups=groups, **text)
                accelerator.backward(out["loss"])
                lr = lr_at(state.step, int(sched["total"]), int(sched["warmup"]), sched["peak"], sched["floor"])
                optimizer_step(accelerator, optimizer, params, cfg.clip_grad, lr)
            for k, v in out.items():  # summed on the device: a host sync only when a line is logged
                running[k] = running.get(k, 0.0) + v.detach()
            running["n"] = running.get("n", 0) + 1
            if not accelerator.sync_gradients:
                continue
            inner.update_target(ema_momentum(state.step, int(sched["total"]), cfg.ema_start, cfg.ema_end))
            model.clamp_logit_scale()
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == sched["total"]:
                logs = {k: float(v) / running["n"] for k, v in running.items() if k != "n"}
                logs.update(lr=lr, step=state.step, epoch=state.epoch, samples_per_s=
                            running["n"] * cfg.batch_size * accelerator.num_processes / max(time.time() - t0, 1e-9))
                history.append(logs)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                accelerator.log(logs, step=state.step)
                log.info("stage %s step %d: %s", cfg.stage, state.step,
                         " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k not in ("step",)))
                running, t0 = {}, time.time()
            if state.step % cfg.checkpoint_every == 0:
                save_checkpoint(accelerator, state, out_dir, cfg.keep_checkpoints)
            if state.step >= sched["total"]:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        break
    bar.close()
    return history
