"""Classify audio files into classes named on the command line, with no training (zero-shot).

    python -m zeroshot.classify dog.wav street.flac --checkpoint C --labels "dog,rain,siren" --top 3

Each label becomes a prompt ("dog can be heard", the paper's ESC-50 rule) unless ``--template`` gives
another ("the sound of {label}"; repeat it for a prompt ensemble). For each file the best classes are printed
with their probability (softmax over the labels of the cosine similarity times ``--scale``; sigmoid per label
with ``--multi-label``) and the cosine similarity itself. With the default ``--scale 1`` (EVAR's convention)
probabilities are close to uniform, the ranking is what matters; ``--scale 100`` gives CLIP-like ones.
Files that cannot be used (undecodable, empty, NaN/Inf, shorter than one STFT window) are named on stderr
and skipped (exit status 1).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from m2dclap.cli import TEXT_MODEL_HELP, CliError, option, resolve_device, run_cli
from m2dclap.embed_files import report_skipped

from .classifier import ZeroShotClassifier
from .templates import TemplateError, as_template_list

PROG = "python -m zeroshot.classify"


@dataclass(kw_only=True)
class ClassifyOptions:
    audio: list[str] = option(positional=True, help="audio files (wav, flac, ogg, ...)")
    checkpoint: str = option(help="model folder, official .pth file or registered name")
    text_model: str | None = option(None, metavar="PATH", help=TEXT_MODEL_HELP)
    labels: str | None = option(None, help="comma-separated class labels, e.g. 'dog,rain,siren'")
    labels_file: str | None = option(None, help="a text file with one class label a line")
    template: list[str] | None = option(
        None,
        append=True,
        help="a format string with {} or {label}, or a rule name (default: "
        "'{label} can be heard'); repeat for a prompt ensemble",
    )
    top: int = option(3, minimum=1, help="how many classes to print per file")
    multi_label: bool = option(False, help="sigmoid per label instead of a softmax")
    scale: float = option(1.0, help="multiply cosines before softmax/sigmoid (1 = EVAR)")
    batch_size: int = option(16, minimum=1, help="files per model call")
    device: str | None = option(None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    json: bool = option(False, help="print one JSON object per file instead of text")
    quiet: bool = option(False, help="no progress bar or info messages")


def load_model(checkpoint: str, device: str, text_model: str | None = None):
    """``m2dclap.load`` with the text tower (zero-shot needs it), moved to ``device``, in eval mode;
    ``text_model``: a local copy (or another hub name) of the checkpoint's text model."""
    import m2dclap

    return m2dclap.load(checkpoint, audio_only=False, text_name=text_model).to(device).eval()


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


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(classify, ClassifyOptions, argv, prog=PROG, description=__doc__)


def classify(opts: ClassifyOptions) -> int:
    try:
        labels = parse_labels(opts.labels, opts.labels_file)
        templates = as_template_list(opts.template)
    except (TemplateError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    device = resolve_device(opts.device)
    try:
        model = load_model(opts.checkpoint, device, opts.text_model)
        clf = ZeroShotClassifier.from_labels(model, labels, templates, opts.multi_label, scale=opts.scale)
    except (OSError, RuntimeError) as e:  # RuntimeError: e.g. a checkpoint without a text encoder
        raise CliError(str(e)) from None
    preds = clf.predict_files(opts.audio, batch_size=opts.batch_size, progress=not opts.quiet)
    top = clf.top_k(preds.probabilities, opts.top)
    for n, (path, best) in enumerate(zip(preds.paths, top)):
        cos = {c: float(s) for c, s in zip(clf.classes, preds.similarities[n])}
        if opts.json:
            print(
                json.dumps(
                    {
                        "file": str(path),
                        "top": [{"label": lab, "probability": p, "cosine": cos[lab]} for lab, p in best],
                    },
                    ensure_ascii=False,
                )
            )
            continue
        print(path)
        for rank, (lab, p) in enumerate(best, start=1):
            print(f"  {rank}. {lab:<24s} p={p:.4f}  cos={cos[lab]:+.4f}")
    if preds.failed:
        print(f"{PROG}: {len(preds.failed)} of {len(opts.audio)} file(s) could not be used", file=sys.stderr)
    return report_skipped(preds.failed, stream=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
