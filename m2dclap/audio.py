"""Audio loading and the log-mel frontend of the official M2D runtime.

The official code computes the spectrogram with nnAudio (conv1d STFT, librosa-0.7 Slaney filterbank).
We compute the same quantity with ``torch.stft`` and torchaudio's Slaney filterbank, which matches it
to float rounding (``tests/test_audio.py`` measures the difference) and runs faster.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FrontendCfg

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus")
LOG_EPS = torch.finfo(torch.float32).eps  # the official (x + eps).log(), float32 eps = 1.1920929e-07


class AudioError(ValueError):
    """An audio file or array that cannot be used; the message names the file and the problem."""


def load_audio(path: str | Path, sample_rate: int | None = None) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform (T,), resampled to ``sample_rate`` if given.

    Works for wav/flac/ogg (and whatever else libsndfile reads), any channel count, integer or float
    samples. Raises :class:`AudioError` naming the file for missing, unreadable, truncated or empty
    files and for NaN/Inf samples.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C), ints scaled to [-1, 1)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: cannot decode audio ({_first_line(e)}); "
                         "the file is corrupt, truncated or of an unknown format") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: contains zero samples")
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))  # (T, C) -> (T,)
    check_waveform(wave, str(path))
    if sample_rate is not None and sr != sample_rate:
        wave = resample(wave, sr, sample_rate)
    return wave


def check_waveform(wave: torch.Tensor, where: str = "waveform") -> None:
    """Reject empty or non-finite audio with an error that says where."""
    if wave.numel() == 0 or wave.shape[-1] == 0:
        raise AudioError(f"{where}: contains zero samples")
    if not torch.isfinite(wave).all():
        bad = (~torch.isfinite(wave)).nonzero()
        first = bad[0, -1].item()
        raise AudioError(f"{where}: {len(bad)} NaN/Inf sample(s), first at sample {first}")


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling (torchaudio's windowed sinc)."""
    import torchaudio.functional as AF

    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    return AF.resample(wave, int(orig_sr) // g, int(new_sr) // g)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class LogMelSpectrogram(nn.Module):
    """Waveform (B, T) -> log-mel (B, n_mels, frames), exactly the official frontend.

    STFT with a periodic Hann window, centred reflect padding of n_fft // 2, power 2, Slaney mel scale with
    Slaney area normalisation, natural log of (x + float32 eps). No statistics are applied here.
    """

    def __init__(self, cfg: FrontendCfg):
        super().__init__()
        import torchaudio.functional as AF

        self.cfg = cfg
        window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
        if cfg.win_length < cfg.n_fft:  # centre the window in the FFT frame, as torch.stft does
            left = (cfg.n_fft - cfg.win_length) // 2
            window = F.pad(window, (left, cfg.n_fft - cfg.win_length - left))
        fb = AF.melscale_fbanks(cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate,
                                norm="slaney", mel_scale="slaney")  # (n_freqs, n_mels)
        # Buffers are derived from the config, so they are not saved in checkpoints.
        self.register_buffer("window", window.float(), persistent=False)
        self.register_buffer("mel_fb", fb.T.contiguous().float(), persistent=False)  # (n_mels, n_freqs)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        squeeze = wave.dim() == 1
        wave = wave.unsqueeze(0) if squeeze else wave  # (T,) -> (1, T)
        wave = wave.float()
        spec = torch.stft(wave, self.cfg.n_fft, hop_length=self.cfg.hop_length, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)  # (B, n_freqs, frames)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.mel_fb, power)  # (n_mels, n_freqs) @ (B, n_freqs, frames)
        lms = (mel + LOG_EPS).log()
        return lms[0] if squeeze else lms

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples (centred STFT)."""
        return num_samples // self.cfg.hop_length + 1


def normalize_lms(lms: torch.Tensor, norm_stats: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Scalar standardisation ``(lms - mean) / std`` with the checkpoint's statistics."""
    mean, std = (float(v) for v in norm_stats)
    return (lms - mean) / std


def compute_norm_stats(lms_list: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Global mean and std over a set of log-mel spectrograms (the official runtime uses 5000 crops)."""
    total, total_sq, count = 0.0, 0.0, 0
    for lms in lms_list:
        x = lms.double()
        total += x.sum().item()
        total_sq += x.square().sum().item()
        count += x.numel()
    if count == 0:
        raise ValueError("compute_norm_stats: no spectrogram values given")
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    return mean, std + torch.finfo(torch.float32).eps
