"""Clip features for linear evaluation: EVAR's unit-length crop, extraction, and the on-disk cache.

Every clip of a manifest becomes its clip feature z'' (``model.audio_features(...)['clip']``, (F'*D,)), cut first to
one unit length as EVAR does (zeros appended to a shorter clip; a longer one cropped at random, seeded, for
train and validation and from its start for test); the features are kept in one ``.npz`` per
checkpoint, manifest and crop setting, keyed by :func:`cache_key`. Used by :mod:`m2dclap.linear_eval`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.manifest import Record
from .embed_files import AudioBatches, min_samples_of

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the cached features change meaning (2: unit-length crop/pad, 3: test from start)


# ---------------------------------------------------------------------------------------------------
# Features: extraction and cache
# ---------------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Clip features of the readable clips of a manifest and the clips that failed."""

    ids: list[str]  # ids of the clips that have features, in manifest order
    clip: np.ndarray  # (N, F'*D) float32
    bad: list[tuple[str, str]]  # (path, reason) of each clip that could not be read or encoded

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        where = {i: n for n, i in enumerate(self.ids)}
        return self.clip[[where[i] for i in ids]] if ids else self.clip[:0]


def _stat(p: Path) -> list[Any]:
    try:
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return ["missing"]


def cache_key(
    checkpoint: str | Path,
    manifest: str | Path,
    records: Sequence[Record],
    unit_seconds: float | None = None,
    seed: int = 0,
    from_start: Collection[str] = (),
) -> str:
    """A hash of the checkpoint (its files' paths, sizes and times, or its registered name), the manifest's
    bytes and location, the size and time of every audio file it lists, and the crop settings (unit, seed of
    the random crops, the ids cropped from the start)."""
    ckpt = Path(checkpoint)
    if ckpt.exists():
        files = [ckpt] if ckpt.is_file() else sorted(f for f in ckpt.rglob("*") if f.is_file())
        ckpt_id: Any = [str(ckpt.resolve())] + [
            [f.relative_to(ckpt).as_posix() if f != ckpt else "", *_stat(f)] for f in files
        ]
    else:
        ckpt_id = str(checkpoint)  # a registered pretrained name
    manifest = Path(manifest)
    body = {
        "version": CACHE_VERSION,
        "checkpoint": ckpt_id,
        "manifest": str(manifest.resolve()),
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "audio": [_stat(Path(r.audio)) for r in records],
        "unit_seconds": round(unit_seconds, 6) if unit_seconds else None,
        "crop_seed": seed if unit_seconds else None,
        "crop_from_start": hashlib.sha256("\n".join(sorted(from_start)).encode()).hexdigest() if unit_seconds else None,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def load_cache(path: Path) -> Features | None:
    """The cached features, or None when the file is missing or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = Features(
                ids=z["ids"].tolist(),
                clip=z["clip"].astype(np.float32, copy=False),
                bad=list(zip(z["bad_paths"].tolist(), z["bad_reasons"].tolist())),
            )
    except (OSError, ValueError, KeyError, EOFError) as e:
        log.warning("%s: unreadable feature cache (%s); extracting again", path, e)
        return None
    if feats.clip.ndim != 2 or len(feats.ids) != len(feats.clip):
        log.warning("%s: malformed feature cache; extracting again", path)
        return None
    return feats


def save_cache(path: Path, feats: Features) -> None:
    """Write ``feats`` to ``path`` through a temporary file renamed into place (never half-written)."""
    from .fileio import atomic_write

    with atomic_write(path) as f:
        np.savez(
            f,
            ids=np.array(feats.ids, dtype=str),
            clip=feats.clip,
            bad_paths=np.array([b[0] for b in feats.bad], dtype=str),
            bad_reasons=np.array([b[1] for b in feats.bad], dtype=str),
        )


def mean_duration(records: Sequence[Record]) -> float | None:
    """Mean duration in seconds of the records' audio files that can be read (from their headers)."""
    import soundfile as sf

    total, n = 0.0, 0
    for rec in records:
        try:  # load_audio decodes with soundfile too: a file whose header it cannot read is unreadable
            info = sf.info(str(rec.audio))
        except (RuntimeError, OSError, ValueError):
            continue  # reported when its features are extracted
        total, n = total + info.frames / info.samplerate, n + 1
    return total / n if n else None


def fit_to_unit(wave: torch.Tensor, unit: int, rng: np.random.Generator | None) -> torch.Tensor:
    """EVAR's unit-length input: a ``unit``-sample crop of a longer clip (at random with ``rng``, from the start
    without: EVAR's test clips), zeros appended to a shorter."""
    n = wave.shape[-1]
    if n > unit:
        start = int(rng.integers(0, n - unit + 1)) if rng is not None else 0
        return wave[start : start + unit]
    return F.pad(wave, (0, unit - n)) if n < unit else wave


def _encode(model, waves: list[torch.Tensor]) -> list[np.ndarray | str]:
    """Clip features of a batch (a failing batch is retried clip by clip, as ``m2dclap.extract`` does)."""
    from .extract import compute_features_safe

    out = []
    for r in compute_features_safe(model, waves, ("clip",)):
        if isinstance(r, str) or np.isfinite(r["clip"]).all():
            out.append(r if isinstance(r, str) else r["clip"])
        else:
            out.append("the model produced NaN/Inf features")
    return out


def extract_clip_features(
    model,
    records: Sequence[Record],
    batch_size: int = 16,
    progress: bool | None = None,
    unit_samples: int | None = None,
    seed: int = 0,
    from_start: Collection[str] = (),
) -> Features:
    """z'' of every record, ``batch_size`` clips per model call; unreadable clips are logged and listed.
    ``unit_samples``: cut every clip to this length first (:func:`fit_to_unit`: the clips whose id is in
    ``from_start`` from their start, the others at random, seeded by ``seed`` and the clip's position), so a
    clip shorter than one STFT window is padded, not skipped."""
    model.eval()
    ids, rows = [], []
    start = set(from_start)

    def fit(i: int, w: torch.Tensor) -> torch.Tensor:
        rng = None if records[i].id in start else np.random.default_rng([seed, i])
        return fit_to_unit(w, unit_samples, rng)

    batches = AudioBatches(
        [r.audio for r in records],
        model.sample_rate,
        min_samples_of(model),
        batch_size,
        transform=fit if unit_samples else None,
        progress=progress,
        desc="extracting clip features",
    )
    bad: list[tuple[str, str]] = []
    for batch in batches:
        bad += [(str(records[i].audio), reason) for i, reason in batch.skipped]
        if not batch.waves:
            continue
        for i, res in zip(batch.indices, _encode(model, batch.waves)):
            if isinstance(res, str):
                log.warning("skipping %s: %s", records[i].audio, res)
                bad.append((str(records[i].audio), res))
            else:
                ids.append(records[i].id)
                rows.append(res)
    dim = model.cfg.encoder.embed_dim * model.cfg.encoder.grid_size[0]
    return Features(ids, np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32), bad)


def clip_features(
    checkpoint: str | Path,
    manifest: str | Path,
    records: Sequence[Record],
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool | None = None,
    unit_seconds: float | str | None = "auto",
    seed: int = 0,
    from_start: Collection[str] = (),
) -> tuple[Features, dict[str, Any]]:
    """Features of ``records`` from the cache when present, else extracted (and cached when ``cache_dir``).
    ``unit_seconds``: ``"auto"`` (the records' mean duration), a number of seconds, or None/0 (whole clips);
    ``from_start``: ids of the clips cropped from their start (the test split), the others at random."""
    from .checkpoint import load

    if unit_seconds == "auto":
        unit_seconds = mean_duration(records)
    unit_seconds = float(unit_seconds) if unit_seconds else None
    info: dict[str, Any] = {"cache": None, "cache_hit": False, "extract_seconds": 0.0, "unit_seconds": unit_seconds}
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"clip-{cache_key(checkpoint, manifest, records, unit_seconds, seed, from_start)}.npz"
        info["cache"] = str(cache)
        feats = load_cache(cache)
        if feats is not None:
            log.info("using cached clip features %s", cache)
            info["cache_hit"] = True
            return feats, info
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(checkpoint, device=device, audio_only=True)
    unit_samples = round(unit_seconds * model.sample_rate) if unit_seconds else None
    t0 = time.perf_counter()
    feats = extract_clip_features(model, records, batch_size, progress, unit_samples, seed, from_start)
    info["extract_seconds"] = round(time.perf_counter() - t0, 3)
    if cache is not None:
        save_cache(cache, feats)
    return feats, info
