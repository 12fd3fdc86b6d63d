"""The output folder of :mod:`m2dclap.extract`: output names, atomic writes, the ``index.csv`` / ``errors.csv``
ledgers that make a run resumable, the folder lock, and ``meta.json``."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from .audio_files import AudioItem
from .fileio import atomic_write

log = logging.getLogger(__name__)

FEATURE_KINDS = ("clip", "frame", "clap")
INDEX_FIELDS = ("file", "duration_s", "n_frames", "status")
ERROR_FIELDS = ("file", "error")


class ExtractError(ValueError):
    """A problem with the request itself (not with one audio file): the run does not start."""


def check_output_names(items: Sequence[AudioItem]) -> None:
    """Refuse two files whose outputs would overwrite each other."""
    owner: dict[PurePosixPath, AudioItem] = {}
    clashes = []
    for item in items:
        key = item.rel.with_suffix("")
        if key in owner:
            clashes.append(f"{owner[key].path} and {item.path} -> <kind>/{key}.npy")
        else:
            owner[key] = item
    if clashes:
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise ExtractError(
            "these files would write the same outputs: "
            + "; ".join(clashes[:5])
            + more
            + ". Give their common parent folder as the input, or rename them."
        )


# ---------------------------------------------------------------------------------------------------
# Small file helpers: atomic writes, a tolerant ledger, a lock
# ---------------------------------------------------------------------------------------------------


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array)


def write_ledger(path: Path, fields: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_ledger(path: Path, fields: Sequence[str]) -> dict[str, dict[str, str]]:
    """Rows by ``file``, later rows winning; rows cut short by a killed run are dropped."""
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != tuple(fields):
            log.warning("%s: unexpected columns %s; ignoring its contents", path, reader.fieldnames)
            return {}
        rows = {}
        for row in reader:
            if row.get("file") and all(row.get(k) is not None for k in fields) and None not in row:
                rows[row["file"]] = {k: row[k] for k in fields}
        return rows


def valid_index_row(row: dict[str, str] | None) -> bool:
    if row is None or row["status"] not in ("ok", "failed"):
        return False
    if row["status"] == "failed":
        return True
    try:
        float(row["duration_s"]), int(row["n_frames"])
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def lock_output_dir(out_dir: Path):
    """Refuse a second extraction into the same folder while one runs."""
    from filelock import FileLock, Timeout

    lock = FileLock(out_dir / ".lock", blocking=False)
    try:
        lock.acquire()
    except Timeout:
        raise ExtractError(f"{out_dir}: another extraction is writing to this folder") from None
    try:
        yield
    finally:
        lock.release()


def remove_stale_tmp(out_dir: Path) -> None:
    for where in [out_dir] + [out_dir / k for k in FEATURE_KINDS]:
        if where.is_dir():
            for tmp in where.rglob(".*.tmp") if where != out_dir else where.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()


def prepare_out_dir(
    model, out_dir: Path, kinds: tuple[str, ...], checkpoint: str | None, overwrite: bool
) -> tuple[dict, dict]:
    """Check ``meta.json`` against this run, write the new one, return the previous (index, errors) rows."""
    meta_path = out_dir / "meta.json"
    meta = {
        "checkpoint": checkpoint,
        "model": model.cfg.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "saved_dtype": "float32",
        "features": list(kinds),
        "frame_hop_s": model.cfg.encoder.patch_size[1] * model.cfg.frontend.hop_length / model.sample_rate,
        "sample_rate": model.sample_rate,
        "layout": "<kind>/<path relative to its input, without extension>.npy",
    }
    index = read_ledger(out_dir / "index.csv", INDEX_FIELDS)
    errors = read_ledger(out_dir / "errors.csv", ERROR_FIELDS)
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, OSError):
            old = {}
        diff = [
            k
            for k in ("checkpoint", "model", "dtype")
            if old.get(k) is not None and meta[k] is not None and old[k] != meta[k]
        ]
        if diff and not overwrite:
            raise ExtractError(
                f"{out_dir} holds features of another run ("
                + ", ".join(f"{k}: {old[k]!r} there, {meta[k]!r} now" for k in diff)
                + "); use another --out, or --overwrite to recompute into it"
            )
        if diff:
            log.warning(
                "%s: replacing features of %s; outputs of files not in this run are stale",
                out_dir,
                ", ".join(f"{k}={old[k]!r}" for k in diff),
            )
            index, errors = {}, {}
        else:
            meta["features"] = [k for k in FEATURE_KINDS if k in set(kinds) | set(old.get("features", []))]
    with atomic_write(meta_path, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    return index, errors
