"""M2DCLAP: the inference model every consumer uses.

audio (any length, any rate) -> log-mel -> normalise -> chunked ViT -> patch features z
z -> frame features z' (Eq. 2) and clip features z'' (mean over time)
z -> audio projector -> CLAP audio feature s_a;   text -> text tower -> text_proj -> s_t
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import AudioError, LogMelSpectrogram, check_waveform, normalize_lms, resample
from .clap import build_projector, build_text_encoder
from .config import ModelCfg
from .encoder import AudioEncoder, frame_features
from .saving import save_pretrained

log = logging.getLogger(__name__)

AudioInput = Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray]]]


class M2DCLAP(nn.Module):
    """An M2D-CLAP model (or an M2D encoder alone when the text tower is ``none``).

    Args:
        cfg: the model config (``m2dclap.get_model_config('base')`` etc.).
        pretrained_text: load the text encoder's published weights; False when a checkpoint will supply them.
        text_source: folder holding the text tokenizer/config (a saved model's ``text_encoder/``).
    """

    def __init__(self, cfg: ModelCfg, pretrained_text: bool = True, text_source: str | None = None):
        super().__init__()
        self.cfg = cfg.validate()  # a bad field fails here, by name, not as a shape error inside a layer
        D = cfg.encoder.embed_dim
        self.frontend = LogMelSpectrogram(cfg.frontend)
        self.register_buffer("norm_stats", torch.tensor(cfg.frontend.norm_stats, dtype=torch.float32))
        self.encoder = AudioEncoder(cfg.encoder)
        self.audio_proj = build_projector(D, cfg.projector)
        self.text_encoder = build_text_encoder(cfg.text, pretrained_text, text_source)
        has_text = cfg.text.kind != "none"
        self.text_proj = nn.Linear(cfg.text.width, D) if has_text and cfg.text.width != D else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """Casting the model (``.to(torch.bfloat16)``) moves but never casts the frontend buffers and the
        normalisation statistics: bf16 would round (-7.1, 4.2) to (-7.09375, 4.1875)."""
        keep = {
            "norm_stats": self.norm_stats,
            "frontend.window": self.frontend.window,
            "frontend.mel_fb": self.frontend.mel_fb,
        }
        super()._apply(fn, recurse)
        for name, value in keep.items():
            owner, attr = (self.frontend, name.split(".")[1]) if "." in name else (self, name)
            device = getattr(owner, attr).device
            setattr(owner, attr, value.to(device=device))  # own dtypes: float32, the window float64
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.patch_embed.proj.weight.dtype

    @property
    def sample_rate(self) -> int:
        return self.cfg.frontend.sample_rate

    def clamp_logit_scale(self) -> None:
        """Keep 1/tau in [1, max_logit_scale] (the official clip_logit_scale, applied after each step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    def set_trainable(self, audio_encoder: bool = True, audio_proj: bool = True, text: bool = True) -> None:
        """Freeze or unfreeze the towers (stage 2 freezes the audio encoder)."""
        for p in self.encoder.parameters():
            p.requires_grad_(audio_encoder)
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos, never trained
        for p in self.audio_proj.parameters():
            p.requires_grad_(audio_proj)
        for module in (self.text_encoder, self.text_proj):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(text)
        self.logit_scale.requires_grad_(audio_proj or text)

    def no_weight_decay(self) -> set[str]:
        return {"encoder." + n for n in self.encoder.no_weight_decay()} | {"logit_scale", "audio_proj.sem_token"}

    # -- audio -----------------------------------------------------------------------------------------
    def prepare_audio(self, audio: AudioInput, sample_rate: int | None = None) -> list[torch.Tensor]:
        """Waveform(s) -> a list of mono float32 tensors at the model's rate, checked for NaN/Inf/empty.

        Accepts a (T,) or (B, T) tensor/array, or a list of (T,) waveforms of different lengths.
        """
        sr = sample_rate or self.sample_rate
        if isinstance(audio, (torch.Tensor, np.ndarray)):
            wave = torch.as_tensor(audio, dtype=torch.float32)
            if wave.dim() > 2:
                raise AudioError(f"audio of shape {tuple(wave.shape)}: expected (T,) or (B, T) mono waveforms")
            waves = [wave] if wave.dim() == 1 else list(wave)
        else:
            waves = [torch.as_tensor(w, dtype=torch.float32) for w in audio]
        out = []
        for i, w in enumerate(waves):
            if w.dim() != 1:
                raise AudioError(f"audio item {i}: expected a mono (T,) waveform, got shape {tuple(w.shape)}")
            check_waveform(w, f"audio item {i}")
            out.append(resample(w, sr, self.sample_rate) if sr != self.sample_rate else w)
        return out

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T) or (T,) waveform -> normalised log-mel (B, 1, F, frames), computed in float32."""
        wave = wave.to(self.device, torch.float32)
        with torch.autocast(self.device.type, enabled=False):
            lms = self.frontend(wave if wave.dim() == 2 else wave[None])
        return normalize_lms(lms, self.norm_stats).unsqueeze(1)  # (B, F, T) -> (B, 1, F, T)

    def encode_lms(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel (B, 1, F, T), any T -> patch features (B, F', T', D) in float32."""
        return self.encoder.encode_lms(lms.to(self.dtype)).float()

    def _patches(self, audio: AudioInput, sample_rate: int | None) -> list[torch.Tensor]:
        """Patch features (F', T'_i, D) per clip, in input order.

        Equal-length clips share one frontend call; the chunks of all clips, whatever their lengths, are
        grouped by chunk length and encoded together.
        """
        return self._encode_waves(self.prepare_audio(audio, sample_rate))

    def _encode_waves(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Prepared (checked, resampled) waveforms -> patch features per clip."""
        lms: list[torch.Tensor | None] = [None] * len(waves)
        by_len: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            by_len.setdefault(w.shape[0], []).append(i)
        for idx in by_len.values():
            batch = self.log_mel(torch.stack([waves[i] for i in idx])).to(self.dtype)  # (b, 1, F, T)
            for j, i in enumerate(idx):
                lms[i] = batch[j]
        return [z.float() for z in self.encoder.encode_lms_list(lms)]  # type: ignore[arg-type]

    @torch.no_grad()
    def audio_features(self, audio: AudioInput, sample_rate: int | None = None, clap: bool = False) -> dict[str, Any]:
        """Frozen audio features.

        Returns ``clip`` (B, F'*D) (z'' of the paper), ``frame`` (B, T', F'*D) (Eq. 2) and ``patches``
        (B, F', T', D); when the clips differ in length, ``frame`` and ``patches`` are lists.
        ``frame_hop_s`` is the duration of one frame feature (160 ms for 16x16 patches at 16 kHz).
        With ``clap=True`` also ``clap`` (B, D), the CLAP audio embedding, from the same encoder pass.
        """
        patches = self._patches(audio, sample_rate)
        extra = {"clap": self.project_audio(patches)} if clap else {}
        frames = [frame_features(p[None])[0] for p in patches]
        same = len({p.shape for p in patches}) == 1
        hop_s = self.cfg.encoder.patch_size[1] * self.cfg.frontend.hop_length / self.sample_rate
        return {
            "clip": torch.stack([f.mean(0) for f in frames]),
            "frame": torch.stack(frames) if same else frames,
            "patches": torch.stack(patches) if same else patches,
            "frame_hop_s": hop_s,
            **extra,
        }

    def project_audio(self, patches: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch features, one (F', T', D) per clip -> CLAP audio features (B, D) via the audio projector."""
        tokens = [p.flatten(0, 1) for p in patches]  # (F', T', D) -> (F'*T', D): all tokens of all chunks
        lengths = torch.tensor([t.shape[0] for t in tokens])
        padded = nn.utils.rnn.pad_sequence(tokens, batch_first=True).to(self.device, self.dtype)
        key_padding = None
        if (lengths != lengths[0]).any():
            key_padding = torch.arange(padded.shape[1])[None] >= lengths[:, None]  # True = padding
            key_padding = key_padding.to(self.device)
        return self.audio_proj(padded, key_padding).float()

    @torch.no_grad()
    def encode_audio(
        self, audio: AudioInput, sample_rate: int | None = None, normalize: bool = False, batch_size: int = 32
    ) -> torch.Tensor:
        """CLAP audio embeddings s_a (B, D) for waveforms of any length."""
        waves = self.prepare_audio(audio, sample_rate)
        outs = []
        for start in range(0, len(waves), batch_size):
            patches = self._encode_waves(waves[start : start + batch_size])  # already checked once
            outs.append(self.project_audio(patches))
        emb = torch.cat(outs)
        return F.normalize(emb, dim=-1) if normalize else emb

    # -- text ------------------------------------------------------------------------------------------
    def encode_text_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """Pre-computed sentence embeddings (B, width) -> CLAP text features (B, D) through ``text_proj``."""
        return self.text_proj(emb.to(self.device, self.dtype))

    def project_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> CLAP text features s_t (B, D), with gradients (the text side of :meth:`forward`)."""
        if self.text_encoder is None:
            raise RuntimeError("this model has no text encoder (text.kind is 'none'); it is an audio encoder only")
        return self.encode_text_embeddings(self.text_encoder(list(texts)))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | str, normalize: bool = False, batch_size: int = 64) -> torch.Tensor:
        """CLAP text embeddings s_t (B, D) for a list of captions."""
        if isinstance(texts, str):
            texts = [texts]
        outs = [self.project_text(texts[i : i + batch_size]).float() for i in range(0, len(texts), batch_size)]
        emb = torch.cat(outs) if outs else torch.zeros(0, self.cfg.encoder.embed_dim)
        return F.normalize(emb, dim=-1) if normalize else emb

    @staticmethod
    def similarity(audio_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix (A, T) between audio and text embeddings (Eq. 3)."""
        return F.normalize(audio_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T

    def forward(
        self, audio: AudioInput | None = None, texts: Sequence[str] | None = None, sample_rate: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Differentiable forward: ``audio_features`` (B, D), ``text_features`` (B, D), ``logit_scale``."""
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if audio is not None:
            out["audio_features"] = self.project_audio(self._patches(audio, sample_rate))
        if texts is not None:
            out["text_features"] = self.project_text(texts).float()
        return out

    # -- persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, **metadata: Any) -> Path:
        """:func:`m2dclap.save_pretrained` on this model; :func:`m2dclap.load` reads the folder back."""
        return save_pretrained(self, directory, **metadata)
