"""Reading a list of audio files for a model: the one path every multi-file command of the suite shares.

    batches = AudioBatches(paths, model.sample_rate, min_samples_of(model), batch_size=16)
    for batch in batches:                    # Batch(indices, waves, skipped), in input order
        if batch.waves:
            emb = model.encode_audio(batch.waves, model.sample_rate)
    rc = report_skipped(batches.skipped, log)  # 0, or 1 when any file was skipped

A file is skipped, never fatal, when it cannot be decoded or read, holds no samples, holds NaN/Inf samples
(all from :func:`m2dclap.load_audio`), or is shorter than the frontend's ``FrontendCfg.min_samples`` after
resampling. Each skipped file is kept as ``(path, reason)``, the reason naming the file, so commands can
list them at the end and exit 1. Files of the next batch are read in a worker thread while the caller works
on the current one. The API is a batch iterator on purpose: a DataLoader over the same ``load_clip`` can
replace it without changing its callers.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

import torch
from tqdm.auto import tqdm

from .audio import AudioError, load_audio
from .config import FrontendCfg

log = logging.getLogger(__name__)

Transform = Callable[[int, torch.Tensor], torch.Tensor]  # (input index, wave) -> wave, before the length check


def min_samples_at(frontend: FrontendCfg, sample_rate: int | None = None) -> int:
    """The frontend's shortest input, counted at ``sample_rate`` (files read at another rate than the
    frontend's are resampled later; rounding up keeps the resampled clip long enough)."""
    if sample_rate is None or sample_rate == frontend.sample_rate:
        return frontend.min_samples
    return math.ceil(frontend.min_samples * sample_rate / frontend.sample_rate)


def min_samples_of(model, sample_rate: int | None = None) -> int:
    """:func:`min_samples_at` for an M2D-CLAP model (anything with ``cfg.frontend``)."""
    return min_samples_at(model.cfg.frontend, sample_rate)


def check_length(wave: torch.Tensor, min_samples: int, where: str, sample_rate: int) -> None:
    """Raise :class:`AudioError` naming ``where`` when ``wave`` (T,) is shorter than ``min_samples``."""
    n = int(wave.shape[-1])
    if n < min_samples:
        raise AudioError(f"{where}: too short: {n} sample(s) ({n / sample_rate * 1e3:.1f} ms at {sample_rate} Hz); "
                         f"the log-mel frontend needs at least {min_samples} ({min_samples / sample_rate * 1e3:.1f} ms)")


def load_clip(path: str | Path, sample_rate: int, min_samples: int = 1,
              transform: Transform | None = None, index: int = 0) -> torch.Tensor:
    """:func:`m2dclap.load_audio` at ``sample_rate``, then ``transform(index, wave)``, then the length check.

    Every failure is an :class:`AudioError` whose message names the file (an OSError such as permission
    denied included)."""
    try:
        wave = load_audio(path, sample_rate)
    except OSError as e:
        raise AudioError(f"{path}: cannot read ({e.strerror or e})") from None
    if transform is not None:
        wave = transform(index, wave)
    check_length(wave, min_samples, str(path), sample_rate)
    return wave


@dataclass
class Batch:
    """The files ``indices`` of one slice of the input list and their waveforms; the files of that slice
    that were skipped are in ``skipped`` as ``(index, reason)``. ``waves`` is empty when every file of the
    slice was skipped: callers must not call the model then."""

    indices: list[int]
    waves: list[torch.Tensor]
    skipped: list[tuple[int, str]] = field(default_factory=list)


class AudioBatches:
    """Iterate over :class:`Batch` es of ``batch_size`` consecutive input files; collects ``skipped``.

    Args:
        paths: the files, in the order their indices refer to.
        sample_rate: every waveform is resampled to it.
        min_samples: shortest accepted waveform at ``sample_rate`` (:func:`min_samples_of`).
        batch_size: input files per batch (a batch holds fewer waveforms when some are skipped).
        workers: threads reading files; the next batch is read while the current one is used.
        transform: applied to each waveform before the length check (e.g. a crop or zero padding).
        progress: a tqdm bar counting files.
    """

    def __init__(self, paths: Sequence[str | Path], sample_rate: int, min_samples: int = 1, batch_size: int = 16,
                 workers: int = 1, transform: Transform | None = None, progress: bool | None = False,
                 desc: str = "reading audio"):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.paths = list(paths)
        self.sample_rate, self.min_samples, self.batch_size = int(sample_rate), int(min_samples), int(batch_size)
        self.workers, self.transform = max(1, int(workers)), transform
        self.progress, self.desc = progress, desc
        self.skipped: list[tuple[str, str]] = []  # (path, reason) of every skipped file, in input order

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def _load(self, i: int) -> torch.Tensor:
        return load_clip(self.paths[i], self.sample_rate, self.min_samples, self.transform, i)

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = []
        starts = list(range(0, len(self.paths), self.batch_size))
        bar = tqdm(total=len(self.paths), desc=self.desc, unit="file", dynamic_ncols=True,
                   disable=None if self.progress is None else not self.progress)
        with bar, ThreadPoolExecutor(max_workers=self.workers) as pool:
            def submit(start: int) -> list[tuple[int, Future]]:
                return [(i, pool.submit(self._load, i)) for i in range(start, min(start + self.batch_size, len(self.paths)))]

            pending = submit(starts[0]) if starts else []
            for n in range(len(starts)):
                current, pending = pending, (submit(starts[n + 1]) if n + 1 < len(starts) else [])
                batch = Batch([], [])
                for i, fut in current:
                    try:
                        batch.waves.append(fut.result())
                        batch.indices.append(i)
                    except AudioError as e:
                        reason = str(e) if str(self.paths[i]) in str(e) else f"{self.paths[i]}: {e}"
                        log.warning("skipping %s", reason)
                        batch.skipped.append((i, reason))
                        self.skipped.append((str(self.paths[i]), reason))
                bar.update(len(current))
                yield batch


def report_skipped(skipped: Sequence[tuple[str | Path, str]], logger: logging.Logger | None = None,
                   what: str = "file", stream: TextIO | None = None) -> int:
    """Report every skipped file by name at the end of a run; return the exit code: 1 when any was skipped.

    The list is logged as a warning, or printed on ``stream`` (a CLI's ``sys.stderr``, so it shows whatever
    the logging setup)."""
    if not skipped:
        return 0
    text = f"{len(skipped)} {what}(s) skipped:\n  " + "\n  ".join(r if str(p) in r else f"{p}: {r}" for p, r in skipped)
    if stream is not None:
        print(text, file=stream)
    else:
        (logger or log).warning("%s", text)
    return 1
