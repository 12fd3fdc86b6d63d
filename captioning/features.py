"""The feature cache a captioning run trains on: a preprocess index given as the dataset, or a dataset
(AudioCaps, Clotho v2.1, manifests, the embedded corpus) preprocessed into ``OUTPUT_DIR/cache`` (EnCodec
tokens + CLAP embeddings)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .codec import DEFAULT_BANDWIDTH, LazyCodec

log = logging.getLogger("captioning.train")

DEFAULT_CLAP_CHECKPOINT = Path("runs/default/stage2/model")
# EnCLAP's base configurations (cfg/audiocaps/base.yaml, cfg/clotho/base.yaml: warm-up steps, global batch)
# with the paper's peak learning rates (section IV-C3: 6e-6 AudioCaps, 4e-6 Clotho); flags override them
DATASET_PRESETS = {
    "audiocaps": {"lr": 6e-6, "warmup": 2000, "batch_size": 16},
    "clotho": {"lr": 4e-6, "warmup": 1000, "batch_size": 64},
}


def dataset_preset(args) -> str | None:
    """``audiocaps`` or ``clotho`` when ``--dataset`` names one of them, else None."""
    ds = args.dataset or []
    return ds[0] if len(ds) == 1 and ds[0] in DATASET_PRESETS else None


def read_named_split(name: str, root: str | Path | None, split: str, audio_pattern: str | None = None):
    """``ReadResult`` of one split (train/val/test) of AudioCaps or Clotho v2.1 under ``root``."""
    from m2dclap.data.public import AUDIOCAPS_PATTERN, read_audiocaps, read_clotho

    if not root:
        raise ValueError(f"--dataset {name} needs --data-root (the folder holding the {name} CSV files and audio)")
    res = (
        read_clotho(root, split)
        if name == "clotho"
        else read_audiocaps(root, split, pattern=audio_pattern or AUDIOCAPS_PATTERN)
    )
    log.info("%s: %d clips on disk, %d listed but missing", res.source, len(res.records), len(res.missing))
    return res


def read_named_dataset(name: str, root: str | Path | None, audio_pattern: str | None = None) -> list:
    """Records of the train/val/test splits of AudioCaps or Clotho v2.1 under ``root``."""
    records = []
    for split in ("train", "val", "test"):
        res = read_named_split(name, root, split, audio_pattern)
        if not res.records and split != "test":
            raise FileNotFoundError(
                f"{res.source}: none of the {res.n_listed} listed clips is on disk "
                "(check --data-root and, for AudioCaps, --audio-pattern)"
            )
        records += res.records
    return records


def _auto_codec() -> str:
    from .codec import pretrained_checkpoint_path

    if pretrained_checkpoint_path().is_file():
        return "pretrained"
    log.warning(
        "the EnCodec 24 kHz weights are not in the torch hub cache and cannot be downloaded offline: "
        "using EnCodec with seeded RANDOM weights (its tokens carry little information; the CLAP "
        "embedding does the work). Pass --codec pretrained or --codec PATH when the weights are available."
    )
    return "random"


def prepare_cache(args) -> tuple[Path, dict]:
    """Return (index.csv, preprocess info): an existing preprocess index, or preprocess a manifest (the
    embedded corpus when no dataset is given) into ``OUTPUT_DIR/cache``."""
    from . import preprocess as pp
    from .clap_backends import get_backend

    datasets = list(args.dataset or [])
    if (
        len(datasets) == 1
        and Path(datasets[0]).name == pp.INDEX_NAME
        or (len(datasets) == 1 and (Path(datasets[0]) / pp.INDEX_NAME).is_file())
    ):
        index = Path(datasets[0])
        index = index / pp.INDEX_NAME if index.is_dir() else index
        meta = json.loads((index.parent / pp.META_NAME).read_text()) if (index.parent / pp.META_NAME).is_file() else {}
        clap_meta = meta.get("clap", {}).get(args.clap, {})
        return index, {
            "codec": meta.get("codec"),
            "bandwidth": meta.get("bandwidth", DEFAULT_BANDWIDTH),
            "clap": args.clap,
            "clap_checkpoint": clap_meta.get("checkpoint", args.clap_checkpoint),
            "clap_dim": clap_meta.get("dim"),
            "cache": str(index.parent),
        }

    from m2dclap.data.manifest import read_manifest

    if not datasets:
        from m2dclap.data.synthetic import default_corpus_dir, generate_corpus

        corpus_dir = Path(args.corpus_dir) if args.corpus_dir else default_corpus_dir()
        if not args.corpus_dir and args.n_clips != 2000:  # never regenerate the shared default corpus
            corpus_dir = corpus_dir.with_name(f"{corpus_dir.name}-n{args.n_clips}")
        datasets = [str(generate_corpus(corpus_dir, n_clips=args.n_clips, seed=0))]
        log.info("no --dataset: using the embedded synthetic corpus %s", datasets[0])
    clap_ckpt = args.clap_checkpoint
    if args.clap == "m2d-clap" and clap_ckpt is None:
        clap_ckpt = str(DEFAULT_CLAP_CHECKPOINT)
        if not DEFAULT_CLAP_CHECKPOINT.exists():
            raise FileNotFoundError(
                f"no --clap-checkpoint given and the default M2D-CLAP checkpoint {DEFAULT_CLAP_CHECKPOINT} is missing; "
                "make it with `accelerate launch scripts/pretrain.py` (the default pretraining run) or pass "
                "--clap-checkpoint C"
            )
    codec_source = args.codec if args.codec != "auto" else _auto_codec()
    preset = dataset_preset(args)
    records = (
        read_named_dataset(preset, args.data_root, args.audio_pattern)
        if preset
        else [r for d in datasets for r in read_manifest(d)]
    )
    cache = Path(args.output_dir) / "cache"
    clap = get_backend(args.clap, **({"checkpoint": clap_ckpt} if clap_ckpt is not None else {}))
    codec = LazyCodec(codec_source, DEFAULT_BANDWIDTH, "cuda" if torch.cuda.is_available() else "cpu")
    stats = pp.preprocess(
        records,
        cache,
        codec,
        clap,
        codec_source=codec_source,
        bandwidth=DEFAULT_BANDWIDTH,
        progress=not args.no_progress,
    )
    if stats["errors"]:
        log.warning("%d clip(s) could not be read (listed in %s)", len(stats["errors"]), cache / pp.ERRORS_NAME)
    return cache / pp.INDEX_NAME, {
        "codec": codec_source,
        "bandwidth": DEFAULT_BANDWIDTH,
        "clap": args.clap,
        "clap_checkpoint": (str(Path(clap_ckpt).resolve()) if clap_ckpt and Path(clap_ckpt).exists() else clap_ckpt),
        "clap_dim": clap.dim,
        "cache": str(cache),
    }
