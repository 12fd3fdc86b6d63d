"""Checked reading of dataset metadata files: every error is a :class:`DatasetError` naming the file and line.

The CSV and class-id helpers that the readers of :mod:`zeroshot.datasets` share.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterator, Sequence

from .templates import CREMAD_SENTENCES

# EVAR's CREMA-D test split: every clip of these 19 of the 91 speakers (1,551 of 7,438 clips); EVAR drew its
# speaker split once (70/10/20 %) and ships it as metadata/cremad.csv
CREMAD_TEST_SPEAKERS = frozenset(
    "1001 1004 1017 1019 1020 1025 1026 1029 1033 1035 1042 1044 1050 1053 1056 1058 1060 1069 1083".split()
)
GTZAN_SPLIT_SOURCE = "GTZAN_split/ of github.com/jongpillee/music_dataset_split (EVAR's fault-filtered split)"


class DatasetError(ValueError):
    """Dataset metadata that cannot be used; the message names the file and, where it applies, the line."""


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file ({what})")
    return path


def metadata_rows(
    path: Path,
    required: Sequence[str],
    header: Sequence[str] | None = None,
    comment: str | None = None,
    skipinitialspace: bool = False,
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV as (line number, {column: stripped cell}); checks the header and every row's width.

    ``header`` gives the columns of a file without a header line; ``comment`` skips lines starting with it
    (AudioSet's ``#`` lines).
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        for n, text in enumerate(f, start=1):  # one row a line: none of these files has multi-line cells
            if comment and text.lstrip().startswith(comment):
                continue
            if not text.strip():
                continue
            try:
                row = next(csv.reader([text], skipinitialspace=skipinitialspace))
            except csv.Error as e:
                raise DatasetError(f"{path}, line {n}: malformed CSV ({e})") from None
            if header is None:
                header = [h.strip() for h in row]
                missing = [c for c in required if c not in header]
                if missing:
                    raise DatasetError(
                        f"{path}, line {n}: missing column(s) {', '.join(missing)} (header: {','.join(header)})"
                    )
                continue
            if len(row) != len(header):
                raise DatasetError(
                    f"{path}, line {n}: {len(row)} field(s), expected {len(header)} ({','.join(header)})"
                )
            yield n, {h: cell.strip() for h, cell in zip(header, row)}
        if header is None:
            raise DatasetError(f"{path}: empty file (no header line)")


def int_field(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path}, line {line}: column {column!r} must be an integer, got {value!r}") from None


def ordered_classes(pairs: dict[int, str]) -> list[str]:
    """Class names ordered by their numeric target."""
    return [pairs[k] for k in sorted(pairs)]


def record_target(pairs: dict[int, str], target: int, name: str, path: Path, line: int) -> None:
    known = pairs.setdefault(target, name)
    if known != name:
        raise DatasetError(f"{path}, line {line}: class id {target} is {name!r} here but {known!r} earlier")


_CREMAD_NAME = re.compile(r"^(\d+)_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


def cremad_label(path: str | Path) -> str:
    """The emotion code of a CREMA-D file name (``1001_DFA_ANG_XX.wav`` -> ``ANG``)."""
    m = _CREMAD_NAME.match(Path(path).stem)
    if not m or m.group(3) not in CREMAD_SENTENCES:
        raise DatasetError(
            f"{path}: not a CREMA-D file name <actor>_<sentence>_<emotion>_<level>.wav with an "
            f"emotion in {', '.join(CREMAD_SENTENCES)}"
        )
    return m.group(3)
