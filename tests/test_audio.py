"""Audio loading and the log-mel frontend.

Accuracy against a float64 reference (the frontend's definition evaluated in float64 with numpy), 2-s
signals, max |log-mel error|, measured on the 2-core CPU dev machine (``pytest -s tests/test_audio.py``):

    signal             ours 16 kHz / 32 kHz (p32k)   nnAudio float32, the official runtime (16k / 32k)
    noise              4.6e-07 / 3.5e-07             9.4e-06 / 3.0e-06
    harmonic vibrato   5.5e-07 / 5.4e-07             3.2e-05 / 6.0e-05
    chirp              5.8e-07 / 5.9e-07             3.1e-04 / 7.0e-04
    noise bursts       5.7e-07 / 6.2e-07             7.8e-06 / 3.2e-06
    loud 1 kHz tone    5.4e-07 / 5.5e-07             6.3e-06 / 4.4e-05
    near silence       5.3e-07 / 5.3e-07             5.4e-07 / 5.4e-07
    exact silence      4.3e-07 / 4.3e-07             4.3e-07 / 4.3e-07   (log(eps) = -15.942 in float32)

(nnAudio's error is against nnAudio run in float64, its own kernels.) Our FFT runs in float64 (see
``m2dclap.audio``), so what remains is the float32 rounding of the power and the mel sum. The bound is 1e-3,
or 1.5x nnAudio's own float32 error where that is larger; before the float64 FFT, MKL's AVX-512 FFT kernels
put the 32-kHz chirp at 1.5e-3 (nnAudio's own: 7e-4), which failed it.
``test_logmel_accuracy_on_both_mkl_kernel_paths`` checks every signal under MKL's AVX2 and AVX-512 paths.
The mel filterbank is bit-identical to nnAudio's; with torchaudio's ``melscale_fbanks`` (an earlier
implementation) noise differed by 1e-4.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2dclap.audio import (
    AudioError,
    LogMelSpectrogram,
    compute_norm_stats,
    load_audio,
    normalize_lms,
    resample,
    slaney_mel_filterbank,
)
from m2dclap.config import FrontendCfg

from frontend_errors import CASES, FRONTENDS, bound, errors, frontend_modules, make_signal

EPS = torch.finfo(torch.float32).eps
HERE = Path(__file__).parent


# -- accuracy against a float64 reference; parity with the official nnAudio frontend ----------------------
@pytest.fixture(scope="module", params=list(FRONTENDS))
def frontends(request):
    pytest.importorskip("nnAudio.features", reason="nnAudio (the official frontend) is not installed")
    cfg = FRONTENDS[request.param]
    return request.param, cfg, *frontend_modules(cfg)


def test_mel_filterbank_is_nnaudios():
    librosa_functions = pytest.importorskip("nnAudio.librosa_functions", reason="nnAudio is not installed")
    for cfg in FRONTENDS.values():
        ref = librosa_functions.get_mel(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max, htk=False, norm=1)
        ours = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        assert ours.dtype == np.float32 and ours.shape == (cfg.n_mels, cfg.n_fft // 2 + 1)
        np.testing.assert_array_equal(ours, ref)
        assert torch.equal(LogMelSpectrogram(cfg).mel_fb, torch.from_numpy(ref))


@pytest.mark.parametrize("kind, seconds", CASES)
def test_logmel_accuracy(frontends, kind, seconds):
    name, cfg, ref, ref64, ours = frontends
    e = errors(name, kind, seconds, (ref, ref64, ours))
    wave = torch.from_numpy(make_signal(kind, cfg.sample_rate, seconds))
    print(
        f"\n[{name} {kind} {seconds:g} s] max |ours - fp64| = {e['ours']:.2e} (vs nnAudio fp64 "
        f"{e['ours_vs_nnaudio64']:.2e}); nnAudio fp32 vs fp64 = {e['own']:.2e}; ours vs nnAudio fp32 = "
        f"{e['vs_nnaudio']:.2e}"
    )
    assert e["shape_ok"] and ours.num_frames(wave.shape[-1]) == wave.shape[-1] // cfg.hop_length + 1
    assert e["ours"] < bound(e["own"]) and e["ours_vs_nnaudio64"] < bound(e["own"])
    assert e["ours"] < 1e-5  # float32-exact: a float32 FFT was up to 1.5e-3 off (chirps, MKL's AVX-512 kernels)
    assert e["vs_nnaudio"] < bound(e["own"]) + e["ours"]  # the official runtime's features, to its own accuracy
    if kind == "silence":
        with torch.no_grad():
            assert torch.all(ours(wave) == math.log(EPS))


@pytest.mark.slow
@pytest.mark.parametrize("mkl, aten", [("AVX2", "avx2"), ("AVX512", "avx512")])
def test_logmel_accuracy_on_both_mkl_kernel_paths(mkl, aten):
    """MKL and ATen pick their kernels when they load, so each path runs in its own process."""
    pytest.importorskip("nnAudio.features", reason="nnAudio (the official frontend) is not installed")
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": mkl, "ATEN_CPU_CAPABILITY": aten, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(HERE / "frontend_errors.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert len(out["cases"]) == len(FRONTENDS) * len(CASES)
    worst = max(out["cases"], key=lambda c: c["ours"] / bound(c["own"]))
    print(f"\n[MKL {mkl}, ATen {out['cpu_capability']}] worst: {worst}")
    for case in out["cases"]:
        assert case["shape_ok"] and case["ours"] < bound(case["own"]), case
        assert case["ours_vs_nnaudio64"] < bound(case["own"]) and case["ours"] < 1e-5, case


def test_logmel_batch_and_unbatched_shapes(frontends):
    name, cfg, ref, _, ours = frontends
    waves = torch.from_numpy(np.stack([make_signal("noise", cfg.sample_rate, 1.3, seed=s) for s in range(3)]))
    with torch.no_grad():
        batch, expected = ours(waves), (ref(waves) + EPS).log()
        single = ours(waves[1])
    assert batch.shape == expected.shape == (3, cfg.n_mels, waves.shape[-1] // cfg.hop_length + 1)
    assert single.shape == batch.shape[1:]
    torch.testing.assert_close(single, batch[1], atol=1e-5, rtol=0)
    diff = (batch - expected).abs().max().item()
    print(f"\n[{name} batch of 3] max |ours - nnAudio| = {diff:.2e}")
    assert diff < 1e-3


def test_logmel_ignores_autocast():
    fe = LogMelSpectrogram(FrontendCfg())
    wave = torch.from_numpy(make_signal("harmonic_vibrato", 16000, 0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = fe(wave)
    assert under_amp.dtype == torch.float32
    torch.testing.assert_close(under_amp, fe(wave), atol=0, rtol=0)


def test_streamed_wav_with_unknown_length_loads(tmp_path):
    """A piped writer leaves 0xFFFFFFFF as the data size; that is not a truncated file."""
    path = _valid_wav(tmp_path / "stream.wav", n=1000)
    data = bytearray(path.read_bytes())
    pos = data.index(b"data") + 4
    data[pos : pos + 4] = (0xFFFFFFFF).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert load_audio(path).shape == (1000,)


def test_logmel_too_short_input():
    fe = LogMelSpectrogram(FrontendCfg())
    assert fe(torch.zeros(201)).shape == (80, 2)  # the shortest input reflect padding allows
    with pytest.raises(AudioError, match="200 samples is too short.*at least 201"):
        fe(torch.zeros(200))


def test_logmel_is_not_trivially_close():
    """The parity tolerance is meaningful: a slightly different frontend is far outside it."""
    cfg = FrontendCfg()
    wave = torch.from_numpy(make_signal("harmonic_vibrato", cfg.sample_rate))[None]
    base = LogMelSpectrogram(cfg)(wave)
    for changed in (FrontendCfg(f_min=0.0), FrontendCfg(hop_length=161), FrontendCfg(n_fft=512, win_length=400)):
        other = LogMelSpectrogram(changed)(wave)
        n = min(other.shape[-1], base.shape[-1])  # another hop gives fewer frames: compare the common ones
        assert (other[..., :n] - base[..., :n]).abs().max() > 1e-2


# -- load_audio: working cases --------------------------------------------------------------------------
def _tone(sr: int, seconds: float, freq: float = 1000.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def _peak_hz(wave: torch.Tensor, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * sr / len(wave))


def test_load_silence(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(8000, np.float32), 16000, subtype="PCM_16")
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.shape == (8000,)
    assert torch.all(wave == 0)


def test_load_stereo_is_channel_mean(tmp_path):
    rng = np.random.default_rng(1)
    stereo = (0.3 * rng.standard_normal((16000, 2))).astype(np.float32)
    stereo[:, 1] += 0.2  # make the channels clearly different
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    wave = load_audio(path, sample_rate=16000)
    assert wave.shape == (16000,)
    np.testing.assert_allclose(wave.numpy(), stereo.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 44100, 48000])
def test_load_resamples_to_16k(tmp_path, sr):
    seconds = 1.5
    path = tmp_path / f"tone_{sr}.wav"
    sf.write(path, _tone(sr, seconds), sr, subtype="PCM_16")
    wave = load_audio(path, sample_rate=16000)
    assert wave.dtype == torch.float32
    assert abs(wave.shape[0] - seconds * 16000) <= 1
    assert abs(_peak_hz(wave, 16000) - 1000.0) <= 16000 / wave.shape[0]  # within one FFT bin
    mid = wave[2000:-2000]
    assert abs(mid.abs().max().item() - 0.5) < 0.01  # amplitude kept
    native = load_audio(path)  # no sample_rate: the file's own rate
    assert native.shape[0] == int(sr * seconds)


@pytest.mark.parametrize("subtype, atol", [("PCM_16", 1 / 32768), ("PCM_32", 1e-7), ("FLOAT", 0.0)])
def test_load_sample_formats(tmp_path, subtype, atol):
    x = _tone(16000, 0.5, freq=440.0, amp=0.7)
    path = tmp_path / f"x_{subtype}.wav"
    sf.write(path, x, 16000, subtype=subtype)
    assert sf.info(str(path)).subtype == subtype
    wave = load_audio(path, sample_rate=16000)
    assert wave.dtype == torch.float32 and wave.shape == x.shape
    np.testing.assert_allclose(wave.numpy(), x, atol=atol, rtol=0)


@pytest.mark.parametrize("fmt, subtype, atol", [("FLAC", "PCM_16", 1 / 32768), ("OGG", "VORBIS", 0.05)])
def test_load_compressed(tmp_path, fmt, subtype, atol):
    x = _tone(16000, 1.0, freq=1000.0, amp=0.5)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, x, 16000, format=fmt, subtype=subtype)
    wave = load_audio(path, sample_rate=16000)
    assert wave.shape == x.shape
    assert abs(_peak_hz(wave, 16000) - 1000.0) <= 1.0
    np.testing.assert_allclose(wave[1000:-1000].numpy(), x[1000:-1000], atol=atol, rtol=0)


# -- load_audio: errors ---------------------------------------------------------------------------------
def _raises(path, *words):
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def _valid_wav(path, subtype="PCM_16", n=16000):
    sf.write(path, _tone(16000, n / 16000), 16000, subtype=subtype)
    return path


def test_error_missing_file(tmp_path):
    _raises(tmp_path / "nope.wav", "no such file")


def test_error_folder(tmp_path):
    folder = tmp_path / "clips.wav"
    folder.mkdir()
    _raises(folder, "folder")


def test_error_text_file(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a caption, not audio\n" * 20)
    _raises(path, "cannot decode", "unknown format")


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_error_truncated_wav(tmp_path, subtype):
    full = _valid_wav(tmp_path / "full.wav", subtype)
    data = full.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    # libsndfile itself does not complain: it returns the samples that are there.
    assert 0 < sf.read(str(cut))[0].shape[0] < 16000
    message = _raises(cut, "truncated")
    assert "16000" in message


def test_error_header_only_wav(tmp_path):
    full = _valid_wav(tmp_path / "full.wav")
    cut = tmp_path / "header.wav"
    cut.write_bytes(full.read_bytes()[:44])  # a complete header announcing 16000 frames, no data
    _raises(cut, "truncated")


def test_trailing_chunk_is_not_truncation(tmp_path):
    """A valid WAV with a chunk after ``data`` (e.g. LIST metadata) must load normally."""
    path = _valid_wav(tmp_path / "meta.wav", n=1000)
    data = bytearray(path.read_bytes())
    extra = b"LIST" + (6).to_bytes(4, "little") + b"INFOab"
    data += extra
    data[4:8] = (int.from_bytes(data[4:8], "little") + len(extra)).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert load_audio(path).shape == (1000,)


def test_error_zero_samples(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    _raises(path, "zero samples")


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN: 1"), (np.inf, "Inf: 1"), (-np.inf, "Inf: 1")])
def test_error_non_finite(tmp_path, bad, word):
    x = _tone(16000, 0.5)
    x[1234] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    message = _raises(path, word, "1234")
    assert "NaN/Inf" in message


# -- resample and statistics ----------------------------------------------------------------------------
def test_resample():
    x = torch.from_numpy(_tone(48000, 1.0, freq=3000.0))
    y = resample(x, 48000, 16000)
    assert y.shape == (16000,) and y.dtype == torch.float32
    assert abs(_peak_hz(y, 16000) - 3000.0) <= 1.0
    assert resample(x, 16000, 16000) is x
    up = resample(torch.from_numpy(_tone(8000, 1.0)), 8000, 16000)
    assert up.shape == (16000,) and abs(_peak_hz(up, 16000) - 1000.0) <= 1.0
    # Above the new Nyquist frequency nothing passes: a 7 kHz tone vanishes at 8 kHz.
    alias = resample(torch.from_numpy(_tone(16000, 1.0, freq=7000.0)), 16000, 8000)
    assert alias[500:-500].abs().max() < 0.02


def test_normalize_lms():
    lms = torch.tensor([[-7.1, -2.9, -11.3]])
    out = normalize_lms(lms, (-7.1, 4.2))
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, -1.0]]))
    torch.testing.assert_close(normalize_lms(lms, torch.tensor([-7.1, 4.2])), out)


def test_compute_norm_stats():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(80, n, generator=gen) * 3.0 - 6.0 for n in (100, 250, 37)]
    mean, std = compute_norm_stats(parts)
    flat = torch.cat([p.flatten() for p in parts]).double()
    assert mean == pytest.approx(flat.mean().item(), abs=1e-9)
    assert std == pytest.approx(flat.std(unbiased=False).item() + EPS, abs=1e-9)
    assert abs(mean + 6.0) < 0.05 and abs(std - 3.0) < 0.05
    normed = torch.cat([normalize_lms(p, (mean, std)).flatten() for p in parts])
    assert abs(normed.mean().item()) < 1e-6 and abs(normed.std(unbiased=False).item() - 1) < 1e-6
    with pytest.raises(ValueError):
        compute_norm_stats([])
