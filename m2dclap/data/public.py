"""Readers for the public audio-caption datasets, producing manifest :class:`Record` s.

* Clotho v2.1 (Zenodo 4783391): ``clotho_captions_{development,validation,evaluation}.csv`` with
  ``file_name,caption_1..caption_5``; audio in one folder per split (``development/``, ...).
* AudioCaps (``cdjkim/audiocaps``): ``{train,val,test}.csv`` with ``audiocap_id,youtube_id,start_time,caption``,
  one caption per row; rows naming the same audio file become one clip. Downloads name clips differently, so
  the file name is a pattern (``{youtube_id}.wav``, ``Y{youtube_id}.wav``, ``{youtube_id}_{start_time}.flac``,
  ``{audiocap_id}.wav``, ...).
* WavCaps JSON (``{"data": [{"id", "caption", ...}]}``; ``caption_1..N`` also read); the file name is a
  pattern over the entry's fields (default ``{stem}.flac``, ``stem`` = the id without an extension).

A clip listed but absent on disk is reported with its path and counted; ``strict`` makes it an error.
Retrieval (``retrieval.datasets``) and captioning (``captioning.train --dataset audiocaps|clotho``) read
the datasets through these functions.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..audio import AUDIO_EXTENSIONS
from ..fileio import UndecodableError, csv_dicts, undecodable_line
from .manifest import Record, check_files

log = logging.getLogger(__name__)

CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}
_CLOTHO_ALIASES = {
    "dev": "development",
    "train": "development",
    "val": "validation",
    "valid": "validation",
    "eval": "evaluation",
    "test": "evaluation",
}
_AUDIOCAPS_ALIASES = {
    "development": "train",
    "dev": "train",
    "valid": "val",
    "validation": "val",
    "evaluation": "test",
    "eval": "test",
}
AUDIOCAPS_PATTERN = "{youtube_id}.wav"
WAVCAPS_PATTERN = "{stem}.flac"


class MissingAudioError(FileNotFoundError):
    """Clips listed by a dataset are absent on disk (raised in strict mode); the message lists them."""


@dataclass
class ReadResult:
    """Records whose audio exists, and what was listed but missing."""

    records: list[Record]  # clips present on disk, in listing order
    missing: list[Path] = field(default_factory=list)  # listed clips absent on disk
    source: str = ""  # what was read (for messages and reports)

    @property
    def n_listed(self) -> int:
        return len(self.records) + len(self.missing)

    def report(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "listed": self.n_listed,
            "present": len(self.records),
            "missing": len(self.missing),
            "missing_paths": [str(p) for p in self.missing],
        }


def finish_records(records: list[Record], source: str, strict: bool) -> ReadResult:
    present, missing = check_files(records, warn=False)  # reported below, with the source
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        msg = f"{source}: {len(missing)} of {len(records)} listed clip(s) missing on disk:\n  {shown}{more}"
        if strict:
            raise MissingAudioError(msg)
        log.warning("%s", msg)
    return ReadResult(present, missing, source)


def read_csv_lines(path: Path, multiline: bool = True) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file as ``(line where the row starts, {column: cell})`` (UTF-8, falling back to cp1252
    for files saved by spreadsheet tools). Bad bytes, an unbalanced quote or a row of another width raise a
    ValueError naming the file and the line (:func:`m2dclap.fileio.csv_rows`; ``multiline``: whether a quoted
    cell may span lines)."""
    try:
        return csv_dicts(path, "utf-8-sig", multiline)[1]
    except UndecodableError:
        not_utf8 = undecodable_line(path)
    try:
        rows = csv_dicts(path, "cp1252", multiline)[1]
    except UndecodableError:
        raise UndecodableError(f"{not_utf8}, nor cp1252; save the file as UTF-8") from None
    log.warning("%s: read it as cp1252", not_utf8)
    return rows


def read_csv_dicts(path: Path, multiline: bool = True) -> list[dict[str, str]]:
    """The rows of :func:`read_csv_lines` without their line numbers."""
    return [row for _, row in read_csv_lines(path, multiline)]


def require_columns(rows: list[dict[str, str]], path: Path, columns: Iterable[str]) -> None:
    have = set(rows[0]) if rows else set()
    lacking = [c for c in columns if c not in have]
    if rows and lacking:
        raise ValueError(f"{path}: missing column(s) {', '.join(lacking)} (found: {', '.join(sorted(have))})")


def _first_existing(candidates: Sequence[Path]) -> Path:
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _find_file(root: Path, name: str, what: str) -> Path:
    for c in (root / name, *sorted(root.glob(f"*/{name}"))):
        if c.is_file():
            return c
    raise FileNotFoundError(f"{what}: no {name} in {root} or its sub-folders")


# --------------------------------------------------------------------------------------------- Clotho
def clotho_split(split: str) -> str:
    """``development``/``validation``/``evaluation`` from any of their usual short names."""
    s = split.strip().lower()
    s = _CLOTHO_ALIASES.get(s, s)
    if s not in CLOTHO_SPLITS:
        raise ValueError(f"unknown Clotho split {split!r}; use development, validation or evaluation")
    return s


def read_clotho(
    root: str | Path, split: str = "evaluation", audio_dir: str | Path | None = None, strict: bool = False
) -> ReadResult:
    """Clotho v2.1 ``split`` -> one record per clip with its five captions (manifest split train/val/test)."""
    root, split = Path(root), clotho_split(split)
    csv_path = _find_file(root, f"clotho_captions_{split}.csv", "Clotho")
    rows = read_csv_dicts(csv_path)
    require_columns(rows, csv_path, ["file_name", "caption_1"])
    folder = (
        Path(audio_dir)
        if audio_dir
        else _first_existing(
            [root / split, root / f"clotho_audio_{split}", root / "audio" / split, csv_path.parent / split]
        )
    )
    cap_cols = sorted(
        (c for c in (rows[0] if rows else {}) if c.startswith("caption_")),
        key=lambda c: int(c.split("_")[1]) if c.split("_")[1].isdigit() else 99,
    )
    records = []
    for row in rows:
        name = row["file_name"].strip()
        if not name:
            continue
        captions = [row[c].strip() for c in cap_cols if row[c].strip()]
        records.append(Record(id=Path(name).stem, audio=folder / name, captions=captions, split=CLOTHO_SPLITS[split]))
    return finish_records(records, f"Clotho {split} ({csv_path})", strict)


# ------------------------------------------------------------------------------------------- AudioCaps
def _pattern_fields(pattern: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(pattern) if f]


def read_audiocaps(
    root: str | Path,
    split: str = "test",
    audio_dir: str | Path | None = None,
    pattern: str = AUDIOCAPS_PATTERN,
    strict: bool = False,
) -> ReadResult:
    """AudioCaps ``split`` -> one record per audio file, captions in row order.

    ``pattern`` names a clip's file from ``youtube_id``, ``start_time``, ``end_time`` (start + 10) and
    ``audiocap_id``; the audio folder defaults to ``ROOT/SPLIT`` (or ``ROOT/audio/SPLIT``, ``ROOT/audio``).
    """
    root = Path(root)
    s = split.strip().lower()
    s = _AUDIOCAPS_ALIASES.get(s, s)
    if s not in ("train", "val", "test"):
        raise ValueError(f"unknown AudioCaps split {split!r}; use train, val or test")
    allowed = {"youtube_id", "start_time", "end_time", "audiocap_id"}
    unknown = [f for f in _pattern_fields(pattern) if f.split(":")[0].split("!")[0] not in allowed]
    if unknown:
        raise ValueError(f"--audio-pattern {pattern!r}: unknown field(s) {unknown}; use {sorted(allowed)}")
    csv_path = _find_file(root, f"{s}.csv", "AudioCaps")
    lines = read_csv_lines(csv_path)
    require_columns([row for _, row in lines], csv_path, ["youtube_id", "start_time", "caption"])
    folder = Path(audio_dir) if audio_dir else _first_existing([root / s, root / "audio" / s, root / "audio"])
    by_file: dict[str, Record] = {}
    for line, row in lines:
        try:
            start = int(float(row["start_time"]))
        except ValueError:
            raise ValueError(f"{csv_path}, line {line}: start_time {row['start_time']!r} is not a number") from None
        values = {
            "youtube_id": row["youtube_id"].strip(),
            "start_time": start,
            "end_time": start + 10,
            "audiocap_id": row.get("audiocap_id", "").strip(),
        }
        name = pattern.format(**values)
        rec = by_file.get(name)
        if rec is None:
            rec = by_file[name] = Record(id=Path(name).stem, audio=folder / name, split=s)
        if row["caption"].strip():
            rec.captions.append(row["caption"].strip())
    return finish_records(list(by_file.values()), f"AudioCaps {s} ({csv_path}, files {folder / pattern})", strict)


# --------------------------------------------------------------------------------------------- WavCaps
def read_wavcaps(
    json_path: str | Path, audio_dir: str | Path | None = None, pattern: str = WAVCAPS_PATTERN, strict: bool = False
) -> ReadResult:
    """WavCaps JSON (a file, or a folder whose ``*.json`` files are all read) -> training records.

    ``pattern`` names the audio file from the entry's fields, e.g. ``{stem}.flac`` or ``{id}``; ``stem`` is
    the ``id`` without an extension (AudioSet-SL ids end in ``.wav``).
    """
    json_path = Path(json_path)
    files = sorted(json_path.glob("*.json")) if json_path.is_dir() else [json_path]
    if not files:
        raise FileNotFoundError(f"WavCaps: no .json files in {json_path}")
    by_file: dict[str, Record] = {}
    for path in files:
        folder = Path(audio_dir) if audio_dir else path.parent
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # bad bytes or bad JSON: the bare message would not name the file
            raise ValueError(f"{path}: not a UTF-8 JSON file ({e})") from None
        entries = doc.get("data", []) if isinstance(doc, dict) else doc
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected {{'data': [...]}} or a list of entries")
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry:
                raise ValueError(f"{path}: entry {n} has no 'id'")
            values = {k: v for k, v in entry.items() if isinstance(v, (str, int, float))}
            values["id"] = str(entry["id"])
            values["stem"] = (
                Path(values["id"]).stem if Path(values["id"]).suffix.lower() in AUDIO_EXTENSIONS else values["id"]
            )
            try:
                name = pattern.format(**values)
            except KeyError as e:
                raise ValueError(f"{path}: entry {n} has no field {e} used by the pattern {pattern!r}") from None
            captions = [
                str(entry[k]).strip()
                for k in ["caption", *sorted((k for k in entry if k.startswith("caption_")), key=lambda k: (len(k), k))]
                if k in entry
            ]
            audio = Path(name) if Path(name).is_absolute() else folder / name
            rec = by_file.setdefault(str(audio), Record(id=Path(name).stem, audio=audio, split="train"))
            rec.captions.extend(c for c in captions if c and c not in rec.captions)
    records = list(by_file.values())
    _dedupe_ids(records)
    return finish_records(records, f"WavCaps ({', '.join(str(f) for f in files)})", strict)


def _dedupe_ids(records: list[Record]) -> None:
    """Two sources may name different files with the same stem: suffix the later ids."""
    seen: dict[str, int] = {}
    for r in records:
        if r.id in seen:
            seen[r.id] += 1
            r.id = f"{r.id}#{seen[r.id]}"
        else:
            seen[r.id] = 0
