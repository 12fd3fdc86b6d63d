"""Zero-shot audio classification with a CLAP model's text embeddings of class prompts.

    clf = ZeroShotClassifier.from_labels(model, ["dog", "rain", "siren"])  # "dog can be heard", ...
    probs = clf.predict(waves)                       # (B, 3), rows sum to 1
    out = clf.predict_files(paths)                   # batched, progress bar, skipped files in out.failed

Scores follow EVAR's zero-shot evaluation (the code behind the paper's Table VII): the plain cosine
similarity between the CLAP audio embedding and each class's text embedding, then a softmax over classes
(single-label) or an element-wise sigmoid (multi-label). No logit scale is applied by default, so softmax
probabilities are close to uniform; ``scale`` multiplies the cosines first (``scale=100`` gives CLIP-like,
peaked probabilities). The scale changes neither the argmax nor any per-class ranking, hence neither accuracy
nor mAP. The class text embeddings are computed once, when the classifier is built, and reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import torch

from m2dclap.embed_files import AudioBatches, min_samples_of
from m2dclap.eval_features import fit_to_unit

from .templates import Template, as_template_list, encode_prompts, make_prompts

log = logging.getLogger(__name__)


@dataclass
class FilePredictions:
    """Predictions for a list of files; unreadable files are left out and listed in ``failed``."""

    paths: list[Path]  # the files that were read, in input order
    indices: list[int]  # their positions in the input list
    probabilities: torch.Tensor  # (N, C) softmax or sigmoid scores
    similarities: torch.Tensor  # (N, C) cosine similarities
    audio_embeddings: torch.Tensor  # (N, D) L2-normalised CLAP audio embeddings
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (file, why) of the skipped files


def fit_from_start(index: int, wave: torch.Tensor, unit: int) -> torch.Tensor:
    """EVAR's test-time input: the first ``unit`` samples of a longer clip, zeros appended to a shorter one
    (:func:`m2dclap.eval_features.fit_to_unit` without a random crop, as the linear evaluation's test clips;
    an :class:`m2dclap.embed_files.AudioBatches` transform, ``index`` unused)."""
    return fit_to_unit(wave, unit, None)


class ZeroShotClassifier:
    """Scores audio against fixed classes through cached, L2-normalised class text embeddings (C, D).

    Args:
        model: a CLAP model (``m2dclap.load(...)``) with ``encode_audio``/``encode_text``/``sample_rate``.
        classes: the class labels, in score-column order.
        prompts: ``prompts[c]`` are the prompts of class ``c`` (one per template).
        text_embeddings: (C, D) class embeddings (normalised mean over the class's prompts).
        multi_label: sigmoid per class instead of a softmax over classes.
        scale: multiplies the cosine similarities before the softmax/sigmoid (1.0 = EVAR).
    """

    def __init__(
        self,
        model,
        classes: Sequence[str],
        prompts: Sequence[Sequence[str]],
        text_embeddings: torch.Tensor,
        multi_label: bool = False,
        scale: float = 1.0,
    ):
        if len(classes) != text_embeddings.shape[0] or len(prompts) != len(classes):
            raise ValueError(
                f"{len(classes)} classes, {len(prompts)} prompt lists and "
                f"{text_embeddings.shape[0]} text embeddings must agree"
            )
        if len(set(classes)) != len(classes):
            raise ValueError("duplicate class labels")
        self.model = model
        self.classes = list(classes)
        self.prompts = [list(p) for p in prompts]
        self.text_embeddings = torch.nn.functional.normalize(text_embeddings.detach().float().cpu(), dim=-1)
        self.multi_label = multi_label
        self.scale = float(scale)

    @classmethod
    def from_labels(
        cls,
        model,
        labels: Sequence[str],
        template: Template | None = None,
        multi_label: bool = False,
        names: Mapping[str, str] | None = None,
        scale: float = 1.0,
    ) -> "ZeroShotClassifier":
        """Build the classifier for ``labels``.

        ``template``: a rule name of :mod:`zeroshot.templates` (``"esc50"``, ``"gtzan"``, ``"cremad"``...),
        a format string (``"the sound of {label}"``), or a list of them for a prompt ensemble; by default
        ``"{label} can be heard"`` (the ESC-50/US8K rule). ``names`` maps labels to display text (AudioSet
        MIDs). The text embeddings are computed here, once.
        """
        labels = [str(lab) for lab in labels]
        if not labels:
            raise ValueError("no labels given")
        prompts = make_prompts(labels, as_template_list(template), names)
        log.info("zero-shot prompts: %s%s", [p[0] for p in prompts[:3]], " ..." if len(prompts) > 3 else "")
        return cls(model, labels, prompts, encode_prompts(model, prompts), multi_label, scale)

    @classmethod
    def from_dataset(cls, model, dataset, template: Template | None = None, scale: float = 1.0) -> "ZeroShotClassifier":
        """The classifier of a :class:`zeroshot.datasets.ZeroShotDataset`: its classes, its rule (unless
        ``template`` is given), its display names and its single/multi-label mode."""
        return cls.from_labels(
            model,
            dataset.classes,
            template if template else dataset.rule,
            dataset.multi_label,
            dataset.label_names,
            scale,
        )

    # -- scoring ---------------------------------------------------------------------------------------
    def scores(self, audio_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLAP audio embeddings (B, D) -> (probabilities (B, C), cosine similarities (B, C))."""
        a = torch.nn.functional.normalize(audio_embeddings.detach().float().cpu(), dim=-1)
        sim = a @ self.text_embeddings.T  # (B, D) @ (D, C) -> (B, C)
        logits = self.scale * sim
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return probs, sim

    def embed(self, audio, sample_rate: int | None = None, batch_size: int = 32) -> torch.Tensor:
        """Waveform(s) -> normalised CLAP audio embeddings (B, D)."""
        return self.model.encode_audio(
            audio, sample_rate or self.model.sample_rate, normalize=True, batch_size=batch_size
        )

    def predict(self, audio, sample_rate: int | None = None, batch_size: int = 32) -> torch.Tensor:
        """Probabilities (B, C) for a waveform (T,), a batch (B, T) or a list of waveforms of any lengths
        (tensors or arrays) at ``sample_rate`` (default: the model's rate)."""
        return self.scores(self.embed(audio, sample_rate, batch_size))[0]

    def predict_files(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 32,
        progress: bool = True,
        workers: int | None = 2,
        unit_samples: int | None = None,
    ) -> FilePredictions:
        """Read, embed and score audio files in batches (:class:`m2dclap.embed_files.AudioBatches`: files of
        the next batches are read by ``workers`` processes while one is encoded). ``unit_samples``: cut each
        clip to this length from its start, or pad it with zeros (:func:`fit_from_start`, EVAR's test-time
        rule); None encodes whole clips. Files that cannot be used (undecodable, empty, NaN/Inf, shorter than
        the frontend's window) are logged, skipped and returned in ``failed``."""
        paths = [Path(p) for p in paths]
        model = self.model
        transform = partial(fit_from_start, unit=int(unit_samples)) if unit_samples else None
        emb = torch.full((len(paths), model.cfg.encoder.embed_dim), float("nan"))
        skipped: list[tuple[int, str]] = []
        batches = AudioBatches(
            paths,
            model.sample_rate,
            min_samples_of(model),
            batch_size,
            workers,
            transform=transform,
            progress=progress,
            desc="zero-shot: embedding audio",
        )
        for batch in batches:
            skipped += batch.skipped
            if batch.waves:
                out = model.encode_audio(batch.waves, model.sample_rate, normalize=True, batch_size=batch_size)
                emb[batch.indices] = out.float().cpu()
        failed = [(paths[i], reason) for i, reason in skipped]
        bad = {i for i, _ in skipped}
        kept = [i for i in range(len(paths)) if i not in bad]
        emb = emb[kept]
        probs, sim = self.scores(emb)
        return FilePredictions([paths[i] for i in kept], kept, probs, sim, emb, failed)

    def top_k(self, probabilities: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
        """The ``k`` best classes of each row as (label, probability)."""
        k = max(1, min(k, len(self.classes)))
        values, index = probabilities.topk(k, dim=-1)
        return [[(self.classes[int(j)], float(v)) for v, j in zip(vs, js)] for vs, js in zip(values, index)]
