"""Pre-computing caption embeddings with a sentence-embedding model (stage 1 text side).

The paper uses NV-Embed-v2 (4096-d); the offline default is the packaged all-MiniLM-L6-v2 (384-d).
Output: the official ``{clip id: float16 array [n_captions, D]}`` .npy dictionary. Work is saved in
parts as it goes, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .clap import SentenceTextEncoder
from .config import TextCfg
from .data.capemb import save_caption_embeddings
from .data.manifest import read_manifest
from .fileio import atomic_write

log = logging.getLogger(__name__)


def sentence_model_cfg(name: str) -> TextCfg:
    """NV-Embed-v2 needs an EOS appended to every text (as the official loader does)."""
    nv = "nv-embed" in name.lower()
    return TextCfg(kind="sentence", name=name, pooling="mean", width=4096 if nv else 0, add_eos=nv)


def embed_captions(
    manifest: str | Path,
    out: str | Path,
    model_name: str = "all-MiniLM-L6-v2",
    batch_size: int = 256,
    progress: bool = True,
    split: str | None = None,
) -> Path:
    """Embed every caption of every clip of ``manifest`` (or of one ``split``) into ``out`` (official .npy
    dict form)."""
    records = [r for r in read_manifest(manifest, split=split) if r.captions]
    if not records:
        raise ValueError(f"{manifest}: no captions to embed")
    out = Path(out)
    # part n covers records n*batch_size ..: the batch size is part of what a resumed run must share
    key = hashlib.sha1(
        json.dumps([model_name, str(Path(manifest).resolve()), split, len(records), batch_size]).encode()
    ).hexdigest()[:12]
    parts = out.with_name(out.name + f".parts-{key}")
    parts.mkdir(parents=True, exist_ok=True)
    encoder = SentenceTextEncoder(sentence_model_cfg(model_name))
    chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    for n, chunk in enumerate(tqdm(chunks, desc="embedding captions", unit="batch", disable=not progress)):
        part = parts / f"{n:06d}.npz"
        if part.exists():
            continue  # done before a restart
        texts = [c for r in chunk for c in r.captions]
        emb = encoder(texts).cpu().numpy().astype(np.float16)
        with atomic_write(part) as f:  # hidden temporary name: a killed write never matches the glob below
            np.savez(f, ids=np.array([r.id for r in chunk]), counts=np.array([len(r.captions) for r in chunk]), emb=emb)
    result: dict[str, np.ndarray] = {}
    for part in sorted(parts.glob("[0-9]*.npz")):
        with np.load(part, allow_pickle=False) as z:  # our own parts: plain arrays only
            offsets = np.concatenate([[0], np.cumsum(z["counts"])])
            for i, clip_id in enumerate(z["ids"].tolist()):
                result[clip_id] = z["emb"][offsets[i] : offsets[i + 1]]
    save_caption_embeddings(result, out)
    shutil.rmtree(parts, ignore_errors=True)
    log.info("wrote %d clips' caption embeddings (%d-d) to %s", len(result), next(iter(result.values())).shape[-1], out)
    return out
