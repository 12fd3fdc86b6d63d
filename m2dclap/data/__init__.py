"""Manifests, datasets, caption embeddings and the embedded synthetic corpus.

from m2dclap.data import generate_corpus, read_manifest, AudioCaptionDataset, collate
manifest = generate_corpus(default_corpus_dir())          # the default data: no download
train = read_manifest(manifest, split="train")
"""

from __future__ import annotations

from typing import Any

from .capemb import CaptionEmbeddingError, load_caption_embeddings, save_caption_embeddings
from .datasets import AudioCaptionDataset, collate
from .manifest import (
    ManifestError,
    Record,
    apply_exclusions,
    check_files,
    read_exclusion_list,
    read_manifest,
    write_manifest,
)

# The synthetic corpus is imported on first use, so `python -m m2dclap.data.synthetic` runs without
# runpy's "found in sys.modules" warning.
_SYNTHETIC = ("CLASS_NAMES", "default_corpus_dir", "generate_corpus")


def __getattr__(name: str) -> Any:
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AudioCaptionDataset",
    "CLASS_NAMES",
    "CaptionEmbeddingError",
    "ManifestError",
    "Record",
    "apply_exclusions",
    "check_files",
    "collate",
    "default_corpus_dir",
    "generate_corpus",
    "load_caption_embeddings",
    "read_exclusion_list",
    "read_manifest",
    "save_caption_embeddings",
    "write_manifest",
]
