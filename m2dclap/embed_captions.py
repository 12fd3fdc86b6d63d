"""Pre-compute caption embeddings for stage-1 pretraining (the command; the work is m2dclap.embed.embed_captions).

python -m m2dclap.embed_captions MANIFEST --out capemb.npy [--model all-MiniLM-L6-v2 | nvidia/NV-Embed-v2]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from .cli import CliError, option, run_cli

DESCRIPTION = (
    "Embed every caption of a manifest with a sentence-embedding model and write the official "
    "{clip id: float16 [n_captions, D]} .npy dictionary used by stage-1 pretraining. Resumable: "
    "finished batches are kept beside OUT and reused after an interruption."
)


@dataclass(kw_only=True)
class EmbedCaptionsOptions:
    manifest: str = option(positional=True, help="manifest (CSV/JSONL) with caption columns")
    out: str = option(help="output .npy file")
    model: str = option(
        "all-MiniLM-L6-v2",
        help="sentence-transformers model: hub name or folder (paper: "
        "nvidia/NV-Embed-v2; default: the packaged all-MiniLM-L6-v2, "
        "no download)",
    )
    batch_size: int = option(256, minimum=1, help="clips per batch (default 256)")
    split: str | None = option(None, choices=["train", "val", "test"], help="embed only this split (default: all)")
    quiet: bool = option(False, help="no progress bar or info messages")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, EmbedCaptionsOptions, argv, prog="m2dclap-embed-captions", description=DESCRIPTION)


def run(opts: EmbedCaptionsOptions) -> int:
    from .embed import embed_captions

    try:
        embed_captions(opts.manifest, opts.out, opts.model, opts.batch_size, progress=not opts.quiet, split=opts.split)
    except (OSError, ValueError) as e:  # a missing or unreadable manifest, no captions, an unloadable model
        raise CliError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
