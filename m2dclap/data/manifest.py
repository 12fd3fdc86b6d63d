"""The suite's one manifest format (DESIGN.md "Data").

A manifest is a CSV or a JSONL file (chosen by the extension, ``.csv`` or ``.jsonl``) with one row per clip:

* ``audio`` (required): path of the audio file (or of a pre-computed log-mel ``.npy``); relative paths are
  resolved against the manifest's folder;
* ``caption`` or ``caption_1`` .. ``caption_N`` (optional): zero or more captions; empty cells are ignored;
* ``labels`` (optional): several labels separated by ``;`` (a list is also accepted in JSONL);
* ``split`` (optional): ``train``, ``val`` or ``test`` (``valid``/``validation`` read as ``val``);
* ``id`` (optional): a unique clip id, kept as written (spaces included), by default the audio file's stem.

Other columns are ignored. Every error is a :class:`ManifestError` that names the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..fileio import (
    TextFileError,
    atomic_write_text,  # noqa: F401  (re-exported: the callers' name for it)
    csv_rows,
    undecodable_line,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"valid": "val", "validation": "val"}
_CAPTION_COL = re.compile(r"^caption_(\d+)$")
LABEL_SEP = ";"


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and, where it applies, the line."""


@dataclass
class Record:
    """One clip of a manifest."""

    id: str  # unique clip id (default: the audio file's stem)
    audio: Path  # absolute (resolved) path of the audio or log-mel .npy file
    captions: list[str] = field(default_factory=list)  # zero or more captions
    labels: list[str] = field(default_factory=list)  # zero or more class labels
    split: str | None = None  # "train", "val", "test" or None


# ----------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path, split: str | None = None) -> list[Record]:
    """Read a ``.csv`` or ``.jsonl`` manifest; keep only ``split`` if given.

    Raises :class:`ManifestError` (naming file and line) for a missing ``audio`` column, an empty audio cell,
    a CSV row with the wrong number of fields, a bad JSON line, an unknown split or a duplicate id.
    """
    path = Path(path)
    if split is not None:
        split = _normalise_split(split, f"read_manifest({path}, split={split!r})")
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    rows = manifest_rows(path)
    records: list[Record] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        rec = _row_to_record(row, path, line)
        if rec.id in first_line:
            raise ManifestError(
                f"{path}, line {line}: duplicate id {rec.id!r} (first seen on line {first_line[rec.id]})"
            )
        first_line[rec.id] = line
        records.append(rec)
    if split is not None:
        records = [r for r in records if r.split == split]
    return records


def manifest_rows(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """The raw rows of a ``.csv`` or ``.jsonl`` manifest as ``(line number, {column: cell})``, header checked;
    :func:`read_manifest` builds its records from them (for columns it does not interpret, e.g. labels)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    raise ManifestError(f"{path}: unknown manifest extension {path.suffix!r}; use .csv or .jsonl")


def _csv_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        rows = csv_rows(path)  # a quoted cell may span lines: each row comes with the line where it starts
        first = next(rows, None)
        if first is None:
            raise ManifestError(f"{path}: empty manifest (no header line)")
        header = [h.strip() for h in first[1]]
        _check_header(header, path, first[0])
        for line, row in rows:
            yield line, dict(zip(header, row))
    except TextFileError as e:  # bad bytes, an unbalanced quote, a wrong number of fields
        raise ManifestError(str(e)) from None


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = list(f)
    except UnicodeDecodeError:
        raise ManifestError(f"{undecodable_line(path) or f'{path}: not UTF-8 text'}; save the file as UTF-8") from None
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}, line {line_no}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path}, line {line_no}: bad JSON line: expected an object, got {type(row).__name__}")
        _check_header(list(row), path, line_no)
        yield line_no, row


def _check_header(columns: Sequence[str], path: Path, line: int) -> None:
    if "audio" not in columns:
        raise ManifestError(f"{path}, line {line}: no 'audio' column (columns: {', '.join(columns) or 'none'})")


def _row_to_record(row: dict[str, Any], path: Path, line: int) -> Record:
    where = f"{path}, line {line}"
    audio_cell = row.get("audio")
    if not isinstance(audio_cell, str) or not audio_cell.strip():
        raise ManifestError(f"{where}: empty 'audio' cell")
    audio = Path(os.path.expanduser(audio_cell.strip()))
    if not audio.is_absolute():
        audio = Path(os.path.normpath(path.parent.resolve() / audio))  # "../x.wav" -> a clean absolute path
    rec_id = _id(row.get("id"), where) or audio.stem
    split = _text(row.get("split"), where, "split")
    return Record(
        id=rec_id,
        audio=audio,
        captions=_captions(row, where),
        labels=_labels(row.get("labels"), where),
        split=_normalise_split(split, where) if split else None,
    )


def _captions(row: dict[str, Any], where: str) -> list[str]:
    numbered = sorted((int(m.group(1)), key) for key in row if (m := _CAPTION_COL.match(key)))
    keys = (["caption"] if "caption" in row else []) + [key for _, key in numbered]
    captions: list[str] = []
    for key in keys:
        value = row[key]
        values = value if isinstance(value, list) else [value]  # JSONL may hold a list under 'caption'
        for v in values:
            text = _text(v, where, key)
            if text:
                captions.append(text)
    return captions


def raw_columns(path: str | Path, columns: Sequence[str]) -> tuple[dict[str, list[Any] | None], list[str]]:
    """The raw cells of ``columns``, one per record in :func:`read_manifest` order, in one pass over the file
    (None for a column that no row has), and every column name seen (for messages)."""
    cells: dict[str, list[Any]] = {c: [] for c in columns}
    seen: dict[str, None] = {}
    for _, row in manifest_rows(path):
        seen.update(dict.fromkeys(row))
        for c in columns:
            cells[c].append(row.get(c))
    return {c: (v if c in seen else None) for c, v in cells.items()}, list(seen)


def parse_labels(cell: Any) -> list[str]:
    """A labels cell of any column: ``;``-separated text or a JSONL list; blanks dropped."""
    parts = cell if isinstance(cell, list) else ("" if cell is None else str(cell)).split(LABEL_SEP)
    return [str(p).strip() for p in parts if str(p).strip()]


def _labels(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    parts = value if isinstance(value, list) else _text(value, where, "labels").split(LABEL_SEP)
    return [p.strip() for p in (_text(p, where, "labels") for p in parts) if p.strip()]


def _text(value: Any, where: str, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ManifestError(f"{where}: column {column!r} must hold text, got {type(value).__name__}")
    return value.strip()


def _id(value: Any, where: str) -> str:
    """An id cell kept as written (Clotho names end in spaces: "Heat duct .wav"); a blank cell is no id."""
    if isinstance(value, str):
        return value if value.strip() else ""
    return _text(value, where, "id")


def _normalise_split(split: str, where: str) -> str:
    s = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
    if s not in SPLITS:
        raise ManifestError(f"{where}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return s


# ----------------------------------------------------------------------------------------------- writing


def write_manifest(records: Sequence[Record], path: str | Path) -> Path:
    """Write ``records`` as a ``.csv`` or ``.jsonl`` manifest, atomically (temporary file, then ``os.replace``).

    Audio paths inside the manifest's folder are written relative to it, others absolute. Columns:
    ``id, audio``, then ``caption`` (all records have at most one caption) or ``caption_1..caption_K``,
    then ``labels`` and ``split`` if any record has them.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ManifestError(f"{path}: unknown manifest extension {path.suffix!r}; use .csv or .jsonl")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ManifestError(f"{path}: cannot write duplicate id {dup!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    columns, rows = _to_rows(records, path.parent.resolve())
    buf = io.StringIO(newline="")
    if suffix == ".csv":
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        for row in rows:
            buf.write(json.dumps({k: v for k, v in row.items() if v != ""}, ensure_ascii=False) + "\n")
    atomic_write_text(path, buf.getvalue())
    return path


def _to_rows(records: Sequence[Record], base: Path) -> tuple[list[str], list[dict[str, str]]]:
    k = max((len(r.captions) for r in records), default=0)
    cap_cols = ["caption"] if k == 1 else [f"caption_{i + 1}" for i in range(k)]
    columns = ["id", "audio", *cap_cols]
    if any(r.labels for r in records):
        columns.append("labels")
    if any(r.split for r in records):
        columns.append("split")
    rows = []
    for r in records:
        row = {"id": r.id, "audio": _relative(Path(r.audio), base)}
        for i, col in enumerate(cap_cols):
            row[col] = r.captions[i] if i < len(r.captions) else ""
        if "labels" in columns:
            bad = [lab for lab in r.labels if LABEL_SEP in lab]
            if bad:
                raise ManifestError(f"record {r.id!r}: label {bad[0]!r} contains the separator {LABEL_SEP!r}")
            row["labels"] = LABEL_SEP.join(r.labels)
        if "split" in columns:
            row["split"] = r.split or ""
        rows.append(row)
    return columns, rows


def _relative(audio: Path, base: Path) -> str:
    audio = audio if audio.is_absolute() else audio.resolve()
    try:
        return audio.relative_to(base).as_posix()
    except ValueError:
        return str(audio)


# ----------------------------------------------------------------------------------------------- checks


def split_records(records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
    """(train, val): the ``train`` split (or the rows without a split if none is marked train) and ``val``.
    Rows of other splits never train."""
    train = [r for r in records if r.split == "train"] or [r for r in records if r.split is None]
    return train, [r for r in records if r.split == "val"]


def check_files(records: Sequence[Record], warn: bool = True) -> tuple[list[Record], list[Path]]:
    """Split records into those whose file exists and the paths of the missing ones (logged as a warning
    unless ``warn`` is False, for callers that report them themselves)."""
    present: list[Record] = []
    missing: list[Path] = []
    for r in records:
        if Path(r.audio).is_file():
            present.append(r)
        else:
            missing.append(Path(r.audio))
    if missing and warn:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        log.warning("%d of %d audio file(s) missing: %s%s", len(missing), len(records), shown, more)
    return present, missing


def read_exclusion_list(path: str | Path) -> set[str]:
    """Read an exclusion list: one id, file name or path per line; ``#`` starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such exclusion list")
    entries: set[str] = set()
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = list(f)
    except UnicodeDecodeError:
        raise ManifestError(f"{undecodable_line(path) or f'{path}: not UTF-8 text'}; save the file as UTF-8") from None
    for text in lines:
        # '#' opens a comment at the line start or after a space, so names like 'a#1.wav' survive
        text = re.split(r"(?:^|\s)#", text, maxsplit=1)[0].strip()
        if text:
            entries.add(text)
    return entries


def apply_exclusions(records: Sequence[Record], excluded: Iterable[str]) -> tuple[list[Record], int]:
    """Drop records whose id, file name or file stem is listed, or whose path ends with a listed path.

    Returns ``(kept, n_removed)``.
    """
    names: set[str] = set()
    paths: list[tuple[str, ...]] = []
    for entry in excluded:
        entry = entry.strip()
        if not entry:
            continue
        if "/" in entry or "\\" in entry:
            paths.append(Path(entry.replace("\\", "/")).parts)
        else:
            names.add(entry)

    def hit(r: Record) -> bool:
        audio = Path(r.audio)
        if r.id in names or audio.name in names or audio.stem in names:
            return True
        parts = audio.parts
        # an absolute entry must be the same file; a relative one matches the end of the path
        return any(audio == Path(*p) if Path(*p).is_absolute() else parts[-len(p) :] == p for p in paths)

    kept = [r for r in records if not hit(r)]
    return kept, len(records) - len(kept)
