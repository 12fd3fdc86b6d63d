"""Audio-text retrieval with M2D-CLAP: dataset readers, evaluation (paper Table VIII), fine-tuning, DCASE
submissions. Uses only the public ``m2dclap`` API (``m2dclap.load``, ``encode_audio``, ``encode_text``,
``forward``); fine-tuning is a task of the public training engine ``m2dclap.train.engine`` with the paper's
stage-2.1 settings from ``m2dclap.stages``.

    python -m retrieval.datasets clotho --root data/clotho --split evaluation --out clotho-eval.csv
    python -m retrieval.evaluate --checkpoint CKPT --dataset clotho --root data/clotho --split evaluation
    accelerate launch -m retrieval.finetune --checkpoint CKPT --train clotho,audiocaps --val clotho ...
    python -m retrieval.submit --checkpoint CKPT --captions retrieval_captions.csv --audio-dir DIR --out OUT
"""

from __future__ import annotations

from typing import Any

# Names are imported on first use, so `python -m retrieval.datasets` (etc.) runs without runpy's
# "found in sys.modules" warning.
_EXPORTS = {
    "datasets": (
        "DcaseEvalSet",
        "MissingAudioError",
        "ReadResult",
        "read_retrieval_dataset",
        "read_audiocaps",
        "read_clotho",
        "read_dcase_eval",
        "read_relevance",
        "read_wavcaps",
    ),
    "metrics": ("PROTOCOLS", "Relevance", "caption_retrieval", "relevant_positions", "retrieval_scores"),
}


def __getattr__(name: str) -> Any:
    for module, names in _EXPORTS.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(n for names in _EXPORTS.values() for n in names)
