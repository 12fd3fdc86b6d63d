"""Batch feature extraction: audio files and folders -> one ``.npy`` per file and feature kind, resumable.

    python -m m2dclap.extract data/ --checkpoint m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025 --out feats

Library use::

    items = find_audio_files(["data/"])
    summary = extract_features(m2dclap.load(ckpt), items, "feats", features=("clip", "clap"))

A file counts as done when all its requested ``.npy`` files exist and ``index.csv`` records it as ``ok``.
Every ``.npy`` is written to a temporary file and renamed into place, and the index row is appended only
after the arrays, so a killed run leaves nothing that a re-run would mistake for finished work.
"""

from __future__ import annotations

import csv
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import audio_files
from .audio import AUDIO_EXTENSIONS, first_line
from .audio_files import AudioItem
from .cli import EXIT_SKIPPED, CliError, option, resolve_device, run_cli
from .embed_files import AudioBatches, min_samples_of, report_skipped

# the output folder (names, atomic writes, ledgers, lock, meta.json) lives in m2dclap.extract_outputs
from .extract_outputs import (
    ERROR_FIELDS,
    FEATURE_KINDS,
    INDEX_FIELDS,
    ExtractError,
    check_output_names,
    lock_output_dir,
    prepare_out_dir,
    remove_stale_tmp,
    save_npy,
    valid_index_row,
    write_ledger,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

LAYOUT = """\
output layout (DIR = --out):
  DIR/clip/<rel>.npy    clip feature z'' (F'*D,): mean over time of the frame features
  DIR/frame/<rel>.npy   frame features (T', F'*D), one row per frame_hop_s seconds (Eq. 2)
  DIR/clap/<rel>.npy    CLAP audio embedding s_a (D,), not normalised
  DIR/index.csv         file, duration_s, n_frames, status (ok | failed); one row per file ever seen
  DIR/errors.csv        file, error; one row per failed file
  DIR/meta.json         checkpoint, model config name, feature kinds, frame_hop_s, sample rate, dtype
<rel> is the file's path relative to the input folder it was found in (its name alone for a file given
directly), without its extension: data/sub/a.wav found in data/ -> DIR/clip/sub/a.npy. All arrays are
float32, whatever --dtype. Files whose outputs exist are skipped, so an interrupted run is finished by
running the same command again.

A file that cannot be decoded, is empty, holds NaN/Inf samples or is shorter than one STFT window is
skipped: named on stderr and in errors.csv; the others are extracted.

Exit status 1 when files were skipped (listed on stderr and in errors.csv) or none was found; 2 for a
missing input, an unreadable checkpoint, DIR an existing file or written by another checkpoint or dtype,
or two files mapping to the same output."""


@dataclass
class ExtractSummary:
    """What a run did. ``errors`` holds (file, reason) for the files that failed in this run."""

    out_dir: Path
    total: int = 0
    extracted: int = 0
    skipped: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.errors)

    @property
    def succeeded(self) -> int:
        return self.extracted + self.skipped

    def line(self) -> str:
        done = f" ({self.skipped} already done)" if self.skipped else ""
        fail = f", {self.failed} failed (see {self.out_dir / 'errors.csv'})" if self.failed else ", 0 failed"
        return f"extracted {self.succeeded} files{done}{fail}"


# ---------------------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------------------
def find_audio_files(inputs: Sequence[str | Path], recursive: bool = True) -> list[AudioItem]:
    """:func:`m2dclap.audio_files.find_audio_files`, refusing (:class:`ExtractError`) two different files that
    would write the same outputs (``a/x.wav`` and ``b/x.wav`` given as files, or ``x.wav`` beside ``x.flac``).
    A missing input raises FileNotFoundError."""
    items = audio_files.find_audio_files(inputs, recursive)
    check_output_names(items)
    return items


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def parse_features(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'all' | 'clip' | 'clip,clap' | ['clip', 'frame'] -> kinds in canonical order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if "all" in names:
        return FEATURE_KINDS
    unknown = sorted(set(names) - set(FEATURE_KINDS))
    if unknown or not names:
        raise ExtractError(f"unknown feature kind(s) {unknown or names}; choose from {', '.join(FEATURE_KINDS)}, all")
    return tuple(k for k in FEATURE_KINDS if k in names)


@torch.no_grad()
def compute_features(model, waves: Sequence[torch.Tensor], kinds: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    """One encoder pass over a batch of mono waveforms at the model's rate -> float32 arrays per clip.

    ``clap`` reuses the patch features of that pass (``project_audio``), as ``encode_audio`` does.
    Every dict also holds ``n_frames``.
    """
    feats = model.audio_features(list(waves), sample_rate=model.sample_rate, clap="clap" in kinds)
    clap = feats.get("clap")
    out = []
    for j in range(len(waves)):
        frame = feats["frame"][j]  # (T', F'*D)
        arrays = {"clip": feats["clip"][j], "frame": frame, "clap": clap[j] if clap is not None else None}
        item = {k: arrays[k].float().cpu().numpy() for k in kinds}
        item["n_frames"] = frame.shape[0]
        out.append(item)
    return out


def compute_features_safe(model, waves: list[torch.Tensor], kinds) -> list[dict | str]:
    """``compute_features``, retried clip by clip when the batch fails, so one bad clip fails alone."""
    try:
        return compute_features(model, waves, kinds)
    except (RuntimeError, ValueError) as e:
        if len(waves) == 1:
            return [f"feature extraction failed ({type(e).__name__}: {first_line(e)})"]
        log.info("a batch of %d failed (%s); retrying its files one by one", len(waves), e)
        return [r for w in waves for r in compute_features_safe(model, [w], kinds)]


def extract_features(
    model,
    items: Sequence[AudioItem],
    out_dir: str | Path,
    features: str | Sequence[str] = FEATURE_KINDS,
    batch_size: int = 8,
    overwrite: bool = False,
    checkpoint: str | None = None,
    progress: bool | None = None,
) -> ExtractSummary:
    """Write the requested features of ``items`` under ``out_dir`` (layout in ``LAYOUT``).

    Args:
        model: an :class:`m2dclap.M2DCLAP`, already on its device and in its dtype (``model.to(dtype)`` keeps the
            frontend and statistics in float32).
        items: from :func:`find_audio_files`.
        features: kinds among ``clip``, ``frame``, ``clap`` (or ``all``).
        batch_size: files per model call.
        overwrite: recompute files whose outputs exist.
        checkpoint: recorded in ``meta.json``; a folder written for another checkpoint is refused.
        progress: tqdm bar on stderr; None shows it only on a terminal.
    """
    kinds = parse_features(features)
    if batch_size < 1:
        raise ExtractError(f"batch size must be at least 1, got {batch_size}")
    check_output_names(items)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    with lock_output_dir(out_dir):
        remove_stale_tmp(out_dir)
        index, errors = prepare_out_dir(model, out_dir, kinds, checkpoint, overwrite)
        summary = ExtractSummary(out_dir, total=len(items))
        todo = []
        for item in items:
            row = index.get(item.file)
            done = (
                not overwrite
                and valid_index_row(row)
                and row["status"] == "ok"
                and all(item.output(out_dir, k).exists() for k in kinds)
            )
            if done:
                summary.skipped += 1
            else:
                todo.append(item)
        log.info(
            "%d files: %d already done, %d to extract (%s) into %s",
            len(items),
            summary.skipped,
            len(todo),
            ", ".join(kinds),
            out_dir,
        )
        # Rewrite the ledgers cleanly (a killed run may have cut a row), then append to them as files finish.
        write_ledger(out_dir / "index.csv", INDEX_FIELDS, list(index.values()))
        write_ledger(out_dir / "errors.csv", ERROR_FIELDS, list(errors.values()))
        _run(model, todo, out_dir, kinds, batch_size, index, errors, summary, progress)
        final = sorted((r for r in index.values() if valid_index_row(r)), key=lambda r: r["file"])
        failed = {r["file"] for r in final if r["status"] == "failed"}
        write_ledger(out_dir / "index.csv", INDEX_FIELDS, final)
        write_ledger(
            out_dir / "errors.csv",
            ERROR_FIELDS,
            [errors.get(f, {"file": f, "error": "unknown (not recorded)"}) for f in sorted(failed)],
        )
    return summary


def _run(
    model,
    todo: list[AudioItem],
    out_dir: Path,
    kinds,
    batch_size: int,
    index: dict,
    errors: dict,
    summary: ExtractSummary,
    progress: bool | None,
) -> None:
    """Read batch i+1 (m2dclap.embed_files) while the model works on batch i; record every file's outcome."""
    batches = AudioBatches([item.path for item in todo], model.sample_rate, min_samples_of(model), batch_size)
    bar = tqdm(
        total=summary.total,
        initial=summary.skipped,
        unit="file",
        desc="extract",
        file=sys.stderr,
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
    )
    with (
        bar,
        open(out_dir / "index.csv", "a", newline="", encoding="utf-8") as index_f,
        open(out_dir / "errors.csv", "a", newline="", encoding="utf-8") as errors_f,
    ):
        index_w, errors_w = csv.DictWriter(index_f, INDEX_FIELDS), csv.DictWriter(errors_f, ERROR_FIELDS)
        for batch in batches:
            results: dict[int, dict | str] = dict(batch.skipped)
            if batch.waves:
                computed = compute_features_safe(model, batch.waves, kinds)
                for i, wave, res in zip(batch.indices, batch.waves, computed):
                    if isinstance(res, dict) and not all(np.isfinite(res[k]).all() for k in kinds):
                        res = f"{todo[i].path}: the model produced NaN/Inf features (dtype {model.dtype})"
                    if isinstance(res, dict):
                        res["duration_s"] = wave.shape[0] / model.sample_rate
                    else:  # read ones were logged by AudioBatches; these failed in the model
                        log.warning("skipping %s", res if str(todo[i].path) in res else f"{todo[i].path}: {res}")
                    results[i] = res
            for i in sorted(results):  # input order, so the ledgers read in order
                _record(todo[i], results[i], out_dir, kinds, index, errors, index_w, errors_w, summary)
            index_f.flush()
            errors_f.flush()
            bar.update(len(results))
            bar.set_postfix(failed=summary.failed, refresh=False)


def _record(
    item: AudioItem,
    res: dict | str,
    out_dir: Path,
    kinds,
    index: dict,
    errors: dict,
    index_w: csv.DictWriter,
    errors_w: csv.DictWriter,
    summary: ExtractSummary,
) -> None:
    if isinstance(res, dict):
        for k in kinds:
            save_npy(item.output(out_dir, k), np.ascontiguousarray(res[k], dtype=np.float32))
        row = {
            "file": item.file,
            "duration_s": f"{res['duration_s']:.6f}",
            "n_frames": str(res["n_frames"]),
            "status": "ok",
        }
        errors.pop(item.file, None)
        summary.extracted += 1
    else:
        reason = res if str(item.path) in res else f"{item.path}: {res}"
        err = {"file": item.file, "error": reason}
        errors[item.file] = err
        errors_w.writerow(err)  # the error before the index row: a failed row always has its reason
        row = {"file": item.file, "duration_s": "", "n_frames": "", "status": "failed"}
        summary.errors.append((item.file, reason))
    index[item.file] = row
    index_w.writerow(row)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ExtractOptions:
    inputs: list[str] = option(
        positional=True,
        metavar="INPUT",
        help="audio files and/or folders; folders are searched for " + " ".join(AUDIO_EXTENSIONS),
    )
    checkpoint: str = option(
        aliases="-c", help="model: a save_pretrained folder, an official .pth file, or a registered pretrained name"
    )
    out: str = option(aliases="-o", metavar="DIR", help="output folder (layout below)")
    features: str = option(
        "all", metavar="KINDS", help="clip, frame, clap, or all; several as a comma list, e.g. clip,clap (default: all)"
    )
    batch_size: int = option(
        8, minimum=1, help="files per model call; files of different lengths may share a batch (default: 8)"
    )
    device: str | None = option(
        None, help="where the model runs: cpu, cuda, cuda:1 (default: cuda when available, else cpu)"
    )
    dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        help="model weights and compute dtype; the log-mel frontend stays float32 and the saved "
        "arrays are float32 either way (default: float32)",
    )
    recursive: bool = option(True, help="search input folders recursively (default: --recursive)")
    overwrite: bool = option(
        False,
        help="recompute files whose outputs already exist (default: skip them, "
        "which resumes an interrupted run); also allows writing into a DIR made "
        "with another checkpoint",
    )
    quiet: bool = option(False, aliases="-q", help="only warnings and errors; no progress bar")


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        run,
        ExtractOptions,
        argv,
        prog="m2dclap-extract",
        description="Extract M2D / M2D-CLAP audio features of audio files into .npy files (resumable).",
        epilog=LAYOUT,
    )


def run(opts: ExtractOptions) -> int:
    from .checkpoint import load

    try:
        kinds = parse_features(opts.features)
        items = find_audio_files(opts.inputs, recursive=opts.recursive)
    except (FileNotFoundError, ExtractError) as e:
        raise CliError(str(e)) from None
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise CliError(f"--out {opts.out}: exists and is not a folder")
    if not items:
        print(f"m2dclap-extract: no audio files found in {' '.join(opts.inputs)}", file=sys.stderr)
        return EXIT_SKIPPED
    device = resolve_device(opts.device)
    # every feature kind (clip, frame, clap) is audio: never load, look up or download a text model
    model = load(opts.checkpoint, device=device, audio_only=True).to(DTYPES[opts.dtype])
    ckpt = Path(opts.checkpoint)
    try:
        summary = extract_features(
            model,
            items,
            opts.out,
            kinds,
            batch_size=opts.batch_size,
            overwrite=opts.overwrite,
            checkpoint=str(ckpt.resolve()) if ckpt.exists() else opts.checkpoint,
            progress=False if opts.quiet else None,
        )
    except ExtractError as e:
        raise CliError(str(e)) from None
    print(summary.line())
    rc = report_skipped(summary.errors, stream=sys.stderr)
    return rc if summary.succeeded else EXIT_SKIPPED


if __name__ == "__main__":
    sys.exit(main())
