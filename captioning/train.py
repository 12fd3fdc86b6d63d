"""Train the EnCLAP captioner on cached EnCodec tokens + CLAP embeddings.

    python -m captioning.train --clap m2d-clap [--clap-checkpoint C]
        [--dataset audiocaps|clotho --data-root DIR | --dataset MANIFEST ...] [--bart NAME|tiny]
        [--output-dir DIR] [--epochs 15] [--lr LR] [--batch-size B] [--resume] [--max-steps N]

Runs under ``accelerate launch`` too (``split_batches``: the batch size is the global batch, as in EnCLAP).
A task of the training engine (``m2dclap.train.engine``): gradient accumulation (``--grad-accum``), resumable
checkpoints in ``OUTPUT/state`` holding the exact data position (every epoch, and every ``--checkpoint-every``
steps), so ``--resume`` continues mid-epoch at the batch where the run stopped.

EnCLAP's settings: AdamW (weight decay 0.01, none on biases and LayerNorm), ``inverse_sqrt`` schedule with
linear warm-up, gradient clipping 1.0, 15 epochs, validation every epoch. ``--dataset audiocaps`` and
``--dataset clotho`` read the public layouts under ``--data-root`` and take the paper's peak learning rates,
6e-6 and 4e-6 for ``facebook/bart-base``, with the warm-up (2000, 1000) and global batch (16, 64) of EnCLAP's
base configurations; the offline ``tiny`` BART (random init) uses a larger default. The top 5 epoch
checkpoints by validation SPIDEr are kept, as in EnCLAP. SPICE needs the Stanford CoreNLP 3.6.0 jars; where
they are missing the checkpoints are ranked by validation CIDEr-D instead, and the log and ``run.json`` say so.

With no ``--dataset`` it trains on the embedded synthetic corpus: it generates the corpus, preprocesses it
(EnCodec with *random* weights unless the published weights are in the torch hub cache, since they cannot be
downloaded offline; the default M2D-CLAP checkpoint ``runs/default/stage2/model``), and trains a tiny BART
with a word-level tokenizer built from the training captions, on CPU in minutes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from m2dclap.cli import CliError, OptionParser, run_cli
from m2dclap.fileio import atomic_write_text
from m2dclap.train.engine import Engine, KeepBest, LoopCfg, make_accelerator

from .codec import DEFAULT_BANDWIDTH
from .data import CaptionDataset, build_word_tokenizer, make_collate, read_index
from .features import prepare_cache
from .metrics import MetricUnavailableError
from .train_options import TrainOptions, apply_presets
from .validation import choose_selection_metric, predict, validation_scores

log = logging.getLogger("captioning.train")

RUN_META = "run.json"
CKPT_META = "captioning.json"
STATE_DIR = "state"

# tiny BART for offline CPU runs (the vocabulary size is filled in from the word-level tokenizer)
TINY_BART = {
    "d_model": 128,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 256,
    "decoder_ffn_dim": 256,
    "max_position_embeddings": 1024,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
}


# --------------------------------------------------------------------------------------------- schedule
def inverse_sqrt_lr(step: int, peak: float, warmup: int, timescale: int | None = None) -> float:
    """Hugging Face ``get_inverse_sqrt_schedule``: linear warm-up over ``warmup`` steps, then
    ``peak / sqrt((step + timescale - warmup) / timescale)``; ``timescale`` defaults to ``warmup`` (or 10000)."""
    if timescale is None:
        timescale = warmup or 10_000
    if step < warmup:
        return peak * step / max(1, warmup)
    shift = timescale - warmup
    return peak / math.sqrt((step + shift) / timescale)


def param_groups(model: torch.nn.Module, weight_decay: float = 0.01) -> list[dict]:
    """EnCLAP / HF Trainer groups: weight decay except on biases and LayerNorm weights."""
    decay, no_decay = [], []
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0]
        (no_decay if name.endswith("bias") or owner in norms else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------ train
def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def checkpoint_name(entry: dict) -> str:
    """``epoch_NNN`` for a validation after a whole epoch; ``epoch_NNN_step_SSSSSSS`` when a run stopped (and
    was validated) inside epoch NNN, which a resumed run may finish and validate again."""
    name = f"epoch_{entry['epoch']:03d}"
    return f"{name}_step_{entry['step']:07d}" if entry.get("partial_epoch") else name


PROG = "python -m captioning.train"


def build_parser() -> OptionParser:
    return OptionParser(TrainOptions, prog=PROG, description=__doc__.split("\n\n")[0])


def run(opts: TrainOptions) -> int:
    try:
        apply_presets(opts)
        return train(opts)
    except (FileNotFoundError, ValueError, MetricUnavailableError) as e:
        raise CliError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, TrainOptions, argv, prog=PROG, description=__doc__.split("\n\n")[0])


def train(args) -> int:
    """Train the captioner on the training engine; returns the exit status."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(args.mixed_precision, args.grad_accum, out, split_batches=True)
    set_seed(args.seed)
    meta_path = out / RUN_META
    old_meta = json.loads(meta_path.read_text()) if (args.resume and meta_path.is_file()) else None
    requested = args.selection_metric
    if old_meta and requested == "auto":  # a resumed run keeps ranking by the metric it started with
        requested = old_meta.get("selection_metric", requested)
    selection, selection_note = choose_selection_metric(requested)
    index, feat = _features(acc, args, out)
    model, train_ds, val_loader, peak = build_model_and_data(args, index)
    loader = DataLoader(
        train_ds,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=False,
        collate_fn=make_collate(model.tokenize_captions),
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=peak)
    loop = LoopCfg(
        output_dir=str(out),
        epochs=args.epochs,
        max_steps=args.max_steps or 0,
        clip_grad=args.clip_grad,
        checkpoint_every=args.checkpoint_every,
        checkpoint_epochs=True,
        keep_checkpoints=2,
        checkpoint_dir=STATE_DIR,
        log_every=10,
        metric=selection,
        keep_top=args.top_k,
        name="captioning",
    )
    warmup = [args.warmup]  # known once the engine has counted the steps
    feat_meta = {k: feat.get(k) for k in ("codec", "bandwidth", "clap", "clap_checkpoint")}
    feat_meta["bandwidth"] = feat_meta["bandwidth"] or DEFAULT_BANDWIDTH

    def validate(engine: Engine) -> dict:
        scores = [None]
        if acc.is_main_process:  # one process decodes (beam search); the others wait for its scores
            raw = acc.unwrap_model(engine.model)
            preds, refs = predict(raw, val_loader, acc.device, num_beams=args.val_beams)
            raw.train()  # predict() leaves the model in evaluation mode
            scores = [validation_scores(preds, refs, selection)]
            log.info(
                "epoch %d: step %d, val %s (selection metric) %.4f, e.g. %r",
                engine.state.epoch + (engine.state.batch_in_epoch > 0),
                engine.state.step,
                selection,
                scores[0][selection],
                next(iter(preds.values()), ""),
            )
        broadcast_object_list(scores)
        return dict(scores[0])

    def save_checkpoint(folder: Path, entry: dict) -> None:
        acc.unwrap_model(engine.model).save_pretrained(folder)
        _write_json(
            folder / CKPT_META,
            {
                **feat_meta,
                "epoch": entry["epoch"],
                "step": entry["step"],
                "val": {k: entry[k] for k in entry if k not in _ENTRY_KEYS},
                "selection_metric": selection,
            },
        )

    engine = Engine(
        acc,
        loop,
        model,
        optimizer,
        loader,
        lambda module, b: {"loss": module(b["tokens"], b["token_mask"], b["clap"], b["labels"])["loss"]},
        lambda engine: inverse_sqrt_lr(engine.state.step + 1, peak, warmup[0]),
        evaluate=validate,
        on_epoch=lambda epoch: train_ds.set_epoch(epoch + 1),  # the dataset counts epochs from 1
        keep=KeepBest(lambda entry: out / "checkpoints" / checkpoint_name(entry), save_checkpoint),
        after_eval=lambda engine, entry: _write_meta(engine, meta, meta_path, selection),
    )
    total = engine.stop
    if warmup[0] is None:
        warmup[0] = min(1000, max(1, total // 10)) if args.bart == "tiny" else 2000
    meta = _run_meta(
        args,
        acc,
        selection,
        selection_note,
        index,
        feat,
        train_ds,
        val_loader.dataset,
        engine,
        peak,
        warmup[0],
        old_meta,
    )
    (log.info if selection == "spider" or args.selection_metric == "cider_d" else log.warning)(
        "checkpoint selection: %s; keeping the top %d epochs", selection_note, args.top_k
    )
    if args.resume:
        engine.resume("captioning", {})
    engine.model.train()
    engine.fit()
    if acc.is_main_process:
        log.info(
            "done: %d epoch(s), %d step(s); top checkpoints by %s: %s",
            engine.state.epoch,
            engine.state.step,
            selection,
            [(t["checkpoint"], round(t[selection], 4)) for t in meta.get("top_checkpoints", [])],
        )
        print(
            json.dumps(
                {
                    "output_dir": str(out),
                    "best_checkpoint": meta.get("best_checkpoint"),
                    "selection_metric": selection,
                    "top": meta.get("top_checkpoints", []),
                },
                indent=1,
            )
        )
    acc.end_training()
    return 0


_ENTRY_KEYS = {"epoch", "step", "train_loss", "eval_seconds", "partial_epoch", "kept", "checkpoint"}


def _features(acc, args, out: Path) -> tuple[Path, dict]:
    """The preprocess index and its feature settings: the main process makes the cache, the others read
    what it recorded."""
    feat_path = out / "features.json"
    if acc.is_main_process:
        index, feat = prepare_cache(args)
        _write_json(feat_path, {"index": str(index), **feat})
    acc.wait_for_everyone()
    if not acc.is_main_process:
        feat = json.loads(feat_path.read_text())
        index = Path(feat.pop("index"))
    return index, feat


def build_model_and_data(args, index: Path):
    """(captioner, training dataset, validation loader, peak learning rate) for the cached features."""
    from .model import EnClapCaptioner, EnClapCfg

    train_clips, val_clips = read_index(index, "train"), read_index(index, "val")
    if not train_clips:
        raise ValueError(f"{index}: no clips in the train split")
    if not val_clips:
        raise ValueError(f"{index}: no clips in the val split (validation selects the checkpoints)")
    if args.max_val:
        val_clips = val_clips[: args.max_val]
    clap_dim = int(np.load(train_clips[0].clap).shape[0])
    tiny = args.bart == "tiny"
    if tiny:  # the word-level vocabulary of the training captions (the same again on a resume)
        tok = build_word_tokenizer([c for clip in train_clips for c in clip.captions])
        cfg = EnClapCfg(bart_name="tiny", bart_config={**TINY_BART, "vocab_size": len(tok)}, clap_dim=clap_dim)
        model = EnClapCaptioner(cfg, tokenizer=tok)
    else:
        model = EnClapCaptioner(EnClapCfg(bart_name=args.bart, clap_dim=clap_dim))
    peak = args.lr if args.lr is not None else (5e-4 if tiny else 6e-6)
    train_ds = CaptionDataset(
        train_clips, training=True, max_frames=model.max_frames, seed=args.seed, captions=args.caption_sampling
    )
    val_ds = CaptionDataset(val_clips, training=False, max_frames=model.max_frames)
    val_loader = DataLoader(val_ds, batch_size=32, shuffle=False, collate_fn=make_collate(None))
    return model, train_ds, val_loader, peak


def _run_meta(
    args, acc, selection, selection_note, index, feat, train_ds, val_ds, engine, peak, warmup, old_meta
) -> dict:
    """What ``run.json`` records about the run (history and top checkpoints are added after each validation)."""
    meta = {
        "task": "captioning",
        "model": "EnCLAP",
        "bart": args.bart,
        "selection_metric": selection,
        "selection_note": selection_note,
        "dataset": args.dataset,
        "data_root": args.data_root,
        "top_k": args.top_k,
        "lr": peak,
        "warmup": warmup,
        "schedule": "inverse_sqrt",
        "optimizer": "AdamW",
        "weight_decay": args.weight_decay,
        "clip_grad": args.clip_grad,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "mixed_precision": acc.mixed_precision,
        "processes": acc.num_processes,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "index": str(Path(index).resolve()),
        **{f"features_{k}": v for k, v in feat.items()},
        "codec_note": (
            "EnCodec with seeded random weights (published weights not available offline)"
            if feat.get("codec") == "random"
            else "published EnCodec 24 kHz weights"
        ),
        "n_train": len(train_ds),
        "n_train_clips": len(train_ds.clips),
        "caption_sampling": args.caption_sampling,
        "n_val": len(val_ds),
        "steps_per_epoch": engine.steps_per_epoch,
        "total_steps": engine.stop,
        "started": (old_meta or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    log.info(
        "%d training items (%d clips, caption sampling %r) / %d val clips, %d steps per epoch, %d steps, "
        "peak lr %g, warm-up %d",
        len(train_ds),
        len(train_ds.clips),
        args.caption_sampling,
        len(val_ds),
        engine.steps_per_epoch,
        engine.stop,
        peak,
        warmup,
    )
    return meta


def _write_meta(engine: Engine, meta: dict, path: Path, selection: str) -> None:
    """``run.json`` after a validation: the history (with checkpoint names) and the kept top checkpoints."""
    if not engine.acc.is_main_process:
        return
    history = [{**e, "checkpoint": checkpoint_name(e)} for e in engine.state.evals]
    top = [
        {"epoch": k["epoch"], "checkpoint": Path(k["folder"]).name, selection: k["score"]} for k in engine.state.kept
    ]
    ckpt_root = Path(engine.cfg.output_dir) / "checkpoints"
    meta.update(
        {
            "history": history,
            "top_checkpoints": top,
            "best_checkpoint": str(ckpt_root / top[0]["checkpoint"]) if top else None,
            "epochs_done": history[-1]["epoch"] if history else 0,
            "steps_done": engine.state.step,
        }
    )
    _write_json(path, meta)


if __name__ == "__main__":
    sys.exit(main())
