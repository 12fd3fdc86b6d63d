"""The predictions and references CSV files: reading them (errors name file and line) and writing predictions."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

from m2dclap.fileio import atomic_write, csv_dicts

_ID_COLUMNS = ("file_name", "file_path")


def _id_column(fieldnames: Sequence[str] | None, path) -> str:
    for name in _ID_COLUMNS:
        if fieldnames and name in fieldnames:
            return name
    raise ValueError(f"{path}: needs a 'file_name' column (header found: {fieldnames})")


def _caption_table(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line, row)`` s of a predictions or references CSV: UTF-8, one line per row. A quoted cell
    running over lines (an unbalanced quote), bad bytes or a row of another width raise a ValueError naming
    the file and the line, instead of swallowing the rows after it (reported as missing references)."""
    return csv_dicts(path, multiline=False)


def read_predictions_csv(path: str | os.PathLike) -> dict[str, str]:
    """``file_name,caption`` (one row per clip) -> {file_name: caption}."""
    header, rows = _caption_table(path)
    key = _id_column(header, path)
    if "caption" not in header:
        raise ValueError(f"{path}: needs a 'caption' column (header found: {header})")
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for line, row in rows:
        fid = row[key]
        if fid in out:
            raise ValueError(f"{path}, line {line}: duplicate prediction for {fid!r} (first on line {first[fid]})")
        out[fid], first[fid] = row["caption"], line
    return out


def write_predictions(path: str | os.PathLike, preds: Mapping[str, str]) -> None:
    """{file_name: caption} -> the ``file_name,caption`` CSV :func:`read_predictions_csv` reads (atomically)."""
    with atomic_write(Path(path), "w") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows(preds.items())


def read_references_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """``file_name,caption_1,...,caption_N`` -> {file_name: [non-empty captions]}."""
    header, rows = _caption_table(path)
    key = _id_column(header, path)
    cols = sorted((c for c in header if re.fullmatch(r"caption_\d+", c)), key=lambda c: int(c.split("_")[1]))
    if not cols:
        raise ValueError(f"{path}: needs caption_1..caption_N columns (header found: {header})")
    out: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for line, row in rows:
        fid = row[key]
        if fid in out:
            raise ValueError(f"{path}, line {line}: duplicate references row for {fid!r} (first on line {first[fid]})")
        out[fid], first[fid] = [row[c] for c in cols if row[c].strip()], line
    return out
