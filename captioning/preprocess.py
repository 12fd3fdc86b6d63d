"""Cache EnCodec tokens and CLAP audio embeddings per clip for EnCLAP-style captioning.

    python -m captioning.preprocess --data MANIFEST --out DIR --clap m2d-clap --clap-checkpoint C \\
        [--codec pretrained|random|PATH] [--split train|val|test ...]

Writes, under DIR:

* ``tokens/<id>.npy``: EnCodec tokens, int16, shape (16, T) (24 kHz model at 12 kbps, 75 frames/s);
* ``clap/<clap-name>/<id>.npy``: the CLAP audio embedding, float32, shape (D,);
* ``index.csv``: one row per cached clip: ``id, audio, split, frames, tokens, clap, caption_1..caption_K``
  (paths relative to DIR); it is also a valid manifest of the suite;
* ``errors.csv``: ``id, audio, error`` for clips skipped in this run: undecodable, empty, NaN/Inf, or
  shorter than the CLAP frontend's window;
* ``preprocess.json``: the codec and CLAP used, so a later run can refuse to mix caches; written just
  before the first output, so a run that failed before it (codec download offline) binds nothing.

The run is resumable: a clip whose outputs exist is not recomputed, and every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from m2dclap.cli import CliError, option, resolve_device, run_cli
from m2dclap.data.manifest import ManifestError, Record, read_manifest
from m2dclap.embed_files import AudioBatches, min_samples_at, report_skipped
from m2dclap.fileio import atomic_write

from .clap_backends import BackendError, ClapBackend, get_backend, list_backends
from .codec import CODEBOOK_SIZE, CODEC_SAMPLE_RATE, DEFAULT_BANDWIDTH, CodecError, LazyCodec, encode_batch

log = logging.getLogger("captioning.preprocess")

INDEX_NAME = "index.csv"
ERRORS_NAME = "errors.csv"
META_NAME = "preprocess.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class Paths:
    tokens: Path
    clap: Path


def _safe_name(clip_id: str) -> str:
    """A file name for a clip id (ids may hold '/' or spaces); distinct ids stay distinct."""
    safe = _UNSAFE.sub("_", clip_id)
    if safe != clip_id:
        import hashlib

        safe = f"{safe}-{hashlib.sha1(clip_id.encode()).hexdigest()[:8]}"
    return safe


def clip_paths(out: Path, clap_name: str, clip_id: str) -> Paths:
    name = _safe_name(clip_id) + ".npy"
    return Paths(tokens=out / "tokens" / name, clap=out / "clap" / _safe_name(clap_name) / name)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def clap_min_samples(clap: ClapBackend, sample_rate: int) -> int:
    """The shortest clip at ``sample_rate`` that ``clap`` accepts: its model's log-mel window (the codec takes
    any length); 1 for a backend without an M2D-CLAP frontend."""
    cfg = getattr(getattr(clap, "model", None), "cfg", None)
    return min_samples_at(cfg.frontend, sample_rate) if hasattr(cfg, "frontend") else 1


def _merged_meta(out: Path, meta: dict) -> dict:
    """``preprocess.json`` with this run's settings added; refuses a codec or CLAP that differs from the one
    that made outputs already in ``out``. Settings recorded by a run that wrote nothing do not bind."""
    path = out / META_NAME
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    have_tokens = any((out / "tokens").glob("*.npy"))
    for key in ("codec", "bandwidth"):
        if have_tokens and key in old and old[key] != meta[key]:
            raise ValueError(
                f"{out}: the cached tokens were made with {key}={old[key]!r}, this run uses "
                f"{meta[key]!r}; use another --out folder"
            )
    claps = dict(old.get("clap", {})) if have_tokens else {}
    name = meta["clap_name"]
    have_clap = any((out / "clap" / _safe_name(name)).glob("*.npy"))
    if have_clap and name in claps and claps[name] != meta["clap"]:
        raise ValueError(
            f"{out}: the cached {name} embeddings were made with {claps[name]!r}, this run uses "
            f"{meta['clap']!r}; use another --out folder"
        )
    claps[name] = meta["clap"]
    return {**(old if have_tokens else {}), "codec": meta["codec"], "bandwidth": meta["bandwidth"], "clap": claps}


def _write_meta(out: Path, meta: dict) -> None:
    with atomic_write(out / META_NAME, "w") as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def preprocess(
    records: Sequence[Record],
    out: str | Path,
    codec,
    clap: ClapBackend,
    codec_source: str,
    bandwidth: float,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Cache tokens and embeddings for ``records`` under ``out``; return counts and the skipped clips.

    Audio is read through :class:`m2dclap.embed_files.AudioBatches`: undecodable, empty, NaN/Inf and
    too-short clips are skipped and listed in ``errors``. ``preprocess.json`` is written just before the first
    output, so a run that fails earlier (e.g. the codec cannot be loaded) records nothing."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = _merged_meta(
        out,
        {
            "codec": codec_source,
            "bandwidth": float(bandwidth),
            "clap_name": clap.name,
            "clap": json.loads(json.dumps(clap.describe(), default=str)),
        },
    )
    stats = {"clips": len(records), "tokens_computed": 0, "clap_computed": 0, "skipped": 0, "errors": []}
    todo = []
    for rec in records:
        p = clip_paths(out, clap.name, rec.id)
        if p.tokens.is_file() and p.clap.is_file():
            stats["skipped"] += 1
        else:
            todo.append((rec, p))
    if stats["skipped"]:
        _write_meta(out, meta)  # outputs of these settings are there already
    log.info("%d clip(s): %d cached, %d to compute", len(records), stats["skipped"], len(todo))
    pending_meta = not stats["skipped"]
    batches = AudioBatches(
        [rec.audio for rec, _ in todo],
        CODEC_SAMPLE_RATE,
        clap_min_samples(clap, CODEC_SAMPLE_RATE),
        batch_size,
        progress=progress,
        desc="preprocess",
    )
    for batch in batches:
        stats["errors"] += [
            {"id": todo[i][0].id, "audio": str(todo[i][0].audio), "error": reason} for i, reason in batch.skipped
        ]
        good = [todo[i] for i in batch.indices]
        waves = batch.waves
        need_tok = [k for k, (_, p) in enumerate(good) if not p.tokens.is_file()]
        need_clap = [k for k, (_, p) in enumerate(good) if not p.clap.is_file()]
        codes = []
        if need_tok:
            model = codec.get() if isinstance(codec, LazyCodec) else codec
            codes = encode_batch(model, [waves[k] for k in need_tok], CODEC_SAMPLE_RATE)
            for k, c in zip(need_tok, codes):
                if int(c.min()) < 0 or int(c.max()) >= CODEBOOK_SIZE:
                    raise CodecError(f"{good[k][0].audio}: codec produced codes outside [0, {CODEBOOK_SIZE})")
        emb = clap.embed_audio([waves[k] for k in need_clap], CODEC_SAMPLE_RATE) if need_clap else []
        if pending_meta and (need_tok or need_clap):
            _write_meta(out, meta)  # before the first output: a cache never holds files of unrecorded settings
            pending_meta = False
        for k, c in zip(need_tok, codes):
            _save_npy(good[k][1].tokens, c.numpy().astype(np.int16))
            stats["tokens_computed"] += 1
        for k, e in zip(need_clap, emb):
            _save_npy(good[k][1].clap, e.numpy().astype(np.float32))
            stats["clap_computed"] += 1

    _write_index(out, records, clap.name)
    _write_errors(out, stats["errors"])
    return stats


def _write_index(out: Path, records: Sequence[Record], clap_name: str) -> None:
    rows = []
    for rec in records:
        p = clip_paths(out, clap_name, rec.id)
        if not (p.tokens.is_file() and p.clap.is_file()):
            continue
        frames = int(np.load(p.tokens, mmap_mode="r").shape[1])
        rows.append((rec, frames, p))
    k = max((len(r.captions) for r, _, _ in rows), default=0)
    with atomic_write(out / INDEX_NAME, "w") as f:
        w = csv.writer(f)
        w.writerow(["id", "audio", "split", "frames", "tokens", "clap"] + [f"caption_{i + 1}" for i in range(k)])
        for rec, frames, p in rows:
            w.writerow(
                [
                    rec.id,
                    str(rec.audio),
                    rec.split or "",
                    frames,
                    p.tokens.relative_to(out).as_posix(),
                    p.clap.relative_to(out).as_posix(),
                ]
                + rec.captions
                + [""] * (k - len(rec.captions))
            )


def _write_errors(out: Path, errors: list[dict]) -> None:
    with atomic_write(out / ERRORS_NAME, "w") as f:
        w = csv.DictWriter(f, fieldnames=["id", "audio", "error"])
        w.writeheader()
        w.writerows(errors)


DESCRIPTION = (
    "Cache, per clip of a manifest, EnCodec tokens (24 kHz model, 12 kbps: int16 (16, T) at 75 frames/s) "
    "and the CLAP audio embedding (float32 (D,)) for EnCLAP-style captioning. Resumable: clips already "
    "cached are skipped. Clips that cannot be used (undecodable, empty, NaN/Inf, shorter than one STFT "
    f"window) are named on stderr, listed in DIR/{ERRORS_NAME} and skipped (exit status 1); "
    f"DIR/{INDEX_NAME} lists the cached clips. Nothing is written before the codec and CLAP load."
)


@dataclass(kw_only=True)
class PreprocessOptions:
    data: str = option(metavar="MANIFEST", help="the suite's .csv/.jsonl manifest")
    out: str = option(metavar="DIR", help="cache folder (created if missing)")
    clap: str = option("m2d-clap", help=f"CLAP backend (known: {', '.join(list_backends())})")
    clap_checkpoint: str | None = option(
        None, metavar="C", help="the CLAP checkpoint: a folder, file or registered name"
    )
    codec: str = option(
        "pretrained",
        metavar="pretrained|random|PATH",
        help="EnCodec weights: 'pretrained' (downloads encodec_24khz-d7cc33bc.th into the torch hub "
        "cache), a folder or file holding it, or 'random' (seeded random weights, tests only)",
    )
    bandwidth: float = option(
        DEFAULT_BANDWIDTH, help=f"EnCodec bandwidth in kbps (default {DEFAULT_BANDWIDTH:g} -> 16 codebooks)"
    )
    split: list[str] | None = option(
        None, choices=["train", "val", "test"], help="only these splits of the manifest (default: all clips)"
    )
    batch_size: int = option(8, minimum=1, help="clips loaded and encoded together")
    device: str | None = option(None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    no_progress: bool = option(False, help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, PreprocessOptions, argv, prog="python -m captioning.preprocess", description=DESCRIPTION)


def run(args: PreprocessOptions) -> int:
    device = resolve_device(args.device)
    try:
        if args.split:
            records = [r for s in dict.fromkeys(args.split) for r in read_manifest(args.data, split=s)]
        else:
            records = read_manifest(args.data)
        kwargs = {"device": device}
        if args.clap_checkpoint is not None:
            kwargs["checkpoint"] = args.clap_checkpoint
        clap = get_backend(args.clap, **kwargs)
        codec = LazyCodec(args.codec, args.bandwidth, device)
        stats = preprocess(
            records,
            args.out,
            codec,
            clap,
            codec_source=str(args.codec),
            bandwidth=args.bandwidth,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (ManifestError, BackendError, CodecError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    n_err = len(stats["errors"])
    report_skipped([(e["audio"], e["error"]) for e in stats["errors"]], what="clip", stream=sys.stderr)
    print(
        f"{stats['clips']} clip(s): {stats['tokens_computed']} token file(s) and {stats['clap_computed']} "
        f"embedding(s) computed, {stats['skipped']} already cached, {n_err} skipped"
        + (f" (listed in {Path(args.out) / ERRORS_NAME})" if n_err else "")
    )
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
