"""Retrieval fine-tuning of an M2D-CLAP checkpoint: the paper's stage 2.1 (III-B2c, IV-A2c) as a task of the
training engine (``m2dclap.train.engine``), with its defaults from the one stage-2.1 definition
(``m2dclap.stages.STAGES["2.1"]``).

    accelerate launch -m retrieval.finetune --checkpoint runs/default/stage2/model \
        --train clotho,audiocaps,wavcaps --val clotho --clotho-root data/clotho --audiocaps-root data/audiocaps \
        --wavcaps-json data/wavcaps/json_files --wavcaps-audio data/wavcaps/audio --output-dir runs/ft

As the paper's stage 2.1: the audio encoder stays frozen (``--train-audio-encoder`` unfreezes it), the audio
projector, text encoder and temperature are trained with the symmetric contrastive loss (Eq. 3-4) gathered
across processes with gradients, no masking, several datasets mixed. Several captions (or datasets) of one
clip in a batch are positives of each other (``positive_groups``), as in WavCaps and the DCASE 2025 baseline.
Validation T2A mAP@10 (CLAP convention) after every epoch, and once before training; the best model is kept
in ``OUTPUT/best``; ``--resume`` continues from the last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import m2dclap
from m2dclap.clap import ContrastiveLoss
from m2dclap.cli import EXIT_OK, EXIT_SKIPPED, TEXT_MODEL_HELP, CliError, OptionParser, UsageError, option, run_cli
from m2dclap.data.manifest import Record, apply_exclusions, read_exclusion_list
from m2dclap.embed_files import embed_files, min_samples_of, report_skipped
from m2dclap.stages import STAGES
from m2dclap.train.engine import Engine, KeepBest, LoopCfg, cosine_schedule, loader_and_adamw, start_run

# the data (dataset specs, training items, collate) lives in finetune_data; public from here as before
from .finetune_data import TRAIN_SPLITS, VAL_SPLITS, CaptionedClips, collate, read_sets
from .metrics import caption_retrieval

log = logging.getLogger(__name__)

STAGE = STAGES["2.1"]  # the paper's stage 2.1: CLAP only, no masking, the audio encoder frozen
CHOICES = {
    "sample": ("captions", "clips"),
    "on_bad_audio": ("skip", "fail"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "tracker": ("auto", "none", "tensorboard"),
}


@dataclass
class RetrievalFinetuneCfg:
    """One fine-tuning run. Defaults follow the paper's stage 2.1 (= stage 2 settings without masking)."""

    checkpoint: str = option("", help="model to start from (folder, official .pth or pretrained name)")
    text_model: str = option("", help=TEXT_MODEL_HELP)
    train: str = option(
        "synthetic", help="comma list of clotho, audiocaps, wavcaps, synthetic, NAME:SPLIT or manifest files"
    )
    val: str = option(
        "synthetic", help="the same for validation (each set scored separately, the mean T2A mAP@10 selects)"
    )
    output_dir: str = option("runs/retrieval-finetune", help="checkpoints, best/ and model/, summary.json")
    clotho_root: str = option("", help="Clotho v2.1 folder")
    audiocaps_root: str = option("", help="AudioCaps folder (train/val/test.csv and audio)")
    audiocaps_pattern: str = option("{youtube_id}.wav", help="AudioCaps audio file name pattern")
    wavcaps_json: str = option("", help="WavCaps JSON file or folder")
    wavcaps_audio: str = option("", help="WavCaps audio folder (default: the JSON's folder)")
    wavcaps_pattern: str = option("{stem}.flac", help="WavCaps audio file name pattern")
    synthetic_root: str = option("", help="embedded corpus folder (default: the suite's cache)")
    exclude: str = option("", help="clips never to train on (e.g. the DCASE 2025 excluded Freesound ids)")
    train_audio_encoder: bool = option(False, help="stage 2.1 keeps the audio encoder frozen")
    freeze_text: bool = option(False, help="train the audio projector only (cheap adaptation)")
    sample: str = option(
        "captions",
        choices=CHOICES["sample"],
        help="captions: every caption once per epoch; clips: one random caption per clip",
    )
    epochs: int = option(STAGE["epochs"], help="paper stage 2.1 (m2dclap.stages)")
    warmup_epochs: float = option(float(STAGE["warmup_epochs"]), help="paper stage 2.1")
    batch_size: int = option(64, help="per process")
    grad_accum: int = option(1, help="micro-batches per optimiser step")
    blr: float = option(STAGE["blr"], help="paper base learning rate; lr = blr * effective batch / 256")
    lr: float = option(0.0, help="absolute learning rate (overrides blr when > 0)")
    min_lr: float = option(0.0, help="end of the cosine")
    weight_decay: float = option(0.05, help="AdamW, not on biases, norms, tokens")
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas")
    clip_grad: float = option(3.0, help="gradient-norm clip (0 = off)")
    crop_seconds: float = option(STAGE["crop_seconds"], help="random crop of longer clips (paper stage 2.1: 10 s)")
    val_batch_size: int = option(32, help="clips per encoder batch at validation")
    checkpoint_every: int = option(0, help="optimiser steps between extra resumable checkpoints (0 = at epoch ends)")
    keep_checkpoints: int = option(2, help="resumable checkpoints kept")
    on_bad_audio: str = option(
        "skip",
        choices=CHOICES["on_bad_audio"],
        help="skip (undecodable, empty, NaN/Inf or too-short clips named; exit 1) or fail",
    )
    mixed_precision: str = option("no", choices=CHOICES["mixed_precision"], help="no, fp16, bf16")
    num_workers: int = option(0, help="DataLoader workers")
    seed: int = option(0, help="everything random derives from it")
    log_every: int = option(10, help="optimiser steps between log lines")
    tracker: str = option(
        "auto", choices=CHOICES["tracker"], help="auto (TensorBoard when installed), none, tensorboard"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def _sharded(accelerator, n: int, fn, batch_size: int) -> torch.Tensor:
    """Rows ``fn(indices)`` for 0..n-1, computed on the processes in turn and gathered in order."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1 or n < world:
        return torch.cat([fn(list(range(s, min(n, s + batch_size)))) for s in range(0, n, batch_size)])
    mine = list(range(rank, n, world))
    local = torch.cat([fn(mine[s : s + batch_size]) for s in range(0, len(mine), batch_size)])
    per = math.ceil(n / world)
    pad = torch.full((per - local.shape[0], local.shape[1]), math.nan)
    gathered = accelerator.gather(torch.cat([local, pad]).to(accelerator.device)).cpu()  # (world * per, D)
    order = torch.tensor([r + world * j for r in range(world) for j in range(per)])
    out = torch.full((n, local.shape[1]), math.nan)
    keep = order < n
    out[order[keep]] = gathered[keep]
    return out


def validate(accelerator, model, sets: list[tuple[str, list[Record]]], batch_size: int) -> dict[str, Any]:
    """CLAP-convention retrieval on every validation set with whole clips; unreadable clips are dropped."""
    model.eval()
    results = {}
    for name, records in sets:
        captions = [c for r in records for c in r.captions]
        owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
        text = _sharded(
            accelerator, len(captions), lambda idx: model.encode_text([captions[i] for i in idx]).float().cpu(), 64
        )

        def audio_rows(idx: list[int]) -> torch.Tensor:
            """Embeddings of the clips ``idx``; a skipped clip gets a row of NaN (dropped below)."""
            out, skips = embed_files(model, [records[i].audio for i in idx], batch_size)
            skipped.extend(reason for _, reason in skips)
            return out

        skipped: list[str] = []
        audio = _sharded(accelerator, len(records), audio_rows, batch_size)
        good = ~torch.isnan(audio).any(1)
        remap = torch.cumsum(good.long(), 0) - 1
        keep_caps = good[owner]
        results[name] = caption_retrieval(text[keep_caps], audio[good], remap[owner[keep_caps]], "clap")
        results[name]["skipped"] = skipped
    model.train()
    return results


def val_score(results: dict[str, Any]) -> float:
    """The selection metric: text->audio mAP@10 averaged over the validation sets."""
    return float(np.mean([r["text_to_audio"]["mAP@10"] for r in results.values()]))


# ------------------------------------------------------------------------------------------------ train
def finetune_retrieval(cfg: RetrievalFinetuneCfg, resume: bool = False) -> dict[str, Any]:
    """Run the fine-tuning; returns the summary (also written to ``OUTPUT/summary.json``)."""
    accelerator, out_dir = start_run(cfg, "finetune_config.json")
    # the data sets are read first: bad input is reported before the model is loaded
    train_sets, val_sets = read_sets(cfg, cfg.train, TRAIN_SPLITS), read_sets(cfg, cfg.val, VAL_SPLITS)
    model = m2dclap.load(cfg.checkpoint, text_name=cfg.text_model or None)
    model.set_trainable(audio_encoder=cfg.train_audio_encoder, audio_proj=True, text=not cfg.freeze_text)
    records = [r for _, rs in train_sets for r in rs]
    if cfg.exclude:
        records, removed = apply_exclusions(records, read_exclusion_list(cfg.exclude))
        log.info("excluded %d training clips listed in %s", removed, cfg.exclude)
    ds = CaptionedClips(
        records, model.sample_rate, cfg.crop_seconds, cfg.sample, cfg.seed, cfg.on_bad_audio, min_samples_of(model)
    )
    loader, optimizer, peak, eff_batch = loader_and_adamw(
        cfg, ds, collate, model, model.no_weight_decay(), accelerator.num_processes, "training items"
    )
    loss_fn = ContrastiveLoss(accelerator.num_processes, accelerator.process_index)

    def validation(engine: Engine) -> dict[str, Any]:
        results = validate(accelerator, model, val_sets, cfg.val_batch_size)
        metrics = {
            "score": val_score(results),
            "val": {
                name: {
                    d: {k: v for k, v in r[d].items() if k.startswith(("R@", "mAP"))}
                    for d in ("text_to_audio", "audio_to_text")
                }
                for name, r in results.items()
            },
        }
        val_skipped = sorted({f for r in results.values() for f in r["skipped"]})
        return {**metrics, "val_skipped": val_skipped} if val_skipped else metrics

    def save_best(folder: Path, entry: dict[str, Any]) -> None:
        model.save_pretrained(folder, stage="2.1-retrieval", epoch=entry["epoch"], val_t2a_map10=entry["score"])

    loop = LoopCfg.from_run(
        cfg, checkpoint_epochs=True, eval_at_start=True, metric="score", name="retrieval fine-tuning"
    )
    engine = Engine(
        accelerator,
        loop,
        model,
        optimizer,
        loader,
        lambda module, batch: {"loss": batch_loss(module, batch, loss_fn, model.sample_rate)},
        cosine_schedule(peak, cfg.min_lr, cfg.warmup_epochs, cfg.epochs),
        evaluate=validation,
        after_update=lambda engine: model.clamp_logit_scale(),
        on_epoch=ds.set_epoch,
        rows=lambda batch: len(batch["waves"]),
        keep=KeepBest(lambda entry: out_dir / "best", save_best),
    )
    if resume:
        engine.resume("retrieval-finetune", cfg.to_dict())
    else:
        engine.start_trackers("retrieval-finetune", cfg.to_dict())
    info = log.info if accelerator.is_main_process else log.debug
    info(
        "training on %s (%d items, %d clips), validating on %s; lr %.3g, effective batch %d",
        ", ".join(n for n, _ in train_sets),
        len(ds),
        len(records),
        ", ".join(n for n, _ in val_sets),
        peak,
        eff_batch,
    )
    engine.model.train()  # validate() puts the model back in training mode after each evaluation
    engine.fit()
    state = engine.state
    val_skipped = sorted({f for entry in state.evals for f in entry.get("val_skipped", [])})
    summary = {
        "checkpoint": cfg.checkpoint,
        "steps": state.step,
        "epochs": state.epoch,
        "skipped_clips": state.skipped,
        "skipped_files": sorted(engine.skipped_items),
        "val_skipped_files": val_skipped,
        "peak_lr": peak,
        "effective_batch": eff_batch,
        "initial_score": state.evals[0]["score"],
        "best_score": state.best["score"],
        "best_epoch": state.best["epoch"],
        "history": state.evals,
        "best_model": str(out_dir / "best"),
        "final_model": str(out_dir / "model"),
        "processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        model.save_pretrained(out_dir / "model", stage="2.1-retrieval", steps=state.step)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return {**summary, "main_process": accelerator.is_main_process}


def batch_loss(model, batch: dict[str, Any], loss_fn: ContrastiveLoss, sample_rate: int) -> torch.Tensor:
    """Eq. 3-4 on one batch, items of the same audio file being positives of each other."""
    out = model(audio=batch["waves"], texts=batch["captions"], sample_rate=sample_rate)
    groups = batch["groups"].to(out["audio_features"].device)
    return loss_fn(out["audio_features"], out["text_features"], out["logit_scale"], positive_groups=groups)[
        "contrastive_loss"
    ]


# -------------------------------------------------------------------------------------------------- CLI
DESCRIPTION = (
    "Fine-tune an M2D-CLAP checkpoint for audio-text retrieval, the paper's stage 2.1 (m2dclap.stages): frozen audio "
    "encoder (--train-audio-encoder to unfreeze), audio projector + text encoder trained with the contrastive loss "
    "gathered across processes, several datasets mixed, duplicates of a clip in a batch treated as positives. "
    "Validation text->audio mAP@10 (CLAP convention) before training and after every epoch; the best model is kept "
    "in OUTPUT/best, the last in OUTPUT/model; --resume continues an interrupted run at the batch where it stopped. "
    "Also runs as python -m retrieval.finetune (one process)."
)
EPILOG = (
    "datasets (--train/--val): comma lists of clotho, audiocaps, wavcaps, synthetic (the embedded corpus), "
    "NAME:SPLIT (e.g. clotho:evaluation), or manifest files (.csv/.jsonl, split train/val).\n"
    "example:\n  accelerate launch -m retrieval.finetune --checkpoint runs/default/stage2/model "
    "--train clotho,audiocaps --val clotho --clotho-root data/clotho --audiocaps-root data/audiocaps\n"
    "exit status 1 also covers clips skipped as bad audio in training (with --on-bad-audio skip) and "
    "validation."
)


@dataclass(kw_only=True)
class RetrievalFinetuneOptions(RetrievalFinetuneCfg):
    betas: list[float] = option(default_factory=lambda: [0.9, 0.95], metavar="B", help="AdamW betas (two values)")
    resume: bool = option(False, help="continue from the last complete checkpoint")
    quiet: bool = option(False, aliases="-q", help="only warnings and errors")


def build_parser() -> OptionParser:
    return OptionParser(RetrievalFinetuneOptions, prog=PROG, description=DESCRIPTION, epilog=EPILOG)


PROG = "accelerate launch -m retrieval.finetune"


def run(opts: RetrievalFinetuneOptions) -> int:
    values = {f.name: getattr(opts, f.name) for f in dataclasses.fields(RetrievalFinetuneCfg)}
    if len(values["betas"]) != 2:
        raise UsageError(f"--betas takes two values, got {len(values['betas'])}")
    cfg = RetrievalFinetuneCfg(**{**values, "betas": tuple(values["betas"])})
    if not cfg.checkpoint:
        raise UsageError("--checkpoint is required (a model folder, official .pth file or pretrained name)")
    try:
        summary = finetune_retrieval(cfg, resume=opts.resume)
    except m2dclap.CheckpointError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    if not summary["main_process"]:
        return EXIT_OK
    print(
        f"validation T2A mAP@10: start {100 * summary['initial_score']:.2f} -> best "
        f"{100 * summary['best_score']:.2f} (epoch {summary['best_epoch']}); best model in {summary['best_model']}"
    )
    bad = [(f, f"{f}: bad audio (training)") for f in summary["skipped_files"]]
    bad += [(f, f) for f in summary["val_skipped_files"]]
    rc = report_skipped(bad, what="clip", stream=sys.stderr)
    return EXIT_SKIPPED if rc or summary["skipped_clips"] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, RetrievalFinetuneOptions, argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG)


if __name__ == "__main__":
    sys.exit(main())
