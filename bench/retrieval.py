"""Retrieval metric speed and memory on pre-embedded random unit vectors (no model involved).

    python bench/retrieval.py                       # 5,000 x 1,000 (target < 1 s) and 200,000 x 20,000 (< 2 GB)
    python bench/retrieval.py --skip-large          # the small case only
    python bench/retrieval.py --dim 512 --large 100000x10000

Each case runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its own. Captions are
assigned to clips round-robin (5 per clip for 5,000 x 1,000, 10 per clip for 200,000 x 20,000); the
figures are computed in both directions, as ``python -m retrieval.evaluate`` does.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the package it measures: keep bench/ off the import path so that
# ``import retrieval`` finds the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def _unit_vectors(n: int, dim: int, seed: int):
    """(n, dim) random unit vectors, generated and normalised in chunks (no transient full-size copy)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for s in range(0, n, 16384):
        block = out[s : s + 16384]
        block.normal_(generator=g)
        block.div_(block.norm(dim=1, keepdim=True))
    return out


def run_case(n_captions: int, n_clips: int, dim: int, protocols: list[str], repeats: int, threads: int) -> dict:
    import torch

    from retrieval.metrics import caption_retrieval

    if threads:
        torch.set_num_threads(threads)
    text = _unit_vectors(n_captions, dim, 0)
    audio = _unit_vectors(n_clips, dim, 1)
    owner = torch.arange(n_captions) % n_clips  # caption c describes clip c mod N
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "captions": n_captions,
        "clips": n_clips,
        "dim": dim,
        "threads": torch.get_num_threads(),
        "rss_after_data_mb": round(rss_data, 1),
    }
    for protocol in protocols:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            figures = caption_retrieval(text, audio, owner, protocol)
            times.append(time.perf_counter() - t0)
        out[protocol] = {
            "seconds_best": round(min(times), 3),
            "seconds_all": [round(t, 3) for t in times],
            "text_to_audio": figures["text_to_audio"],
            "audio_to_text": figures["audio_to_text"],
        }
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _show(name: str, r: dict, target: str) -> None:
    print(f"\n{name}: {r['captions']:,} captions x {r['clips']:,} clips, {r['dim']}-d, {r['threads']} thread(s)")
    for p in ("clap", "dcase"):
        if p in r:
            t2a, a2t = r[p]["text_to_audio"], r[p]["audio_to_text"]
            print(
                f"  {p:5s}: {r[p]['seconds_best']:.3f} s (runs: {r[p]['seconds_all']})  "
                f"T2A R@1 {100 * t2a['R@1']:.3f} mAP@10 {100 * t2a['mAP@10']:.3f}  "
                f"A2T R@1 {100 * a2t['R@1']:.3f} mAP@10 {100 * a2t['mAP@10']:.3f}"
            )
    print(
        f"  peak RSS {r['peak_rss_mb']:.0f} MB (embeddings and interpreter alone: {r['rss_after_data_mb']:.0f} MB)"
        f"   target: {target}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark retrieval metric computation on random unit vectors.")
    parser.add_argument("--dim", type=int, default=768, help="embedding size (M2D-CLAP ViT-B: 768)")
    parser.add_argument("--small", default="5000x1000", help="captions x clips of the timed case")
    parser.add_argument("--large", default="200000x20000", help="captions x clips of the memory case")
    parser.add_argument("--skip-large", action="store_true", help="run the small case only")
    parser.add_argument("--large-protocols", default="clap", help="protocols of the large case (clap,dcase)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--case", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: run one case
    parser.add_argument("--protocols", default="clap,dcase", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        result = run_case(*args.case, args.dim, args.protocols.split(","), args.repeats, args.threads)
        print(json.dumps(result))
        return 0
    q, n = (int(x) for x in args.small.split("x"))
    common = ["--dim", str(args.dim), "--threads", str(args.threads)]
    small = _subprocess(["--case", str(q), str(n), *common, "--protocols", "clap,dcase", "--repeats", "3"])
    _show("small", small, "< 1 s per protocol")
    ok = all(small[p]["seconds_best"] < 1.0 for p in ("clap", "dcase"))
    if not args.skip_large:
        q, n = (int(x) for x in args.large.split("x"))
        t0 = time.perf_counter()
        large = _subprocess(["--case", str(q), str(n), *common, "--protocols", args.large_protocols, "--repeats", "1"])
        _show("large", large, "completes with peak RSS < 2048 MB")
        print(f"  wall time of the large case (with data generation): {time.perf_counter() - t0:.1f} s")
        ok = ok and large["peak_rss_mb"] < 2048
    print("\nall targets met" if ok else "\nTARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
