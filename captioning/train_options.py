"""The options of ``python -m captioning.train`` and the dataset presets that fill the unset ones."""

from __future__ import annotations

from dataclasses import dataclass

from m2dclap.cli import option

from .data import CAPTION_SAMPLING
from .features import DATASET_PRESETS, DEFAULT_CLAP_CHECKPOINT, dataset_preset

SELECTION_METRICS = ("auto", "spider", "cider_d")
TOP_K = 5


def apply_presets(args) -> None:
    """Fill the unset ``--bart``, ``--batch-size``, ``--lr`` and ``--warmup`` from the dataset preset."""
    preset = DATASET_PRESETS.get(dataset_preset(args) or "", {})
    if args.bart is None:  # the offline demo trains a tiny BART; real datasets get the paper's bart-base
        args.bart = "tiny" if not args.dataset else "facebook/bart-base"
    if args.caption_sampling is None:  # the demo keeps its 15 epochs in minutes: one caption per clip and epoch
        args.caption_sampling = "one" if not args.dataset else "all"
    for name, default in (("batch_size", 16), ("lr", None), ("warmup", None)):
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))


@dataclass(kw_only=True)
class TrainOptions:
    """The options of ``python -m captioning.train``; unset dataset-dependent ones are filled by
    :func:`apply_presets`."""

    clap: str = option("m2d-clap", help="CLAP backend")
    clap_checkpoint: str | None = option(
        None, metavar="C", help=f"CLAP checkpoint (default for m2d-clap: {DEFAULT_CLAP_CHECKPOINT})"
    )
    dataset: list[str] | None = option(
        None,
        metavar="audiocaps|clotho|MANIFEST",
        help="audiocaps or clotho (with --data-root; the paper's learning rate and "
        "EnCLAP's warm-up and batch), manifest(s) with train/val/test splits, or "
        "one preprocess index.csv / cache folder; default: the embedded "
        "synthetic corpus",
    )
    data_root: str | None = option(
        None, metavar="DIR", help="the AudioCaps or Clotho v2.1 folder (CSV files and audio)"
    )
    audio_pattern: str | None = option(
        None,
        metavar="PATTERN",
        help="AudioCaps audio file names, e.g. 'Y{youtube_id}.wav' (default '{youtube_id}.wav')",
    )
    codec: str = option(
        "auto",
        metavar="auto|pretrained|random|PATH",
        help="EnCodec weights for preprocessing (auto: the published weights if cached, else random)",
    )
    n_clips: int = option(2000, minimum=1, help="size of the embedded corpus (no --dataset)")
    corpus_dir: str | None = option(
        None, metavar="DIR", help="where the embedded corpus lives (default: m2dclap's cache)"
    )
    bart: str | None = option(
        None,
        metavar="NAME|tiny",
        help="BART: 'tiny' (random init, word-level tokenizer from the training captions; "
        "offline) or a Hugging Face name / folder (default: tiny on the embedded corpus, "
        "facebook/bart-base with --dataset)",
    )
    output_dir: str = option(
        "runs/captioning/default",
        metavar="DIR",
        help="run folder: cache/, checkpoints/ (top epochs), state/ (resumable checkpoints), run.json",
    )
    epochs: int = option(15, minimum=1, help="training epochs (EnCLAP and the paper: 15)")
    lr: float | None = option(
        None,
        help="peak learning rate (default: the paper's 6e-6 for audiocaps and other "
        "datasets, 4e-6 for clotho; 5e-4 for tiny)",
    )
    warmup: int | None = option(
        None,
        minimum=0,
        help="warm-up steps (default: EnCLAP's 2000 for audiocaps and other datasets, 1000 "
        "for clotho; 10%% of the run, at most 1000, for tiny)",
    )
    batch_size: int | None = option(
        None, minimum=1, help="global batch size (default: EnCLAP's 16 for audiocaps and other datasets, 64 for clotho)"
    )
    weight_decay: float = option(0.01, help="AdamW weight decay, none on biases and norms")
    clip_grad: float = option(1.0, help="gradient-norm clipping (0: off)")
    caption_sampling: str | None = option(
        None,
        choices=CAPTION_SAMPLING,
        help="all: every (clip, caption) pair once per epoch, as EnCLAP's "
        "one-row-per-caption training CSVs (default with --dataset); one: one "
        "caption per clip, drawn per epoch (default on the embedded corpus, "
        "whose 15 epochs then take minutes)",
    )
    max_steps: int | None = option(
        None, minimum=1, help="stop after this many optimiser steps (the weights are then validated and checkpointed)"
    )
    max_val: int | None = option(None, minimum=2, help="validate on at most this many clips")
    val_beams: int | None = option(None, minimum=1, help="beam size for validation (default: the model's 4)")
    top_k: int = option(TOP_K, minimum=1, help="epoch checkpoints kept")
    selection_metric: str = option(
        "auto",
        choices=SELECTION_METRICS,
        help="validation metric that ranks the checkpoints: spider as EnCLAP (needs Java "
        "and SPICE's CoreNLP jars), cider_d, or auto (spider when SPICE can run, "
        "else cider_d)",
    )
    seed: int = option(1115, help="random seed (EnCLAP's 1115)")
    grad_accum: int = option(1, minimum=1, help="micro-batches per optimiser step")
    checkpoint_every: int = option(
        0,
        minimum=0,
        help="optimiser steps between extra resumable checkpoints (default 0: at epoch "
        "ends only); a resumed run continues at the exact batch where its "
        "checkpoint was written",
    )
    resume: bool = option(False, help="continue from the latest checkpoint in OUTPUT_DIR/state")
    mixed_precision: str | None = option(
        None,
        choices=("no", "fp16", "bf16"),
        help="autocast for the training steps (default: accelerate's configuration "
        "or launch flag, else no); bf16 runs on CPUs too, fp16 needs a GPU",
    )
    num_workers: int = option(0, minimum=0, help="DataLoader workers")
    no_progress: bool = option(False, help="no progress bars (preprocessing)")
    quiet: bool = option(False, aliases="-q", help="only warnings and errors")
