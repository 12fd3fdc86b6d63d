"""Reading a list of audio files for a model: the one path every multi-file command of the suite shares.

    batches = AudioBatches(paths, model.sample_rate, min_samples_of(model), batch_size=16)
    for batch in batches:                    # Batch(indices, waves, skipped), in input order
        if batch.waves:
            emb = model.encode_audio(batch.waves, model.sample_rate)
    rc = report_skipped(batches.skipped, log)  # 0, or 1 when any file was skipped

    emb, skipped = embed_files(model, paths)   # the same for CLAP embeddings: (N, D), NaN rows where skipped

A file is skipped, never fatal, when it cannot be decoded or read, holds no samples, holds NaN/Inf samples
(all from :func:`m2dclap.load_audio`), or is shorter than the frontend's ``FrontendCfg.min_samples`` after
resampling. Each skipped file is kept as ``(path, reason)``, the reason naming the file, so commands can
list them at the end and exit 1. Files are decoded and resampled by a ``torch.utils.data.DataLoader``
over :func:`load_clip` in worker processes, a batch per worker, while the caller works on the current one;
this is where the time goes on real corpora (``bench/embed_files.py``).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
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
        raise AudioError(
            f"{where}: too short: {n} sample(s) ({n / sample_rate * 1e3:.1f} ms at {sample_rate} Hz); "
            f"the log-mel frontend needs at least {min_samples} "
            f"({min_samples / sample_rate * 1e3:.1f} ms)"
        )


def load_clip(
    path: str | Path, sample_rate: int, min_samples: int = 1, transform: Transform | None = None, index: int = 0
) -> torch.Tensor:
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


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Readers by default: one core is left to the model; none on a one-core machine."""
    return max(0, min(4, _cores() - 1))


def default_backend() -> str:
    """Reader processes (a DataLoader) where there are cores to spare; one reader thread on two cores or fewer,
    where a worker process's transfer of each decoded clip (1-1.5 ms for 10 s) outweighed what it saved
    (``bench/embed_files.py`` on the 2-core dev machine: 215 files/s with a thread, 119 with a process)."""
    return "processes" if _cores() > 2 else "threads"


@dataclass
class Batch:
    """The files ``indices`` of one slice of the input list and their waveforms; the files of that slice
    that were skipped are in ``skipped`` as ``(index, reason)``. ``waves`` is empty when every file of the
    slice was skipped: callers must not call the model then."""

    indices: list[int]
    waves: list[torch.Tensor]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _reason(path, e: AudioError) -> str:
    return str(e) if str(path) in str(e) else f"{path}: {e}"


class _Clips(Dataset):
    """Map-style dataset of :func:`load_clip`: item ``i`` is ``(i, wave)``, or ``(i, reason)`` when the file
    is skipped, so one bad file never takes its batch (or a worker) down with it."""

    def __init__(self, paths: list, sample_rate: int, min_samples: int, transform: Transform | None):
        self.paths, self.sample_rate, self.min_samples, self.transform = paths, sample_rate, min_samples, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, load_clip(self.paths[i], self.sample_rate, self.min_samples, self.transform, i)
        except AudioError as e:
            return i, _reason(self.paths[i], e)


def _split(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], list, list[tuple[int, str]]]:
    """Items of :class:`_Clips` -> (indices of the good ones, their waves, skipped ``(index, reason)``)."""
    good = [(i, x) for i, x in items if not isinstance(x, str)]
    return [i for i, _ in good], [x for _, x in good], [(i, x) for i, x in items if isinstance(x, str)]


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], list[np.ndarray], list[tuple[int, str]]]:
    # Waves leave the worker as numpy arrays, pickled through the pipe, rather than tensors in torch's shared
    # memory: a container's /dev/shm is often 64 MB, less than a few prefetched batches of long clips.
    indices, waves, skipped = _split(items)
    return indices, [w.numpy() for w in waves], skipped


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # W workers x all cores each would oversubscribe the CPU the model runs on


def _forks() -> bool:
    return torch.multiprocessing.get_start_method(allow_none=False) == "fork"


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # pickling raises PicklingError, AttributeError or TypeError depending on the object
        return False


class AudioBatches:
    """Iterate over :class:`Batch` es of ``batch_size`` consecutive input files; collects ``skipped``.

    Args:
        paths: the files, in the order their indices refer to.
        sample_rate: every waveform is resampled to it.
        min_samples: shortest accepted waveform at ``sample_rate`` (:func:`min_samples_of`).
        batch_size: input files per batch (a batch holds fewer waveforms when some are skipped).
        workers: reader processes (threads with ``backend="threads"``), each reading whole batches ahead of
            the caller; 0 reads in the calling process. Default :func:`default_workers`. Never more than
            there are batches, and none for a single batch: there is nothing to read ahead.
        transform: applied to each waveform before the length check (e.g. a crop or zero padding).
        progress: a tqdm bar counting files.
        backend: ``"processes"`` (a DataLoader) or ``"threads"`` (a thread pool, the next batch read while
            the current one is used); default :func:`default_backend`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        sample_rate: int,
        min_samples: int = 1,
        batch_size: int = 16,
        workers: int | None = None,
        transform: Transform | None = None,
        progress: bool | None = False,
        desc: str = "reading audio",
        backend: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        backend = backend or default_backend()
        if backend not in ("processes", "threads"):
            raise ValueError(f"backend must be 'processes' or 'threads', got {backend!r}")
        self.paths = list(paths)
        self.sample_rate, self.min_samples, self.batch_size = int(sample_rate), int(min_samples), int(batch_size)
        self.workers = default_workers() if workers is None else max(0, int(workers))
        self.transform, self.progress, self.desc, self.backend = transform, progress, desc, backend
        self.skipped: list[tuple[str, str]] = []  # (path, reason) of every skipped file, in input order

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = []
        bar = tqdm(
            total=len(self.paths),
            desc=self.desc,
            unit="file",
            dynamic_ncols=True,
            disable=None if self.progress is None else not self.progress,
        )
        with bar:
            for batch in self._batches(min(self.workers, len(self)) if len(self) > 1 else 0):
                for i, reason in batch.skipped:  # logged here: a worker process's log records would be lost
                    log.warning("skipping %s", reason)
                    self.skipped.append((str(self.paths[i]), reason))
                bar.update(len(batch.indices) + len(batch.skipped))
                yield batch

    def _batches(self, workers: int) -> Iterator[Batch]:
        clips = _Clips(self.paths, self.sample_rate, self.min_samples, self.transform)
        # Linux forks the workers, which inherit the transform; under spawn (macOS, Windows) it must be
        # pickled, which a closure such as linear_eval's crop is not: read in threads then.
        if self.backend == "threads" or (workers and not _forks() and not _picklable(self.transform)):
            yield from self._thread_batches(clips, workers)
            return
        loader = DataLoader(
            clips,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            worker_init_fn=_one_thread if workers else None,
            persistent_workers=False,
        )
        for indices, waves, skipped in loader:  # batches come back in sampler order whatever worker read them
            yield Batch(indices, [torch.from_numpy(w) for w in waves], skipped)

    def _thread_batches(self, clips: _Clips, workers: int) -> Iterator[Batch]:
        starts = range(0, len(clips), self.batch_size)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

            def submit(start: int) -> list[Future]:
                end = min(start + self.batch_size, len(clips))
                return [pool.submit(clips.__getitem__, i) for i in range(start, end)]

            pending = submit(starts[0]) if starts else []
            for n in range(len(starts)):
                current, pending = pending, (submit(starts[n + 1]) if n + 1 < len(starts) else [])
                yield Batch(*_split([fut.result() for fut in current]))


@torch.no_grad()
def embed_files(
    model,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    normalize: bool = False,
    workers: int | None = None,
    progress: bool | None = False,
    desc: str = "embedding audio",
    on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """CLAP audio embeddings of whole files through :class:`AudioBatches`, ``batch_size`` per model call.

    Returns the embeddings (N, D), float32 on the CPU, with a row of NaN for each skipped file, and the
    skipped files as ``[(index, reason)]``. ``on_batch(indices, embeddings)`` sees each batch as it is done
    (e.g. to cache it, so an interrupted run keeps what it computed)."""
    out = torch.full((len(paths), model.cfg.encoder.embed_dim), math.nan)
    skipped: list[tuple[int, str]] = []
    for batch in AudioBatches(
        paths, model.sample_rate, min_samples_of(model), batch_size, workers, progress=progress, desc=desc
    ):
        skipped += batch.skipped
        if batch.waves:
            emb = (
                model.encode_audio(batch.waves, model.sample_rate, normalize=normalize, batch_size=batch_size)
                .float()
                .cpu()
            )
            out[batch.indices] = emb
            if on_batch is not None:
                on_batch(batch.indices, emb)
    return out, skipped


def report_skipped(
    skipped: Sequence[tuple[str | Path, str]],
    logger: logging.Logger | None = None,
    what: str = "file",
    stream: TextIO | None = None,
) -> int:
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
