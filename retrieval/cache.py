"""Embedding cache: one ``.npy`` per checkpoint and audio file, one per checkpoint and caption list.

Keys: the checkpoint's fingerprint (path, size and modification time of its files, or its hub name) and,
per audio file, its resolved path, size and modification time, so a re-written file or a re-trained checkpoint
is embedded again. Every write goes to a temporary file in the same folder and is renamed into place, so an
interrupted run never leaves a half-written entry and concurrent runs can share the folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from m2dclap.embed_files import embed_files
from m2dclap.fileio import atomic_write

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$M2DCLAP_CACHE/retrieval`` if set, else ``~/.cache/m2dclap/retrieval``."""
    base = os.environ.get("M2DCLAP_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "m2dclap") / "retrieval"


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """A short hash naming a checkpoint's exact contents (files' sizes and times) or its hub name."""
    path = Path(checkpoint)
    h = hashlib.sha1()
    if path.exists():
        path = path.resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        h.update(str(path).encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(path) if path.is_dir() else f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        h.update(f"name:{checkpoint}".encode())
    return h.hexdigest()[:16]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def _load(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:  # unreadable entry: recompute it
        log.warning("ignoring a damaged cache entry %s (%s)", path, e)
        return None


class EmbeddingCache:
    """The cache folder of one checkpoint: ``ROOT/<fingerprint>/audio/ab/<key>.npy`` and ``text/<key>.npy``."""

    def __init__(self, root: str | Path, checkpoint: str | Path):
        self.dir = Path(root) / checkpoint_fingerprint(checkpoint)
        self.hits = 0
        self.stored = 0

    @staticmethod
    def audio_key(path: str | Path) -> str:
        p = Path(path).resolve()
        st = p.stat()
        return hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()

    def _audio_path(self, key: str) -> Path:
        return self.dir / "audio" / key[:2] / f"{key}.npy"

    def get_audio(self, path: str | Path) -> np.ndarray | None:
        entry = self._audio_path(self.audio_key(path))
        emb = _load(entry) if entry.is_file() else None
        self.hits += emb is not None
        return emb

    def put_audio(self, path: str | Path, emb: np.ndarray) -> None:
        _atomic_save(self._audio_path(self.audio_key(path)), np.asarray(emb, dtype=np.float32))
        self.stored += 1

    def _text_path(self, texts: Sequence[str]) -> Path:
        h = hashlib.sha1("\x00".join(texts).encode()).hexdigest()
        return self.dir / "text" / f"{h}.npy"

    def get_text(self, texts: Sequence[str]) -> np.ndarray | None:
        entry = self._text_path(texts)
        emb = _load(entry) if entry.is_file() else None
        if emb is not None and emb.shape[0] != len(texts):
            emb = None
        self.hits += emb is not None
        return emb

    def put_text(self, texts: Sequence[str], emb: np.ndarray) -> None:
        _atomic_save(self._text_path(texts), np.asarray(emb, dtype=np.float32))
        self.stored += 1


def embed_audio_files(
    model, paths: Sequence[str | Path], cache: EmbeddingCache | None = None, batch_size: int = 32, progress: bool = True
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """CLAP audio embeddings (N, D) of whole files, cached per file.

    Files are read through :func:`m2dclap.embed_files.embed_files`. Returns the embeddings (rows of skipped
    files are NaN) and ``[(index, reason)]`` of the files that were skipped: undecodable, empty, NaN/Inf or
    shorter than the frontend's window; each reason names the file.
    """
    rows: list[np.ndarray | None] = [None] * len(paths)
    todo = []
    for i, p in enumerate(paths):
        emb = cache.get_audio(p) if cache is not None and Path(p).is_file() else None
        if emb is not None:
            rows[i] = emb
        else:
            todo.append(i)
    if todo:
        log.info("embedding %d audio file(s) (%d from the cache)", len(todo), len(paths) - len(todo))

    def keep(done: list[int], emb: torch.Tensor) -> None:  # cached batch by batch: an interrupted run keeps them
        for k, e in zip(done, emb.numpy()):
            rows[todo[k]] = e
            if cache is not None:
                cache.put_audio(paths[todo[k]], e)

    _, skipped = embed_files(
        model, [paths[i] for i in todo], batch_size, progress=progress and bool(todo), on_batch=keep
    )
    bad = [(todo[k], reason) for k, reason in skipped]
    dim = next((r.shape[-1] for r in rows if r is not None), 0)
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = r
    return torch.from_numpy(out), bad


def embed_texts(model, texts: Sequence[str], cache: EmbeddingCache | None = None, batch_size: int = 64) -> torch.Tensor:
    """CLAP text embeddings (N, D) of ``texts``, cached as one entry per caption list."""
    texts = list(texts)
    if cache is not None:
        hit = cache.get_text(texts)
        if hit is not None:
            return torch.from_numpy(hit)
    emb = model.encode_text(texts, batch_size=batch_size).float().cpu()
    if cache is not None:
        cache.put_text(texts, emb.numpy())
    return emb
