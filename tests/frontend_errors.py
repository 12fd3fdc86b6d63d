"""Accuracy of our log-mel frontend against a float64 reference, per test signal; run in-process by
tests/test_audio.py and as a script (``python tests/frontend_errors.py``, prints JSON) in subprocesses with
``MKL_ENABLE_INSTRUCTIONS`` / ``ATEN_CPU_CAPABILITY`` set, which take effect only before torch loads.

The reference is the frontend's definition evaluated in float64 with numpy; "own error" is nnAudio (the
official frontend) in float32 against nnAudio in float64, the accuracy the official runtime itself has.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import torch

from m2dclap.audio import LOG_EPS, LogMelSpectrogram, slaney_mel_filterbank
from m2dclap.config import FrontendCfg

FRONTENDS = {"16k": FrontendCfg(), "p32k": FrontendCfg.p32k()}
SIGNALS = ["noise", "harmonic_vibrato", "chirp", "noise_bursts", "loud_tone", "near_silence", "silence"]
CASES = [(k, 2.0) for k in SIGNALS] + [("chirp", 3.0)]


def make_signal(kind: str, sr: int, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Float32 test waveforms: noise and real-like material (tones, sweeps, bursts, silence)."""
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    if kind == "noise":
        x = 0.1 * rng.standard_normal(n)
    elif kind == "harmonic_vibrato":  # a sung note: 220 Hz, 11 harmonics, 5 Hz vibrato of +-2 %
        phase = 2 * np.pi * np.cumsum(220.0 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / sr
        x = sum(0.3 / k * np.sin(k * phase) for k in range(1, 12))
    elif kind == "chirp":  # exponential sweep 100 Hz -> 0.45 sr
        f = 100.0 * (0.45 * sr / 100.0) ** (t / seconds)
        x = 0.5 * np.sin(2 * np.pi * np.cumsum(f) / sr)
    elif kind == "noise_bursts":  # five Hann-enveloped 200 ms bursts
        env = np.zeros(n)
        for start in rng.uniform(0, seconds - 0.25, 5):
            i, m = int(start * sr), int(0.2 * sr)
            env[i : i + m] += np.hanning(m)
        x = 0.3 * env * rng.standard_normal(n)
    elif kind == "loud_tone":
        x = 0.99 * np.sin(2 * np.pi * 1000 * t)
    elif kind == "near_silence":
        x = 1e-5 * rng.standard_normal(n)
    elif kind == "silence":
        x = np.zeros(n)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def nnaudio(cfg: FrontendCfg):
    from nnAudio.features import MelSpectrogram

    return MelSpectrogram(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        win_length=cfg.win_length,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        center=True,
        power=2,
        verbose=False,
    )


def reference_logmel(wave: np.ndarray, cfg: FrontendCfg) -> np.ndarray:
    """The frontend's definition evaluated in float64 with numpy alone: centred reflect-padded frames,
    periodic Hann window, power spectrum, the (float32-valued) Slaney filterbank, log(x + eps)."""
    x = np.pad(wave.astype(np.float64), cfg.n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft)[:: cfg.hop_length]  # (frames, n_fft)
    n = np.arange(cfg.win_length)
    window = np.zeros(cfg.n_fft)
    left = (cfg.n_fft - cfg.win_length) // 2
    window[left : left + cfg.win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.win_length)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (frames, n_freqs)
    fb = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max).astype(np.float64)
    return np.log(fb @ power.T + float(LOG_EPS))  # (n_mels, frames)


def errors(name: str, kind: str, seconds: float, modules: tuple | None = None) -> dict:
    """max |log-mel| differences for one signal. "ours": our float32 frontend against the numpy float64
    reference; "ours_vs_nnaudio64": against nnAudio run in float64 (its DFT kernels are float32 values, so
    that reference carries their rounding); "own": nnAudio float32 against nnAudio float64, the accuracy
    of the official runtime; "vs_nnaudio": ours against the official float32 features."""
    cfg = FRONTENDS[name]
    ref, ref64, ours = modules or frontend_modules(cfg)
    signal = make_signal(kind, cfg.sample_rate, seconds)
    wave = torch.from_numpy(signal)[None]  # (1, T)
    with torch.no_grad():
        got = ours(wave)
        official = (ref(wave) + LOG_EPS).log()
        official64 = (ref64(wave.double()) + LOG_EPS).log()
    exact = torch.from_numpy(reference_logmel(signal, cfg))[None]
    return {
        "ours": (got.double() - exact).abs().max().item(),
        "ours_vs_nnaudio64": (got.double() - official64).abs().max().item(),
        "own": (official.double() - official64).abs().max().item(),
        "vs_nnaudio": (got - official).abs().max().item(),
        "shape_ok": got.shape == official.shape == exact.shape and got.dtype == torch.float32,
    }


def frontend_modules(cfg: FrontendCfg):
    ref = nnaudio(cfg)
    return ref, copy.deepcopy(ref).double(), LogMelSpectrogram(cfg)  # .double() is in place


def bound(own_error: float) -> float:
    """The accuracy asked of our frontend: 1e-3, or 1.5x the official frontend's own float32 error."""
    return max(1e-3, 1.5 * own_error)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": []}
    for name, cfg in FRONTENDS.items():
        modules = frontend_modules(cfg)
        out["cases"] += [{"frontend": name, "kind": k, "seconds": s, **errors(name, k, s, modules)} for k, s in CASES]
    json.dump(out, sys.stdout)
