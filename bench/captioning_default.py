"""Captioning on the embedded corpus: the default run's test CIDEr-D vs the most-frequent-caption baseline.

    python bench/captioning_default.py [--run-dir runs/captioning/default] [--no-java] [-- TRAIN ARGS...]

Trains the default captioning run (``python -m captioning.train`` with no dataset) unless RUN_DIR already
holds a finished run, then scores on the test split of its feature cache:

* the run's best checkpoint by the validation selection metric (CIDEr-D), and the mean ± 95% interval over
  its top checkpoints;
* the baseline that outputs the most frequent training caption (normalised) for every clip.

Both are scored with the same scorer (PTB tokenisation with Java, or normalised text with --no-java).
Target: the model's CIDEr-D is at least 2x the baseline's. Exit status 0 when met, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from captioning import train as tr
from captioning.data import most_frequent_caption, read_index
from captioning.evaluate import evaluate_run_or_checkpoint, score

ROOT = Path(__file__).resolve().parents[1]


def baseline_scores(index, java: bool = True) -> tuple[str, dict]:
    """The most frequent training caption, and its scores when output for every test clip."""
    caption = most_frequent_caption(read_index(index, "train"))
    test = [c for c in read_index(index, "test") if c.captions]
    scores, _ = score({c.id: caption for c in test}, {c.id: c.captions for c in test}, java)
    return caption, scores


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "captioning" / "default"))
    p.add_argument("--no-java", action="store_true", help="normalised text, BLEU/ROUGE-L/CIDEr-D only")
    p.add_argument("--out", help="write the figures as JSON here (default RUN_DIR/bench.json)")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    meta_path = run / tr.RUN_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    t0 = time.time()
    if not meta or meta.get("epochs_done", 0) < meta.get("epochs", 0) and not meta.get("max_steps"):
        print(f"training the default captioning run into {run} ...", flush=True)
        rc = tr.main(["--output-dir", str(run), "--resume", "--no-progress"] + extra)
        if rc != 0:
            return rc
        meta = json.loads(meta_path.read_text())
    train_s = time.time() - t0
    res = evaluate_run_or_checkpoint(run, meta["index"], "test", java=not args.no_java)
    best = meta["top_checkpoints"][0]["checkpoint"]
    model_cider = res["checkpoints"][best]["cider_d"]
    caption, base = baseline_scores(meta["index"], java=not args.no_java)
    ratio = model_cider / base["cider_d"] if base["cider_d"] > 0 else float("inf")
    summary = res.get("summary", {}).get("cider_d", {})
    print(
        f"codec: {meta.get('features_codec')} ({meta.get('codec_note')}); CLAP: {meta.get('features_clap')} "
        f"{meta.get('features_clap_checkpoint')}; BART: {meta.get('bart')}"
    )
    print(f"selection metric: {meta['selection_metric']} ({meta['selection_note']})")
    print(f"test clips: {res['n_clips']}; epochs: {meta.get('epochs_done')}, steps: {meta.get('steps_done')}")
    print(f"test CIDEr-D, best checkpoint ({best}):          {model_cider:.4f}")
    if summary:
        print(
            f"test CIDEr-D, top-{len(res['checkpoints'])} mean ± 95% CI:            "
            f"{summary['mean']:.4f} ± {summary['ci95']:.4f}"
        )
    print(f"baseline (always {caption!r}): {base['cider_d']:.4f}")
    print(f"ratio: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    out = Path(args.out) if args.out else run / "bench.json"
    out.write_text(
        json.dumps(
            {
                "model": res,
                "baseline_caption": caption,
                "baseline": base,
                "best": best,
                "ratio_cider_d": ratio,
                "train_seconds": train_s,
            },
            indent=1,
        )
        + "\n"
    )
    return 0 if ratio >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
