"""Audio loading and the log-mel frontend of the official M2D runtime.

The official code computes the spectrogram with nnAudio (conv1d STFT, librosa-0.7 Slaney filterbank).
We compute the same quantity with ``torch.stft`` and a bit-identical copy of that filterbank. The FFT
runs in float64: a float32 FFT's rounding error scales with the loudest bin of a frame, so mel bins far
below it (the valleys beside a pure sweep) came out up to 1.5e-3 off in log-mel under MKL's AVX-512
kernels, twice nnAudio's own float32 error. In float64 the result is float32-exact on every kernel path
(``tests/test_audio.py`` measures it against a float64 reference) and still faster than nnAudio
(``bench/encoder.py``).
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
        raise AudioError(
            f"{path}: cannot decode audio ({first_line(e)}); the file is corrupt, truncated or of an unknown format"
        ) from None
    _check_not_truncated(path, data.shape[0])
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))  # (T, C) -> (T,)
    check_waveform(wave, str(path))
    if sample_rate is not None and sr != sample_rate:
        wave = resample(wave, sr, sample_rate)
    return wave


def _check_not_truncated(path: Path, frames_read: int) -> None:
    """Raise if a WAV header declares more frames than were read.

    libsndfile quietly shortens a truncated WAV to the bytes present (``sf.info`` reports the shortened
    length too), so the declared size of the ``data`` chunk is read from the RIFF header itself.
    """
    declared = _wav_declared_frames(path)
    if declared is not None and declared > frames_read:
        raise AudioError(
            f"{path}: truncated file: the WAV header declares {declared} frames but only {frames_read} are present"
        )


def _wav_declared_frames(path: Path) -> int | None:
    """Frames announced by a RIFF/WAVE file's ``data`` chunk; None if not a plain WAV or size unknown."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None  # RF64, W64, FLAC, OGG ...: libsndfile checks these itself
        block_align = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"fmt ":
                fmt = f.read(size)
                if len(fmt) >= 14:
                    block_align = int.from_bytes(fmt[12:14], "little")
                f.seek(size - len(fmt) + (size & 1), 1)
            elif cid == b"data":
                # Streaming writers leave a placeholder (0, 0x7FFFFFFF, 0xFFFFFFFF) when the length is unknown.
                if not block_align or size in (0, 0x7FFFFFFF, 0xFFFFFFFF):
                    return None
                return size // block_align
            else:
                f.seek(size + (size & 1), 1)  # chunks are padded to an even size


def check_waveform(wave: torch.Tensor, where: str = "waveform") -> None:
    """Reject empty or non-finite audio with an error that says where."""
    if wave.numel() == 0 or wave.shape[-1] == 0:
        raise AudioError(f"{where}: contains zero samples")
    finite = torch.isfinite(wave)
    if not finite.all():
        n_nan = int(torch.isnan(wave).sum())
        n_inf = int(torch.isinf(wave).sum())
        first = (~finite).flatten().nonzero()[0, 0].item() % wave.shape[-1]
        raise AudioError(
            f"{where}: {n_nan + n_inf} non-finite sample(s) (NaN: {n_nan}, Inf: {n_inf}), "
            f"first NaN/Inf at sample {first}"
        )


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling (torchaudio's windowed sinc)."""
    import torchaudio.functional as AF

    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    return AF.resample(wave, int(orig_sr) // g, int(new_sr) // g)


def first_line(e: Exception) -> str:
    """The first line of an exception's message (its type name when empty), for one-line error reports."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's Auditory-Toolbox mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    return np.where(
        hz >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep, hz / f_sp
    )


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32 triangular filters with Slaney area normalisation.

    The arithmetic follows librosa 0.7's ``filters.mel`` as vendored by nnAudio (the official frontend),
    including its float32 rounding points: triangles are computed in float64, stored as float32, then
    scaled by ``2 / (f[i+2] - f[i])`` in float64 and stored as float32 again. torchaudio's
    ``melscale_fbanks`` builds the grid in float32 and differs by up to ~2e-4 in the log-mel.
    """
    fft_freqs = np.linspace(0, float(sample_rate) / 2, n_fft // 2 + 1, endpoint=True)
    mel_pts = np.linspace(_hz_to_slaney_mel(f_min), _hz_to_slaney_mel(f_max), n_mels + 2)
    mel_f = _slaney_mel_to_hz(mel_pts)  # (n_mels + 2,) band edges in Hz
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)  # (n_mels + 2, n_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2:] - mel_f[:-2])
    return (weights * enorm[:, None]).astype(np.float32)


class LogMelSpectrogram(nn.Module):
    """Waveform (B, T) -> log-mel (B, n_mels, frames), exactly the official frontend.

    STFT with a periodic Hann window, centred reflect padding of n_fft // 2, power 2, Slaney mel scale with
    Slaney area normalisation, natural log of (x + float32 eps). No statistics are applied here.
    """

    def __init__(self, cfg: FrontendCfg):
        super().__init__()
        self.cfg = cfg
        window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
        if cfg.win_length < cfg.n_fft:  # centre the window in the FFT frame, as torch.stft does
            left = (cfg.n_fft - cfg.win_length) // 2
            window = F.pad(window, (left, cfg.n_fft - cfg.win_length - left))
        fb = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        # Buffers are derived from the config, so they are not saved in checkpoints. The window stays
        # float64 (the FFT's precision); M2DCLAP._apply keeps the frontend's buffers out of dtype casts.
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_fb", torch.from_numpy(fb), persistent=False)  # (n_mels, n_freqs)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        squeeze = wave.dim() == 1
        wave = wave.unsqueeze(0) if squeeze else wave  # (T,) -> (1, T)
        wave = wave.float()
        need = self.cfg.min_samples
        if wave.shape[-1] < need:
            raise AudioError(
                f"waveform of {wave.shape[-1]} samples is too short for the log-mel frontend: "
                f"it needs at least {need} ({need / self.cfg.sample_rate * 1e3:.1f} ms)"
            )
        # float64 FFT (module docstring); MPS has no float64, so there it is float32 (nnAudio-level accuracy).
        fft_dtype = torch.float32 if wave.device.type == "mps" else torch.float64
        half = self.cfg.n_fft // 2
        with torch.autocast(wave.device.type, enabled=False):  # bf16 would lose the quiet bins
            # torch.stft's framing by hand: its float64 path was up to 1.5x slower than rfft on strided frames.
            padded = F.pad(wave.to(fft_dtype)[:, None], (half, half), mode="reflect")[:, 0]  # (B, T + n_fft)
            frames = padded.unfold(-1, self.cfg.n_fft, self.cfg.hop_length)  # (B, frames, n_fft), a view
            spec = torch.view_as_real(torch.fft.rfft(frames * self.window.to(fft_dtype)))  # (B, frames, n_freqs, 2)
            # Rounding the exact spectrum to float32 costs 6e-8 relative; the power and the mel sum of
            # positive terms below add no more than float32 rounding either.
            spec = spec.float()
            power = spec[..., 0].square() + spec[..., 1].square()  # (B, frames, n_freqs)
            mel = torch.matmul(self.mel_fb, power.transpose(1, 2))  # (n_mels, n_freqs) @ (B, n_freqs, frames)
            lms = (mel + LOG_EPS).log()
        return lms[0] if squeeze else lms

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples (centred STFT)."""
        return num_samples // self.cfg.hop_length + 1


def normalize_lms(lms: torch.Tensor, norm_stats: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Scalar standardisation ``(lms - mean) / std`` with the checkpoint's statistics."""
    if isinstance(norm_stats, torch.Tensor):  # stays on the device: no host sync per batch on a GPU
        stats = norm_stats.to(lms.device, lms.dtype)
        return (lms - stats[0]) / stats[1]
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
