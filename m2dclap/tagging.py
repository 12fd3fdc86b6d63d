"""Audio tagging with a stage-1.1 (AudioSet fine-tuned) M2D-CLAP: the tagger, its head, saving and loading
a fine-tuned folder, class probabilities. Inference only: importing it never
imports accelerate or the training code.

    model, tagger = load_finetuned("runs/stage1.1/best")
    probs = tag_audio(model, tagger, waves, sample_rate)  # (B, n_classes), names in tagger.classes
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .augment import random_structured_mask, visible_indices
from .encoder import AudioEncoder, clip_features
from .fileio import usual_permissions
from .m2d import take
from .model import M2DCLAP

HEAD_WEIGHTS, HEAD_META = "head.safetensors", "head.json"


class TaggingHead(nn.Module):
    """EVAR's TaskHead: BatchNorm1d(affine=False) on the pooled feature, then a linear classifier."""

    def __init__(self, in_features: int, n_classes: int, init_std: float = 0.01):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False)
        self.fc = nn.Linear(in_features, n_classes)
        nn.init.normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))  # (B, in_features) -> (B, n_classes) logits


class AudioTagger(nn.Module):
    """Audio encoder + tagging head on normalised log-mels (B, 1, F, T) -> logits (B, n_classes).

    Training with ``training_mask > 0`` drops patch rows/columns (structured patchout) and pools the visible
    tokens; otherwise the input goes through the chunked ``encode_lms`` (any length) and is pooled over all
    patches (``tokens``) or as z'' (``frames``, paper Eq. 2 then the mean over time).
    """

    def __init__(
        self,
        encoder: AudioEncoder,
        n_classes: int,
        pooling: str = "tokens",
        training_mask: float = 0.0,
        head_init_std: float = 0.01,
    ):
        super().__init__()
        if pooling not in ("tokens", "frames"):
            raise ValueError(f"pooling must be tokens or frames, got {pooling!r}")
        if pooling == "frames" and training_mask > 0:
            raise ValueError(
                "frame features (Eq. 2) are not defined for a structured mask that drops frequency "
                "rows: use pooling 'tokens' with training_mask > 0 (paper IV-B3)"
            )
        self.encoder = encoder
        self.pooling, self.training_mask = pooling, float(training_mask)
        D, gf = encoder.cfg.embed_dim, encoder.grid_size[0]
        self.head = TaggingHead(D if pooling == "tokens" else gf * D, n_classes, head_init_std)

    def features(self, lms: torch.Tensor) -> torch.Tensor:
        if self.training and self.training_mask > 0:
            tokens, grid = self.encoder.patchify(lms)  # (B, 1, F, T) -> (B, F'*T', D)
            mask = random_structured_mask(tokens.shape[0], grid, self.training_mask, tokens.device)
            tokens = take(tokens, visible_indices(mask))  # (B, F'*T', D) -> (B, n_keep, D)
            return self.encoder.forward_tokens(tokens)[:, 1:].mean(1)  # drop CLS, mean: (B, D)
        z = self.encoder.encode_lms(lms)  # (B, F', T', D)
        return z.flatten(1, 2).mean(1) if self.pooling == "tokens" else clip_features(z)

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(lms))


def save_finetuned(
    model: M2DCLAP, tagger: AudioTagger, classes: Sequence[str], directory: str | Path, **metadata: Any
) -> Path:
    """The whole model with ``save_pretrained`` (CLAP parts as loaded) plus the head and its class names."""
    from safetensors.torch import save_file

    directory = model.save_pretrained(directory, stage="1.1", **metadata)
    state = {k: v.detach().contiguous().cpu() for k, v in tagger.head.state_dict().items()}
    save_file(state, str(Path(directory) / HEAD_WEIGHTS))
    meta = {
        "classes": list(classes),
        "pooling": tagger.pooling,
        "in_features": tagger.head.fc.in_features,
        "input_size": list(model.cfg.encoder.input_size),
    }
    (Path(directory) / HEAD_META).write_text(json.dumps(meta, indent=2))
    usual_permissions(Path(directory) / HEAD_WEIGHTS)  # safetensors writes 0600 files
    return Path(directory)


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[M2DCLAP, AudioTagger]:
    """A stage-1.1 folder -> (the model, its tagger sharing the model's encoder); ``tagger.classes`` names
    the logits."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, load

    path = Path(path)
    if not (path / HEAD_META).exists() or not (path / HEAD_WEIGHTS).exists():
        raise CheckpointError(f"{path}: no {HEAD_META}/{HEAD_WEIGHTS}: not a fine-tuned (stage 1.1) model")
    model = load(path, device, audio_only=True)  # tagging needs no text tower
    meta = json.loads((path / HEAD_META).read_text())
    tagger = AudioTagger(model.encoder, len(meta["classes"]), meta["pooling"])
    tagger.head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
    tagger.classes = list(meta["classes"])
    return model, tagger.to(device).eval()


@torch.no_grad()
def tag_audio(model: M2DCLAP, tagger: AudioTagger, audio: Any, sample_rate: int | None = None) -> torch.Tensor:
    """Class probabilities (B, n_classes) for waveforms of any length (chunked like the official runtime)."""
    tagger.eval()
    probs = [
        torch.sigmoid(tagger(model.log_mel(w).to(model.dtype))).float() for w in model.prepare_audio(audio, sample_rate)
    ]
    return torch.cat(probs)
