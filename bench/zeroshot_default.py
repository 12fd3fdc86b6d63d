"""Zero-shot accuracy of the default run's model on the embedded corpus's test split, against chance.

    python bench/zeroshot_default.py [--checkpoint runs/default/stage2/model] [--corpus DIR] [--n-clips 2000]

Loads the checkpoint written by the main job (``accelerate launch scripts/pretrain.py``), reads the test
split of the embedded corpus (``generate_corpus()``'s default folder, generated there if absent), takes each
clip's first label as its class, builds a zero-shot classifier over the corpus's 12 classes with the paper's
"(label) can be heard" rule and prints the accuracy beside chance (1/12) with the ratio (target >= 3x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import m2dclap
from m2dclap.data.manifest import read_manifest
from m2dclap.data.synthetic import CLASS_NAMES, MANIFEST_NAME, default_corpus_dir, generate_corpus
from zeroshot.classifier import ZeroShotClassifier
from zeroshot.metrics import accuracy

ROOT = Path(__file__).resolve().parents[1]
TARGET = 3.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "runs" / "default" / "stage2" / "model"))
    p.add_argument("--corpus", help="corpus folder (default: generate_corpus()'s default folder)")
    p.add_argument("--n-clips", type=int, default=2000, help="corpus size, if it must be generated (2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default="{label} can be heard")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        print(
            f"no checkpoint at {ckpt}: run the main job first (accelerate launch scripts/pretrain.py)", file=sys.stderr
        )
        return 2
    corpus = Path(args.corpus) if args.corpus else default_corpus_dir()
    manifest = corpus / MANIFEST_NAME
    if not manifest.is_file():  # only then: generate_corpus rewrites a corpus made with other parameters
        manifest = generate_corpus(corpus, n_clips=args.n_clips, seed=args.seed)
    records = [r for r in read_manifest(manifest, "test") if r.labels]
    model = m2dclap.load(ckpt, audio_only=False).eval()
    clf = ZeroShotClassifier.from_labels(model, CLASS_NAMES, args.template)
    t0 = time.perf_counter()
    preds = clf.predict_files([r.audio for r in records], batch_size=args.batch_size)
    index = {c: i for i, c in enumerate(clf.classes)}
    targets = np.array([index[records[i].labels[0]] for i in preds.indices])
    acc = accuracy(preds.probabilities.numpy(), targets)
    chance = 1.0 / len(CLASS_NAMES)
    ratio = acc / chance
    print(f"checkpoint: {ckpt}")
    print(
        f"corpus: {manifest} (test split: {len(preds.indices)} clips, {len(preds.failed)} unreadable, "
        f"{len(CLASS_NAMES)} classes; embedded in {time.perf_counter() - t0:.1f} s)"
    )
    print(f"prompts: {clf.prompts[0][0]!r}, {clf.prompts[1][0]!r}, ...")
    print(
        f"zero-shot accuracy {100 * acc:.1f}% vs chance {100 * chance:.1f}%: {ratio:.2f}x chance "
        f"(target >= {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
