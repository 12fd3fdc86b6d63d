"""Pre-compute caption embeddings for stage-1 pretraining.

    python scripts/embed_captions.py MANIFEST --out capemb.npy [--model all-MiniLM-L6-v2 | nvidia/NV-Embed-v2]
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Embed every caption of a manifest with a sentence-embedding model and write the official "
                    "{clip id: float16 [n_captions, D]} .npy dictionary used by stage-1 pretraining. Resumable: "
                    "finished batches are kept beside OUT and reused after an interruption.")
    parser.add_argument("manifest", help="manifest (CSV/JSONL) with caption columns")
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--model", default="all-MiniLM-L6-v2",
                        help="sentence-transformers model: hub name or folder (paper: nvidia/NV-Embed-v2; "
                             "default: the packaged all-MiniLM-L6-v2, no download)")
    parser.add_argument("--batch-size", type=int, default=256, help="clips per batch (default 256)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="embed only this split (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from m2dclap.embed import embed_captions

    try:
        embed_captions(args.manifest, args.out, args.model, args.batch_size, split=args.split)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
