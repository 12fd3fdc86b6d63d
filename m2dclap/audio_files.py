"""Audio files named on a command line: files as given, folders searched for audio files.

    items = find_audio_files(["a.wav", "data/"])   # [AudioItem(path, rel)], rel: the path under its input

Shared by the commands that take files and folders (``m2dclap.extract``, ``captioning.caption``); reading
the files is :mod:`m2dclap.embed_files`' job.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from .audio import AUDIO_EXTENSIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioItem:
    """One input file: where it is, and its path relative to the input it was found under."""

    path: Path
    rel: PurePosixPath  # e.g. sub/a.wav; extract writes its outputs to <kind>/sub/a.npy

    @property
    def file(self) -> str:
        return self.rel.as_posix()

    def output(self, out_dir: Path, kind: str) -> Path:
        return out_dir / kind / self.rel.with_suffix(".npy")


def find_audio_files(
    inputs: Sequence[str | Path], recursive: bool = True, keep_missing: bool = False
) -> list[AudioItem]:
    """Files given directly, plus audio files (``AUDIO_EXTENSIONS``) found in folders, sorted per input.

    A missing input raises FileNotFoundError, or with ``keep_missing`` is kept as a file (for a command that
    reports unreadable files at the end rather than refusing the run). A file reached twice (given directly
    and inside a given folder) is kept once, at its first place.
    """
    items: list[AudioItem] = []
    for given in inputs:
        root = Path(given)
        if root.is_dir():
            found = sorted(_scan(root, recursive), key=lambda p: p.relative_to(root).as_posix())
            if not found:
                log.warning("%s: no audio files (%s) found", root, ", ".join(AUDIO_EXTENSIONS))
            items += [AudioItem(p, PurePosixPath(p.relative_to(root).as_posix())) for p in found]
        elif root.is_file() or keep_missing:
            items.append(AudioItem(root, PurePosixPath(root.name)))
        else:
            raise FileNotFoundError(f"{root}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for item in items:
        real = item.path.resolve()
        if real not in seen:
            seen.add(real)
            unique.append(item)
    return unique


def _scan(folder: Path, recursive: bool) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS:
                yield Path(dirpath) / name
        if not recursive:
            break
