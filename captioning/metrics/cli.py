"""``python -m captioning.metrics``: score a predictions CSV against a references CSV; ``... download``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

from m2dclap.fileio import atomic_write_text

from .download import download_fense_models, download_spice_models
from .errors import DOWNLOAD_COMMAND, MetricUnavailableError
from .io import read_predictions_csv, read_references_csv
from .scoring import FENSE_METRICS, available_metrics, evaluate_captions, normalise_metrics

_EPILOG = f"""\
input formats (UTF-8 CSV with a header row):
  predictions: file_name,caption                      one row per clip
  references:  file_name,caption_1,caption_2,...,caption_N   one row per clip; empty cells are skipped
  ('file_path' is accepted in place of 'file_name'.) Every clip must appear in both files.

metrics: bleu (bleu_1..bleu_4), meteor, rouge_l, cider_d, spice, spider, sbert_sim, fer, fense, spider_fl
  Without --metrics every metric that can run here is computed and the others are listed with the reason.
  PTB tokenisation, METEOR and SPICE need Java. SPICE and SPIDEr also need the Stanford CoreNLP 3.6.0 jars.
  FENSE, SBERT-sim, FER and SPIDEr-FL need Sentence-BERT paraphrase-TinyBERT-L6-v2 and the FENSE error
  detector (echecker_clotho_audiocaps_base.ckpt) with its BERT tokenizer, from folders or the local caches.

other command:
  {DOWNLOAD_COMMAND} [--only spice|fense] [--dir SPICE_DIR]
      fetch the CoreNLP 3.6.0 jars for SPICE and the FENSE models (internet needed)
"""


def _download_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=DOWNLOAD_COMMAND,
                                description="Download what SPICE (Stanford CoreNLP 3.6.0 jars, ~390 MB zip) and "
                                            "FENSE (Sentence-BERT, error detector, BERT tokenizer) need.")
    p.add_argument("--only", choices=("spice", "fense"), help="fetch only this part (default: both)")
    p.add_argument("--dir", default=None, help="SPICE folder (default: $CAPTION_METRICS_SPICE_DIR or pycocoevalcap's spice/)")
    args = p.parse_args(argv)
    try:
        if args.only in (None, "spice"):
            print("SPICE jars ready:", ", ".join(map(str, download_spice_models(args.dir))))
        if args.only in (None, "fense"):
            print("FENSE models ready:", ", ".join(download_fense_models()))
    except MetricUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def unavailable_lines(why: Mapping[str, str]) -> list[str]:
    """One line per distinct reason: ``"spice, spider: unavailable (reason)"``."""
    by_reason: dict[str, list[str]] = {}
    for metric, reason in why.items():
        by_reason.setdefault(reason, []).append(metric)
    return [f"{', '.join(metrics)}: unavailable ({reason})" for reason, metrics in by_reason.items()]


def add_fense_arguments(p: argparse.ArgumentParser) -> None:
    """The FENSE model options shared by the caption CLIs."""
    g = p.add_argument_group("FENSE models (default: $CAPTION_METRICS_* or the published names; folders, the local caches, or the "
        "Hugging Face hub unless HF_HUB_OFFLINE is set)")
    g.add_argument("--sbert", metavar="NAME|DIR", help="Sentence-BERT (default paraphrase-TinyBERT-L6-v2)")
    g.add_argument("--echecker", metavar="NAME|CKPT", help="error detector (default echecker_clotho_audiocaps_base)")
    g.add_argument("--echecker-bert", metavar="NAME|DIR",
                   help="tokenizer/config of the echecker's BERT (default: the model_type in the checkpoint)")


def fense_options(args: argparse.Namespace, device: str = "cpu") -> dict:
    return {"sbert": args.sbert, "echecker": args.echecker, "echecker_bert": args.echecker_bert, "device": device}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "download":
        return _download_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m captioning.metrics",
                                description="Score predicted captions against references (coco-caption metrics, "
                                            "SPIDEr, FENSE, SPIDEr-FL).",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="CSV: file_name,caption")
    p.add_argument("--references", required=True, help="CSV: file_name,caption_1..caption_N")
    p.add_argument("--metrics", nargs="+", help="default: every metric that can run here")
    p.add_argument("--out", default=None, help="write {'corpus': ..., 'per_clip': ...} JSON here")
    p.add_argument("--no-tokenize", action="store_true", help="skip PTB tokenisation (text already tokenised)")
    add_fense_arguments(p)
    args = p.parse_args(argv)
    why: dict[str, str] = {}
    try:
        preds = read_predictions_csv(args.predictions)
        refs = read_references_csv(args.references)
        if args.metrics:
            wanted, scorer = args.metrics, None
            if any(m in FENSE_METRICS for m in normalise_metrics(wanted)):
                from .fense import FenseScorer

                scorer = FenseScorer.load(**fense_options(args))
        else:
            wanted, why, scorer = available_metrics(fense_options(args))
        corpus, per = evaluate_captions(preds, refs, wanted, tokenize=not args.no_tokenize,
                                        return_per_clip=True, fense=scorer)
    except (MetricUnavailableError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, v in corpus.items():
        print(f"{k:9s} {v:.6f}")
    for line in unavailable_lines(why):
        print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {"n_clips": len(preds), "corpus": corpus, "per_clip": per, "unavailable": why,
                  "fense_models": scorer.models if scorer is not None else None}
        atomic_write_text(args.out, json.dumps(result, indent=2))  # a killed run keeps the previous scores
    return 0
