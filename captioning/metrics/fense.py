"""FENSE, SBERT similarity, fluency error rate (FER) and SPIDEr-FL (Zhou et al. 2022; DCASE 2023/2024).

Per candidate caption ``c_i`` with references ``r_i1..r_iM``:

* ``sbert_sim_i = mean_j cos(e(c_i), e(r_ij))`` with Sentence-BERT ``paraphrase-TinyBERT-L6-v2``
  (``normalize_embeddings=True``);
* ``p_i`` = sigmoid of the **last** ("error") logit of the FENSE error detector
  (``echecker_clotho_audiocaps_base``: a BERT whose ``[CLS]`` vector feeds a 6-way linear layer over
  ``add_tail, repeat_event, repeat_adv, remove_conj, remove_verb, error``); its input is lowercased,
  stripped of every character matching ``[^\\w\\s]`` and padded/truncated to 64 tokens;
* ``fer_i = [p_i > 0.9]`` (0.9 exactly is *not* an error), ``fense_i = sbert_sim_i * (1 - 0.9 fer_i)``,
  ``spider_fl_i = spider_i * (1 - 0.9 fer_i)``; corpus scores are the means over clips.

The original FENSE code scored the echecker batch of a corpus of at most 32 sentences with the whole
(n, 6) probability matrix instead of its "error" column; we use the "error" column always (as aac-metrics
does). As in aac-metrics (the DCASE 2024 evaluation), :func:`captioning.metrics.evaluate_captions` passes
PTB-tokenised text to these metrics; the original FENSE code used raw text.

The models are never substituted. The Sentence-BERT model and the BERT tokenizer/config the echecker names
come from a folder, the local Hugging Face cache or (unless ``HF_HUB_OFFLINE`` is set) the hub; the echecker
checkpoint from a path or the FENSE cache folder. A missing one raises :class:`MetricUnavailableError`
naming it. ``python -m captioning.metrics download --only fense`` fetches all three (the echecker
sha256-checked) on a machine with internet access.

Environment variables: ``CAPTION_METRICS_SBERT`` (Sentence-BERT name or folder),
``CAPTION_METRICS_ECHECKER`` (echecker ``.ckpt`` path or name), ``CAPTION_METRICS_ECHECKER_BERT`` (folder or
name of the echecker's tokenizer/config; default: the ``model_type`` stored in the checkpoint),
``CAPTION_METRICS_FENSE_DIR`` (where named echeckers live; default ``$FENSE_DATA`` or
``~/.cache/torch/hub/fense_data``, the folder FENSE and aac-metrics use).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from m2dclap.clap import load_local_first

from .errors import DOWNLOAD_COMMAND as BASE_DOWNLOAD_COMMAND
from .errors import MetricUnavailableError

log = logging.getLogger(__name__)

__all__ = [
    "SBERT_MODEL",
    "DEFAULT_ECHECKER",
    "ECHECKERS",
    "ERROR_NAMES",
    "ERROR_THRESHOLD",
    "PENALTY",
    "ErrorDetector",
    "FenseScorer",
    "MetricUnavailableError",
    "penalise",
    "echecker_text",
    "load_echecker",
    "load_sbert",
]

SBERT_MODEL = "sentence-transformers/paraphrase-TinyBERT-L6-v2"
DEFAULT_ECHECKER = "echecker_clotho_audiocaps_base"
_RELEASE = "https://github.com/blmoistawinde/fense/releases/download/V0.1"
# name -> (url, sha256), as published by the FENSE authors
ECHECKERS = {
    "echecker_clotho_audiocaps_base": (
        f"{_RELEASE}/echecker_clotho_audiocaps_base.ckpt",
        "1a719f090af70614bbdb9f9437530b7e133c48cfa4a58d964de0d47fc974a2fa",
    ),
    "echecker_clotho_audiocaps_tiny": (
        f"{_RELEASE}/echecker_clotho_audiocaps_tiny.ckpt",
        "90ed0ac5033ec497ec66d4f68588053813e085671136dae312097c96c504f673",
    ),
}
ERROR_NAMES = ("add_tail", "repeat_event", "repeat_adv", "remove_conj", "remove_verb", "error")
ERROR_THRESHOLD = 0.9
PENALTY = 0.9
MAX_TOKENS = 64
DOWNLOAD_COMMAND = BASE_DOWNLOAD_COMMAND + " --only fense"


# ------------------------------------------------------------------------------------------- the maths
def penalise(scores, error_probs, threshold: float = ERROR_THRESHOLD, penalty: float = PENALTY) -> np.ndarray:
    """``score * (1 - penalty * [p > threshold])``: FENSE from SBERT similarity, SPIDEr-FL from SPIDEr."""
    scores = np.asarray(scores, dtype=np.float64)
    has_error = (np.asarray(error_probs, dtype=np.float64) > threshold).astype(np.float64)
    return scores * (1.0 - penalty * has_error)


def echecker_text(sentences: Sequence[str]) -> list[str]:
    """The echecker's input normalisation: drop every ``[^\\w\\s]`` character, lowercase."""
    return [re.sub(r"[^\w\s]", "", s).lower() for s in sentences]


# ----------------------------------------------------------------------------------- error detector
class ErrorDetector(nn.Module):
    """FENSE's ``BERTFlatClassifier``: BERT ``[CLS]`` -> dropout -> Linear(hidden, num_classes).

    Parameter names match the published checkpoints (``encoder.*``, ``clf.*``). The BERT is built from its
    configuration; the checkpoint holds all of its weights, so no pretrained BERT weights are needed.
    """

    def __init__(self, config, num_classes: int = len(ERROR_NAMES), model_type: str = "bert-base-uncased"):
        super().__init__()
        from transformers import AutoModel

        self.model_type = model_type
        self.num_classes = num_classes
        self.encoder = AutoModel.from_config(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.clf = nn.Linear(config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, L, H)
        return self.clf(self.dropout(hidden[:, 0]))  # (B, num_classes)


def fense_dir() -> Path:
    env = os.environ.get("CAPTION_METRICS_FENSE_DIR") or os.environ.get("FENSE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "torch" / "hub" / "fense_data"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_echecker(name_or_path: str | os.PathLike | None = None) -> Path:
    """The echecker file for a published name (looked up in :func:`fense_dir`) or a path."""
    src = str(name_or_path or os.environ.get("CAPTION_METRICS_ECHECKER") or DEFAULT_ECHECKER)
    path = fense_dir() / f"{src}.ckpt" if src in ECHECKERS else Path(src)
    if not path.is_file():
        raise MetricUnavailableError(
            f"FENSE/FER/SPIDEr-FL need the error-detector checkpoint {path}, which is missing. Run "
            f"`{DOWNLOAD_COMMAND}` on a machine with internet access (or copy the published "
            f"{DEFAULT_ECHECKER}.ckpt there, or pass its path / set $CAPTION_METRICS_ECHECKER)"
        )
    return path


def _hf_load(load, source: str, what: str, **kwargs):
    """``load(source)`` (a ``from_pretrained`` or ``SentenceTransformer``) through
    :func:`m2dclap.clap.load_local_first`: a folder or the local Hugging Face cache first, then the hub unless
    ``HF_HUB_OFFLINE`` is set or it cannot be reached. A failure is a MetricUnavailableError naming the model."""
    try:
        return load_local_first(load, source, **kwargs)
    except (OSError, ValueError) as error:
        raise MetricUnavailableError(
            f"{what} {source!r} is not available ({type(error).__name__}: {str(error).splitlines()[0][:160]}). "
            f"Run `{DOWNLOAD_COMMAND}` on a machine with internet access, or pass a folder holding it"
        ) from error


def load_echecker(
    name_or_path: str | os.PathLike | None = None,
    bert: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[ErrorDetector, object]:
    """(detector, tokenizer) from a published echecker (name or ``.ckpt`` path).

    The checkpoint is ``{"model_type", "num_classes", "state_dict"}``, read with ``weights_only=True``; a
    published file is checked against its sha256. ``bert`` (default: ``$CAPTION_METRICS_ECHECKER_BERT`` or
    the checkpoint's ``model_type``) supplies the tokenizer and the BERT configuration.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_echecker(name_or_path)
    known = {Path(u).name: sha for u, sha in ECHECKERS.values()}
    if path.name in known and sha256_of(path) != known[path.name]:
        raise ValueError(f"{path}: sha256 differs from the published {path.name} (corrupt or partial download?)")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means "not an echecker file"
        raise ValueError(f"{path}: not a readable FENSE error-detector checkpoint ({exc})") from exc
    if not isinstance(states, dict) or not {"model_type", "num_classes", "state_dict"} <= set(states):
        keys = sorted(states)[:8] if isinstance(states, dict) else type(states).__name__
        raise ValueError(
            f"{path}: not a FENSE error-detector checkpoint (expected keys model_type, num_classes, "
            f"state_dict; found {keys})"
        )
    source = str(bert or os.environ.get("CAPTION_METRICS_ECHECKER_BERT") or states["model_type"])
    config = _hf_load(AutoConfig.from_pretrained, source, "the echecker's BERT configuration")
    tokenizer = _hf_load(AutoTokenizer.from_pretrained, source, "the echecker's tokenizer")
    model = ErrorDetector(config, int(states["num_classes"]), str(states["model_type"]))
    state = dict(states["state_dict"])
    state.pop("encoder.embeddings.position_ids", None)  # a buffer in transformers < 4.31, not a weight
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path}: does not fit a {source} error detector: {str(exc)[:300]}") from None
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not fit a {source} error detector (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval().to(device), tokenizer


def load_sbert(name_or_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The Sentence-BERT model (default ``paraphrase-TinyBERT-L6-v2``): a folder, the local cache, or the hub
    unless ``HF_HUB_OFFLINE`` is set."""
    from sentence_transformers import SentenceTransformer

    source = str(name_or_path or os.environ.get("CAPTION_METRICS_SBERT") or SBERT_MODEL)
    return _hf_load(SentenceTransformer, source, "the Sentence-BERT model", device=str(device))


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class FenseScorer:
    """Sentence-BERT + error detector; computes SBERT-sim, FER, FENSE and the SPIDEr-FL penalty."""

    sbert: object
    echecker: ErrorDetector
    tokenizer: object
    batch_size: int = 32
    threshold: float = ERROR_THRESHOLD
    penalty: float = PENALTY
    models: dict = field(default_factory=dict)  # what was loaded, for the result metadata

    @classmethod
    def load(
        cls,
        sbert: str | None = None,
        echecker: str | None = None,
        echecker_bert: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> "FenseScorer":
        det, tok = load_echecker(echecker, echecker_bert, device)
        model = load_sbert(sbert, device)
        names = {
            "sbert": str(sbert or os.environ.get("CAPTION_METRICS_SBERT") or SBERT_MODEL),
            "echecker": str(resolve_echecker(echecker)),
            "echecker_bert": str(echecker_bert or os.environ.get("CAPTION_METRICS_ECHECKER_BERT") or det.model_type),
        }
        return cls(model, det, tok, batch_size, models=names)

    @torch.no_grad()
    def error_probs(self, sentences: Sequence[str]) -> np.ndarray:
        """(n, 6) sigmoid outputs of the echecker, columns in :data:`ERROR_NAMES` order."""
        device = next(self.echecker.parameters()).device
        out = []
        for i in range(0, len(sentences), self.batch_size):
            batch = self.tokenizer(
                echecker_text(sentences[i : i + self.batch_size]),
                truncation=True,
                padding="max_length",
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            batch = {
                k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            out.append(self.echecker(**batch).float().sigmoid().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.echecker.num_classes))

    @torch.no_grad()
    def similarity(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """Mean cosine similarity of each candidate with its references (normalised SBERT embeddings)."""
        flat = [r for refs in references for r in refs]
        enc = dict(
            convert_to_tensor=True, normalize_embeddings=True, batch_size=self.batch_size, show_progress_bar=False
        )
        cand = self.sbert.encode(list(candidates), **enc).float()  # (n, D)
        ref = self.sbert.encode(flat, **enc).float()  # (sum M_i, D)
        owner = torch.repeat_interleave(
            torch.arange(len(references), device=ref.device),
            torch.tensor([len(r) for r in references], device=ref.device),
        )
        cos = (cand[owner] * ref).sum(-1)  # (sum M_i,) each reference against its own candidate
        total = torch.zeros(len(references), device=ref.device).index_add_(0, owner, cos)
        counts = torch.bincount(owner, minlength=len(references)).float()
        return (total / counts).double().cpu().numpy()

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
        """Per-clip ``sbert_sim``, ``error_prob``, ``fer`` (0/1) and ``fense``."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        empty = [i for i, refs in enumerate(references) if not refs]
        if empty:
            raise ValueError(f"candidate(s) {empty[:10]} have no references")
        sim = self.similarity(candidates, references)
        p = self.error_probs(candidates)[:, -1]  # the "error" head
        return {
            "sbert_sim": sim,
            "error_prob": p,
            "fer": (p > self.threshold).astype(np.float64),
            "fense": penalise(sim, p, self.threshold, self.penalty),
        }
