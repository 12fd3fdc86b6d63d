"""Caption audio files with a trained EnCLAP checkpoint.

    python -m captioning.caption AUDIO... --checkpoint C [--clap-checkpoint CC] [--codec SRC]

``C`` is an epoch checkpoint folder (``checkpoints/epoch_NNN``) or a training run folder (its best checkpoint
by the selection metric is used). The codec tokens and the CLAP embedding are computed on the fly with the
codec and CLAP recorded in the checkpoint's ``captioning.json`` (override with ``--codec`` /
``--clap-checkpoint``). Prints ``file<TAB>caption`` per file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from m2dclap.cli import CliError, option, resolve_device, run_cli
from m2dclap.embed_files import report_skipped

from .codec import DEFAULT_BANDWIDTH
from .train import CKPT_META, RUN_META


def resolve_checkpoint(path: str | Path) -> Path:
    """An epoch checkpoint folder from a checkpoint folder or a run folder (its best checkpoint)."""
    path = Path(path)
    if (path / "enclap_config.json").is_file():
        return path
    meta = path / RUN_META
    if meta.is_file():
        best = json.loads(meta.read_text()).get("top_checkpoints") or []
        if best:
            return path / "checkpoints" / best[0]["checkpoint"]
    raise FileNotFoundError(
        f"{path}: neither an EnCLAP checkpoint (enclap_config.json) nor a training run with checkpoints ({RUN_META})"
    )


def feature_settings(ckpt: Path) -> dict:
    meta = ckpt / CKPT_META
    return json.loads(meta.read_text()) if meta.is_file() else {}


class Captioner:
    """Model + codec + CLAP, rebuilt from a checkpoint's recorded settings."""

    def __init__(self, checkpoint, clap_checkpoint=None, codec=None, clap=None, device="cpu"):
        from .clap_backends import get_backend
        from .codec import load_codec
        from .model import EnClapCaptioner

        self.ckpt = resolve_checkpoint(checkpoint)
        self.settings = feature_settings(self.ckpt)
        self.device = device
        self.model = EnClapCaptioner.from_pretrained(self.ckpt).to(device).eval()
        codec_src = codec or self.settings.get("codec") or "pretrained"
        self.codec = load_codec(
            codec_src, bandwidth=float(self.settings.get("bandwidth") or DEFAULT_BANDWIDTH), device=device
        )
        clap_name = clap or self.settings.get("clap") or "m2d-clap"
        cc = clap_checkpoint or self.settings.get("clap_checkpoint")
        self.clap = get_backend(clap_name, **({"checkpoint": cc} if cc else {}), device=device)

    @torch.no_grad()
    def caption_waves(self, waves: Sequence[torch.Tensor], sample_rate: int, batch_size: int = 8, **gen) -> list[str]:
        from .codec import encode_batch
        from .data import PAD_CODE

        out = []
        for s in range(0, len(waves), batch_size):
            chunk = waves[s : s + batch_size]
            codes = [c[:, : self.model.max_frames] for c in encode_batch(self.codec, chunk, sample_rate)]
            T = max(c.shape[1] for c in codes)
            tokens = torch.full((len(codes), codes[0].shape[0], T), PAD_CODE, dtype=torch.long)
            mask = torch.zeros(len(codes), T, dtype=torch.bool)
            for b, c in enumerate(codes):
                tokens[b, :, : c.shape[1]], mask[b, : c.shape[1]] = c, True
            clap = self.clap.embed_audio(list(chunk), sample_rate)
            out += self.model.generate(tokens.to(self.device), mask.to(self.device), clap.to(self.device), **gen)
        return out

    def caption_files(
        self, files: Sequence[str | Path], batch_size: int = 8, **gen
    ) -> tuple[list[str | None], list[tuple[Path, str]]]:
        """(caption or None per file, [(file, why it was skipped)]); audio is read a batch at a time through
        :class:`m2dclap.embed_files.AudioBatches` (undecodable, empty, NaN/Inf and too-short files skipped)."""
        from m2dclap.embed_files import AudioBatches

        from .codec import CODEC_SAMPLE_RATE
        from .preprocess import clap_min_samples

        texts: list[str | None] = [None] * len(files)
        bad: list[tuple[Path, str]] = []
        for batch in AudioBatches(files, CODEC_SAMPLE_RATE, clap_min_samples(self.clap, CODEC_SAMPLE_RATE), batch_size):
            bad += [(Path(files[i]), reason) for i, reason in batch.skipped]
            if batch.waves:
                captions = self.caption_waves(batch.waves, CODEC_SAMPLE_RATE, batch_size=batch_size, **gen)
                for i, t in zip(batch.indices, captions):
                    texts[i] = t
        return texts, bad


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given (a missing one too: it is reported as unreadable with the others); a folder contributes
    its audio files (recursively, sorted)."""
    from m2dclap.audio_files import find_audio_files

    return [item.path for item in find_audio_files(paths, keep_missing=True)]


def name_clashes(files: Sequence[Path]) -> list[str]:
    """Files that share a file name, which is their row key in the ``--out`` CSV: ``"x.wav: a/x.wav, b/x.wav"``."""
    by_name: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(f.name, []).append(f)
    return [f"{name}: {', '.join(map(str, fs))}" for name, fs in by_name.items() if len(fs) > 1]


@dataclass(kw_only=True)
class CaptionOptions:
    audio: list[str] = option(positional=True, metavar="AUDIO", help="audio files or folders of audio files")
    checkpoint: str = option(metavar="C", help="epoch checkpoint or training run folder")
    clap_checkpoint: str | None = option(None, help="override the CLAP checkpoint recorded in the checkpoint")
    clap: str | None = option(None, help="override the CLAP backend recorded in the checkpoint")
    codec: str | None = option(None, help="override the EnCodec weights recorded (pretrained|random|PATH)")
    num_beams: int | None = option(None, minimum=1, help="beam size (default: the model's 4)")
    max_length: int | None = option(None, minimum=1, help="longest caption in tokens (default: the model's 50)")
    batch_size: int = option(8, minimum=1, help="clips per generation call (default 8)")
    out: str | None = option(
        None,
        metavar="CSV",
        help="also write file_name,caption here (the format "
        "captioning.evaluate --predictions reads; the key is the "
        "file's name)",
    )
    device: str | None = option(None, help="cpu, cuda, cuda:1 (default: cuda if available)")


EPILOG = (
    "Files that cannot be used (undecodable, empty, NaN/Inf, shorter than one STFT window) are named on stderr "
    "and skipped; the others are captioned. With --out, files sharing a name (the CSV's key) are refused."
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        run,
        CaptionOptions,
        argv,
        prog="python -m captioning.caption",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
    )


def run(args: CaptionOptions) -> int:
    files = expand_inputs(args.audio)
    clashes = name_clashes(files) if args.out else []
    if clashes:  # one CSV row per name: a second file of that name would overwrite the first's caption
        raise CliError(
            f"--out {args.out}: files share a name, which is the CSV's key: "
            + "; ".join(clashes)
            + ". Caption them in separate runs or rename them."
        )
    if args.out and Path(args.out).is_dir():
        raise CliError(f"--out {args.out}: is a folder, not a CSV file")
    device = resolve_device(args.device)
    try:
        cap = Captioner(args.checkpoint, args.clap_checkpoint, args.codec, args.clap, device)
    except Exception as e:  # noqa: BLE001 - a CLI: report and exit
        raise CliError(f"{type(e).__name__}: {e}") from None
    texts, bad = cap.caption_files(
        files, batch_size=args.batch_size, num_beams=args.num_beams, max_length=args.max_length
    )
    done = [(f, t) for f, t in zip(files, texts) if t is not None]
    for f, t in done:
        print(f"{f}\t{t}")
    if args.out:
        from .metrics import write_predictions

        write_predictions(args.out, {f.name: t for f, t in done})
    return report_skipped(bad, stream=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
