"""Stage 1.1: supervised AudioSet fine-tuning of the stage-1 audio encoder (paper III-B2a, IV-A2c, Table IV),
a task of the training engine.

    python -m m2dclap.train.finetune --init runs/stage1/model --data as2m.csv --output-dir runs/stage1.1

The recipe is the official EVAR one for AS2M (reference/m2d-official.md section 1, ``util/ft-as2m.sh``):
LARS at lr 2.0, batch 64, 70 epochs with 15 of warm-up, mixup 0.5, SpecAugment 30/192, structured patchout
0.5, no random resize crop, the position embedding resampled to 80x1001. The classifier is EVAR's TaskHead
(``m2dclap.tagging``); augmentation lives in ``m2dclap.augment``, the labelled data in
``m2dclap.data.labelled``, the options in ``m2dclap.train.config.FinetuneCfg``.

Only the encoder changes: the audio projector, text tower and temperature are saved untouched, so the result
loads with ``m2dclap.load``. The head is saved beside it as ``head.safetensors`` + ``head.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from ..augment import mixup, spec_augment
from ..checkpoint import CheckpointError
from ..cli import EXIT_OK, EXIT_SKIPPED, CliError, option, overrides_of, run_cli
from ..data.labelled import TaggingDataset, class_list, collate_tagging, read_labelled
from ..data.manifest import split_records
from ..embed_files import report_skipped
from ..fileio import atomic_write_text
from ..metrics import mean_average_precision
from ..tagging import AudioTagger, save_finetuned
from .config import FinetuneCfg, finetune_config
from .engine import (
    Engine,
    KeepBest,
    LoopCfg,
    TrainState,
    cosine_schedule,
    gather_for_metrics,
    param_groups,
    shuffled_loader,
    start_run,
)
from .lars import LARS

log = logging.getLogger(__name__)

__all__ = [
    "AudioTagger",
    "FinetuneCfg",
    "evaluate",
    "finetune",
    "finetune_config",
    "main",
    "mixup",
    "read_labelled",
    "save_finetuned",
    "spec_augment",
]


def build_optimizer(cfg: FinetuneCfg, tagger: nn.Module) -> torch.optim.Optimizer:
    """Biases, norms and tokens get no decay and (LARS) no trust ratio; weights get both."""
    groups = param_groups(tagger, cfg.weight_decay, {"encoder." + n for n in tagger.encoder.no_weight_decay()})
    groups[1]["lars_adapt"] = False
    if cfg.optimizer == "lars":
        return LARS(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            trust_coefficient=cfg.lars_trust,
            always_adapt=cfg.lars_always_adapt,
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, amsgrad=True)


def evaluate(
    tagger: nn.Module, loader: DataLoader, accelerator: Any, norm: torch.Tensor
) -> tuple[float, list[float], int]:
    """Macro mAP on a labelled loader: (mAP, per-class AP (NaN = no positive), clips that could not be read)."""
    was_training = tagger.training
    tagger.eval()
    scores, targets, valid = gather_for_metrics(
        accelerator,
        loader,
        lambda b: (tagger((b["lms"] - norm[0]) / norm[1]).float(), b["target"], b["valid"].to(torch.uint8)),
    )
    tagger.train(was_training)
    keep = valid.bool()
    mAP, aps, _ = mean_average_precision(targets[keep] > 0.5, scores[keep], no_positive="exclude")
    return mAP, [float(a) for a in aps], int((~keep).sum())


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
    make = dict(
        classes=classes,
        frontend_cfg=model.cfg.frontend,
        frames=cfg.input_size[1],
        on_bad_audio=cfg.on_bad_audio,
        seed=cfg.seed,
    )
    train_ds = TaggingDataset(train_recs, training=True, **make)
    tagger = AudioTagger(model.encoder, len(classes), cfg.head_pooling, cfg.training_mask, cfg.head_init_std)
    loader = shuffled_loader(train_ds, cfg, collate_tagging)
    val_loader = None
    if val_recs:  # its own generator: validating never draws from the global RNG, so resumes stay exact
        val_loader = accelerator.prepare(
            DataLoader(
                TaggingDataset(val_recs, training=False, **make),
                collate_fn=collate_tagging,
                batch_size=cfg.eval_batch_size or cfg.batch_size,
                num_workers=cfg.num_workers,
                generator=torch.Generator().manual_seed(cfg.seed),
            )
        )
    else:
        log.warning("%s has no val split: no validation, best/ is not written", cfg.data)
    norm = model.norm_stats.detach().clone().to(accelerator.device)

    def step(module: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mixup on the raw log-mels, normalise, SpecAugment, BCE over all classes."""
        x, y = mixup(batch["lms"], batch["target"], cfg.mixup, cfg.log_mixup_exp)
        x = spec_augment((x - norm[0]) / norm[1], cfg.freq_mask, cfg.time_mask)  # (B, 1, F, T)
        return {"loss": F.binary_cross_entropy_with_logits(module(x).float(), y.float())}

    def validate(engine: Engine) -> dict[str, Any]:
        mAP, _, bad = evaluate(engine.model, val_loader, accelerator, norm)
        return {"val_map": mAP, "val_unreadable": bad}

    def save_best(folder: Path, entry: dict[str, Any]) -> None:
        save_finetuned(
            model,
            accelerator.unwrap_model(engine.model),
            classes,
            folder,
            steps=entry["step"],
            val_map=entry["val_map"],
        )

    loop = LoopCfg.from_run(cfg, metric="val_map", name="stage 1.1")
    schedule = cosine_schedule(cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)  # over every epoch
    engine = Engine(
        accelerator,
        loop,
        tagger,
        build_optimizer(cfg, tagger),
        loader,
        step,
        schedule,
        evaluate=validate if val_loader is not None else None,
        on_epoch=train_ds.set_epoch,
        rows=lambda b: b["size"],
        keep=KeepBest(lambda entry: out_dir / "best", save_best),
    )
    set_seed(cfg.seed + accelerator.process_index)  # own augmentation draws per process (samplers are seeded)
    if resume:
        engine.resume("stage1.1", cfg.to_dict())
        finished = _finished_summary(cfg, engine.state, engine.stop, out_dir)
        if finished is not None:  # a no-op: the summary, model/ and best/ of the finished run stay as they are
            accelerator.end_training()
            return finished
    else:
        engine.start_trackers("stage1.1", cfg.to_dict())
    start = engine.state.step
    engine.model.train()
    history = engine.fit()
    return _finish(engine, model, classes, history, start)


def _finished_summary(cfg: FinetuneCfg, state: TrainState, stop: int, out_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that a resume finds finished (nothing left to train and ``summary.json`` written
    at that step), else None. Finishing again would overwrite it with an empty history."""
    if state.step < stop and state.epoch < cfg.epochs:
        return None
    try:
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # killed before the summary: finish the run (model/ and summary.json)
        return None
    if not isinstance(summary, dict) or summary.get("steps") != state.step:
        return None
    log.warning(
        "%s: the run already finished at step %d; nothing to resume (summary.json, model/ and best/ are "
        "left as they are; raise --max-steps or --epochs to train further)",
        out_dir,
        state.step,
    )
    return {**summary, "already_finished": True}


def _finish(engine: Engine, model, classes: list[str], history: list[dict[str, float]], start: int) -> dict[str, Any]:
    state, acc = engine.state, engine.acc
    out_dir = engine.out_dir
    tagger = acc.unwrap_model(engine.model)
    best = state.best
    summary = {
        "stage": "1.1",
        "steps": state.step,
        "resumed_from": start,
        "skipped_clips": state.skipped,
        "skipped_files": sorted(engine.skipped_items),
        "classes": len(classes),
        "pooling": tagger.pooling,
        "best_map": best["score"] if best else None,
        "best_step": best["step"] if best else None,
        "val_history": [e for e in state.evals if "val_map" in e],
        "final_losses": next((h for h in reversed(history) if "loss" in h), {}),
    }
    if acc.is_main_process:
        save_finetuned(model, tagger, classes, out_dir / "model", steps=state.step)
        summary["model"] = str(out_dir / "model")
        summary["best"] = str(out_dir / "best") if best else None
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    acc.end_training()
    return summary


# ------------------------------------------------------------------------------------------------- CLI
DESCRIPTION = (
    "Stage 1.1 of M2D-CLAP: fine-tune the stage-1 audio encoder on a labelled (AudioSet-style, multi-label) "
    "manifest with BCE, the paper's AS2M recipe (Table IV). Writes resumable checkpoints, best/ (best "
    "validation mAP) and model/ (last step), each loadable with m2dclap.load, with the classifier head in "
    "head.safetensors + head.json. Options not given keep the AS2M defaults (FinetuneCfg)."
)
_Overrides = overrides_of(FinetuneCfg, exclude=("input_size", "log_mixup_exp"), name="FinetuneOverrides")


@dataclass(kw_only=True)
class FinetuneOptions(_Overrides):
    input_size: str | None = option(
        None,
        metavar="MELSxFRAMES",
        help="mels x frames per input, e.g. 80x1001 (the default); the pos-embed is resampled to it",
    )
    linear_mixup: bool = option(False, help="mix log-mels linearly instead of log-mixup-exp (a sound mixture)")
    resume: bool = option(False, help="continue from the latest complete checkpoint")
    verbose: bool = option(False, aliases="-v", help="debug messages too")
    quiet: bool = option(False, aliases="-q", help="only warnings and errors")


def run(opts: FinetuneOptions) -> int:
    overrides = {
        f.name: getattr(opts, f.name) for f in dataclasses.fields(_Overrides) if getattr(opts, f.name) is not None
    }
    if opts.input_size is not None:
        overrides["input_size"] = opts.input_size
    if opts.linear_mixup:
        overrides["log_mixup_exp"] = False
    try:
        summary = finetune(finetune_config(**overrides), resume=opts.resume)
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise CliError(str(e).strip("'\"")) from None
    print(json.dumps(summary, indent=2))
    return exit_status(summary)


def exit_status(summary: dict[str, Any]) -> int:
    """1 when the run skipped clips as bad audio (each named on stderr; those skipped before a resume are
    counted in ``skipped_clips`` but named by the earlier run), else 0."""
    named = report_skipped(
        [(f, "bad audio (training)") for f in summary.get("skipped_files", [])], what="clip", stream=sys.stderr
    )
    return EXIT_SKIPPED if named or summary.get("skipped_clips") else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, FinetuneOptions, argv, prog="python -m m2dclap.train.finetune", description=DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
