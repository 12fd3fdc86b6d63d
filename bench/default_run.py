"""Measure the default run of the main job: wall time and the report's figures against the targets
(R@10 in both directions >= 10x chance, zero-shot accuracy >= 3x chance).

    python bench/default_run.py [--output-dir runs/bench-default] [--n-clips 2000]

Runs the pipeline from scratch (corpus cached) in a fresh output folder, exactly as
``accelerate launch scripts/pretrain.py`` does, and prints the figures and the ratios to chance.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/bench-default")
    p.add_argument("--n-clips", type=int, default=2000)
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(launcher),
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "scripts" / "pretrain.py"),
        "--output-dir",
        str(out),
        "--n-clips",
        str(args.n_clips),
        "--fresh",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    print(proc.stdout)
    report = json.loads((out / "report.json").read_text())
    print(f"wall time: {wall:.0f} s (target <= 600 s on 2 CPU cores)")
    for key in ("text_to_audio", "audio_to_text"):
        ratio = report[key]["R@10"] / report["chance_" + key]["R@10"]
        print(f"{key}: R@10 {100 * report[key]['R@10']:.1f} = {ratio:.1f}x chance (target >= 10x)")
    ratio = report["zeroshot_accuracy"] / report["zeroshot_chance"]
    print(f"zero-shot: accuracy {100 * report['zeroshot_accuracy']:.1f} = {ratio:.1f}x chance (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
