"""Readers for the public retrieval datasets, producing the suite's manifest :class:`Record` s.

* Clotho v2.1, AudioCaps and WavCaps: the readers of :mod:`m2dclap.data.public` (shared with captioning).
* The DCASE retrieval evaluation set: ``retrieval_captions.csv`` (column ``caption``) and an audio folder, no
  ground truth; and the DCASE 2025 multi-positive annotations (``query,audio_filenames`` with a Python list).

A clip listed but absent on disk is reported with its path and counted; ``strict`` makes it an error.

    python -m retrieval.datasets clotho --root data/clotho --split evaluation --out clotho-eval.csv
"""

from __future__ import annotations

import ast
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from m2dclap.cli import EXIT_SKIPPED, UsageError, option, run_cli
from m2dclap.data.manifest import Record, read_manifest, write_manifest
from m2dclap.data.public import (  # noqa: F401 - re-exported: retrieval's public reader API
    AUDIO_EXTENSIONS,
    AUDIOCAPS_PATTERN,
    CLOTHO_SPLITS,
    WAVCAPS_PATTERN,
    MissingAudioError,
    ReadResult,
    clotho_split,
    finish_records,
    read_audiocaps,
    read_clotho,
    read_csv_dicts,
    read_csv_lines,
    read_wavcaps,
    require_columns,
)

log = logging.getLogger(__name__)

DATASETS = ("clotho", "audiocaps", "wavcaps", "manifest", "synthetic")


# ----------------------------------------------------------------------------------- DCASE evaluation set
@dataclass
class DcaseEvalSet:
    """The DCASE language-based retrieval evaluation set: captions to rank the audio files with."""

    captions: list[str]  # in file order, one query per row of retrieval_captions.csv
    audio: ReadResult  # one record (no captions) per audio file


def read_dcase_captions(path: str | Path) -> list[str]:
    """``retrieval_captions.csv`` -> its ``caption`` column, in order."""
    path = Path(path)
    lines = read_csv_lines(path, multiline=False)  # one caption per line: a quote must not swallow the next
    if not lines:
        raise ValueError(f"{path}: no captions")
    require_columns([row for _, row in lines], path, ["caption"])
    captions = [row["caption"].strip() for _, row in lines]
    empty = [line for (line, _), c in zip(lines, captions) if not c]
    if empty:
        raise ValueError(f"{path}: empty caption on line(s) {empty[:10]}")
    return captions


def read_dcase_eval(
    captions_csv: str | Path, audio_dir: str | Path, metadata_csv: str | Path | None = None, strict: bool = False
) -> DcaseEvalSet:
    """Captions plus the audio files to rank: those listed in ``metadata_csv`` (column ``file_name``; missing
    ones reported) or, without it, every audio file in ``audio_dir`` (sorted by name)."""
    audio_dir = Path(audio_dir)
    if metadata_csv:
        rows = read_csv_dicts(Path(metadata_csv))
        require_columns(rows, Path(metadata_csv), ["file_name"])
        names = [r["file_name"].strip() for r in rows if r["file_name"].strip()]
    else:
        if not audio_dir.is_dir():
            raise FileNotFoundError(f"DCASE evaluation audio: no folder {audio_dir}")
        names = sorted(p.name for p in audio_dir.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not names:
            raise FileNotFoundError(
                f"DCASE evaluation audio: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {audio_dir}"
            )
    records = [Record(id=name, audio=audio_dir / name, split="test") for name in names]
    audio = finish_records(records, f"DCASE audio ({audio_dir})", strict)
    return DcaseEvalSet(read_dcase_captions(captions_csv), audio)


def read_relevance(path: str | Path) -> list[tuple[str, list[str]]]:
    """DCASE 2025 multi-positive annotations: ``query,audio_filenames`` where the second column is a Python
    list literal (``"['a.wav', 'b.wav']"``) or a single file name -> ``[(query, [file names])]``."""
    path = Path(path)
    lines = read_csv_lines(path)
    require_columns([row for _, row in lines], path, ["query", "audio_filenames"])
    out = []
    for line, row in lines:
        cell = row["audio_filenames"].strip()
        if cell.startswith("["):
            try:
                names = ast.literal_eval(cell)  # a literal only: never evaluates code
            except (ValueError, SyntaxError):
                raise ValueError(f"{path}, line {line}: audio_filenames is not a list literal: {cell[:80]!r}") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}, line {line}: audio_filenames must be a list of file names")
        else:
            names = [cell] if cell else []
        out.append((row["query"].strip(), [n.strip() for n in names if n.strip()]))
    return out


# ------------------------------------------------------------------------------------------ dispatcher
def read_retrieval_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    strict: bool = False,
    audio_dir: str | Path | None = None,
    audio_pattern: str | None = None,
) -> ReadResult:
    """One of :data:`DATASETS` -> records of ``split``. ``root``: the dataset folder, the manifest file,
    the WavCaps JSON (file or folder); for ``synthetic`` the corpus folder (default: the suite's cache)."""
    if name == "clotho":
        return read_clotho(_need(root, name), split, audio_dir, strict)
    if name == "audiocaps":
        return read_audiocaps(_need(root, name), split, audio_dir, audio_pattern or AUDIOCAPS_PATTERN, strict)
    if name == "wavcaps":
        return read_wavcaps(_need(root, name), audio_dir, audio_pattern or WAVCAPS_PATTERN, strict)
    if name == "manifest":
        records = read_manifest(_need(root, name), split=split or None)
        return finish_records(records, f"manifest {root}" + (f" split {split}" if split else ""), strict)
    if name == "synthetic":
        from m2dclap.data.synthetic import default_corpus_dir, generate_corpus

        manifest = generate_corpus(root or default_corpus_dir())
        records = read_manifest(manifest, split=split or None)
        return finish_records(records, f"synthetic corpus {manifest} {split}", strict)
    raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")


def _need(root: str | Path | None, name: str) -> Path:
    if not root:
        raise ValueError(f"dataset {name!r} needs --root (its folder, or the file for manifest/wavcaps)")
    return Path(root)


@dataclass(kw_only=True)
class DatasetsOptions:
    dataset: str = option(positional=True, choices=DATASETS, help="which layout to read")
    root: str | None = option(
        None,
        help="dataset folder (clotho, audiocaps), manifest file, WavCaps JSON file or "
        "folder, or synthetic corpus folder (built there if missing or empty; a "
        "folder holding anything else is refused)",
    )
    split: str = option(
        "",
        help="clotho: development|validation|evaluation; audiocaps: train|val|test; "
        "manifest: train|val|test (default: all)",
    )
    audio_dir: str | None = option(None, help="audio folder (default: ROOT/SPLIT and the usual alternatives)")
    audio_pattern: str | None = option(
        None,
        help=f"audio file name from the row's fields (audiocaps: default "
        f"{AUDIOCAPS_PATTERN!r}; wavcaps: default {WAVCAPS_PATTERN!r})",
    )
    strict: bool = option(False, help="fail if any listed clip is missing")
    out: str = option(help="manifest to write (.csv or .jsonl)")


DESCRIPTION = (
    "Convert a public retrieval dataset into the suite's manifest (CSV/JSONL with audio, caption_1..N, "
    "split). Clips listed but missing on disk are reported with their paths and left out; --strict "
    "makes them an error (exit status 1)."
)
EPILOG = (
    "examples:\n  python -m retrieval.datasets clotho --root data/clotho --split evaluation --out c.csv\n"
    "  python -m retrieval.datasets audiocaps --root data/audiocaps --split test "
    "--audio-pattern 'Y{youtube_id}.wav' --out a.csv\n"
    "  python -m retrieval.datasets wavcaps --root json_files/FreeSound --audio-dir audio/FreeSound "
    "--out w.jsonl"
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        run, DatasetsOptions, argv, prog="python -m retrieval.datasets", description=DESCRIPTION, epilog=EPILOG
    )


def run(args: DatasetsOptions) -> int:
    default_split = {"clotho": "evaluation", "audiocaps": "test"}.get(args.dataset, "")
    try:
        result = read_retrieval_dataset(
            args.dataset, args.root, args.split or default_split, args.strict, args.audio_dir, args.audio_pattern
        )
    except MissingAudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SKIPPED
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    if not result.records:
        print(f"error: {result.source}: no clip present on disk ({len(result.missing)} missing)", file=sys.stderr)
        return EXIT_SKIPPED
    write_manifest(result.records, args.out)
    print(f"wrote {len(result.records)} clips to {args.out} ({len(result.missing)} listed clips missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
