"""``python -m captioning.metrics``: score a predictions CSV against a references CSV; ``... download``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from m2dclap.cli import CliError, option, run_cli
from m2dclap.fileio import atomic_write_text

from .download import download_fense_models, download_spice_models
from .errors import DOWNLOAD_COMMAND, MetricUnavailableError
from .io import read_predictions_csv, read_references_csv
from .scoring import FENSE_METRICS, available_metrics, evaluate_captions, normalise_metrics

PROG = "python -m captioning.metrics"

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


FENSE_GROUP = (
    "FENSE models (default: $CAPTION_METRICS_* or the published names; folders, the local caches, or "
    "the Hugging Face hub unless HF_HUB_OFFLINE is set)"
)


@dataclass(kw_only=True)
class FenseOptions:
    """The FENSE model options of the caption commands (a command's options dataclass inherits them)."""

    sbert: str | None = option(
        None, metavar="NAME|DIR", group=FENSE_GROUP, help="Sentence-BERT (default paraphrase-TinyBERT-L6-v2)"
    )
    echecker: str | None = option(
        None, metavar="NAME|CKPT", group=FENSE_GROUP, help="error detector (default echecker_clotho_audiocaps_base)"
    )
    echecker_bert: str | None = option(
        None,
        metavar="NAME|DIR",
        group=FENSE_GROUP,
        help="tokenizer/config of the echecker's BERT (default: the model_type in the checkpoint)",
    )


def fense_options(opts: Any, device: str = "cpu") -> dict:
    """Keyword arguments of :meth:`FenseScorer.load` from options holding ``sbert``, ``echecker``, ``echecker_bert``."""
    return {"sbert": opts.sbert, "echecker": opts.echecker, "echecker_bert": opts.echecker_bert, "device": device}


@dataclass(kw_only=True)
class ScoreOptions(FenseOptions):
    predictions: str = option(metavar="P.csv", help="CSV: file_name,caption")
    references: str = option(metavar="R.csv", help="CSV: file_name,caption_1..caption_N")
    metrics: list[str] | None = option(None, metavar="METRIC", help="default: every metric that can run here")
    out: str | None = option(None, metavar="JSON", help="write {'corpus': ..., 'per_clip': ...} JSON here")
    no_tokenize: bool = option(False, help="skip PTB tokenisation (text already tokenised)")


@dataclass(kw_only=True)
class DownloadOptions:
    only: str | None = option(None, choices=("spice", "fense"), help="fetch only this part (default: both)")
    dir: str | None = option(
        None, metavar="SPICE_DIR", help="SPICE folder (default: $CAPTION_METRICS_SPICE_DIR or pycocoevalcap's spice/)"
    )


def download(opts: DownloadOptions) -> int:
    """``download``: the CoreNLP jars and/or the FENSE models; a failed download is exit 2 naming the URL."""
    try:
        if opts.only in (None, "spice"):
            print("SPICE jars ready:", ", ".join(map(str, download_spice_models(opts.dir))))
        if opts.only in (None, "fense"):
            print("FENSE models ready:", ", ".join(download_fense_models()))
    except MetricUnavailableError as exc:
        raise CliError(str(exc)) from None
    return 0


def unavailable_lines(why: Mapping[str, str]) -> list[str]:
    """One line per distinct reason: ``"spice, spider: unavailable (reason)"``."""
    by_reason: dict[str, list[str]] = {}
    for metric, reason in why.items():
        by_reason.setdefault(reason, []).append(metric)
    return [f"{', '.join(metrics)}: unavailable ({reason})" for reason, metrics in by_reason.items()]


def score(opts: ScoreOptions) -> int:
    """Read both files, score, print one line per metric (and what is unavailable), write ``--out``."""
    why: dict[str, str] = {}
    try:
        preds = read_predictions_csv(opts.predictions)
        refs = read_references_csv(opts.references)
        if opts.metrics:
            wanted, scorer = opts.metrics, None
            if any(m in FENSE_METRICS for m in normalise_metrics(wanted)):
                from .fense import FenseScorer

                scorer = FenseScorer.load(**fense_options(opts))
        else:
            wanted, why, scorer = available_metrics(fense_options(opts))
        corpus, per = evaluate_captions(
            preds, refs, wanted, tokenize=not opts.no_tokenize, return_per_clip=True, fense=scorer
        )
    except (MetricUnavailableError, ValueError, TypeError, OSError) as exc:
        raise CliError(str(exc)) from None
    for k, v in corpus.items():
        print(f"{k:9s} {v:.6f}")
    for line in unavailable_lines(why):
        print(line)
    if opts.out:
        result = {
            "n_clips": len(preds),
            "corpus": corpus,
            "per_clip": per,
            "unavailable": why,
            "fense_models": scorer.models if scorer is not None else None,
        }
        atomic_write_text(opts.out, json.dumps(result, indent=2))  # a killed run keeps the previous scores
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "download":
        return run_cli(
            download,
            DownloadOptions,
            argv[1:],
            prog=DOWNLOAD_COMMAND,
            description="Download what SPICE (Stanford CoreNLP 3.6.0 jars, ~390 MB zip) and FENSE "
            "(Sentence-BERT, error detector, BERT tokenizer) need.",
        )
    return run_cli(
        score,
        ScoreOptions,
        argv,
        prog=PROG,
        epilog=_EPILOG,
        description="Score predicted captions against references (coco-caption metrics, SPIDEr, FENSE, SPIDEr-FL).",
    )
