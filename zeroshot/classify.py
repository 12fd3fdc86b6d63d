"""Classify audio files into classes named on the command line, with no training (zero-shot).

    python -m zeroshot.classify dog.wav street.flac --checkpoint C --labels "dog,rain,siren" --top 3

Each label becomes a prompt ("dog can be heard", the paper's ESC-50 rule) unless ``--template`` gives
another ("the sound of {label}"; repeat it for a prompt ensemble). For each file the best classes are printed
with their probability (softmax over the labels of the cosine similarity times ``--scale``; sigmoid per label
with ``--multi-label``) and the cosine similarity itself. With the default ``--scale 1`` (EVAR's convention)
probabilities are close to uniform, the ranking is what matters; ``--scale 100`` gives CLIP-like ones.
Files that cannot be used (undecodable, empty, NaN/Inf, shorter than one STFT window) are named on stderr
and skipped. Exit status: 0 every file classified, 1 files were skipped, 2 bad input or usage.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Sequence

from m2dclap import CheckpointError
from m2dclap.embed_files import report_skipped

from ._cli import add_text_model_option, cli_error, cli_logging, load_model, resolve_device
from .classifier import ZeroShotClassifier
from .templates import TemplateError, as_template_list

PROG = "python -m zeroshot.classify"


def parse_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """Labels from a comma-separated string and/or a file with one label a line; duplicates removed."""
    out: list[str] = []
    if labels:
        out += [lab.strip() for lab in labels.split(",")]
    if labels_file:
        out += [line.strip() for line in Path(labels_file).read_text(encoding="utf-8").splitlines()]
    out = list(dict.fromkeys(lab for lab in out if lab))
    if not out:
        raise ValueError("no labels: give --labels 'dog,rain,siren' or --labels-file FILE")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, ...)")
    p.add_argument("--checkpoint", required=True, help="model folder, official .pth file or registered name")
    add_text_model_option(p)
    p.add_argument("--labels", help="comma-separated class labels, e.g. 'dog,rain,siren'")
    p.add_argument("--labels-file", help="a text file with one class label a line")
    p.add_argument("--template", action="append",
                   help="a format string with {} or {label}, or a rule name (default: '{label} can be heard'); "
                        "repeat for a prompt ensemble")
    p.add_argument("--top", type=int, default=3, help="how many classes to print per file (3)")
    p.add_argument("--multi-label", action="store_true", help="sigmoid per label instead of a softmax")
    p.add_argument("--scale", type=float, default=1.0, help="multiply cosines before softmax/sigmoid (1 = EVAR)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar or info messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_logging(args.quiet):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    fail = functools.partial(cli_error, PROG)

    try:
        if args.top < 1:
            raise ValueError(f"--top must be at least 1, got {args.top}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        labels = parse_labels(args.labels, args.labels_file)
        templates = as_template_list(args.template)
        device = resolve_device(args.device)
    except (TemplateError, ValueError, OSError) as e:
        return fail(str(e))
    try:
        model = load_model(args.checkpoint, device, args.text_model)
    except CheckpointError as e:
        return fail(e.for_cli())
    except OSError as e:
        return fail(str(e))
    try:
        clf = ZeroShotClassifier.from_labels(model, labels, templates, args.multi_label, scale=args.scale)
    except RuntimeError as e:  # e.g. a checkpoint without a text encoder
        return fail(str(e))
    preds = clf.predict_files(args.audio, batch_size=args.batch_size, progress=not args.quiet)
    top = clf.top_k(preds.probabilities, args.top)
    for n, (path, best) in enumerate(zip(preds.paths, top)):
        cos = {c: float(s) for c, s in zip(clf.classes, preds.similarities[n])}
        if args.json:
            print(json.dumps({"file": str(path), "top": [{"label": lab, "probability": p, "cosine": cos[lab]}
                                                         for lab, p in best]}, ensure_ascii=False))
            continue
        print(path)
        for rank, (lab, p) in enumerate(best, start=1):
            print(f"  {rank}. {lab:<24s} p={p:.4f}  cos={cos[lab]:+.4f}")
    if preds.failed:
        print(f"{PROG}: {len(preds.failed)} of {len(args.audio)} file(s) could not be used", file=sys.stderr)
    return report_skipped(preds.failed, stream=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
