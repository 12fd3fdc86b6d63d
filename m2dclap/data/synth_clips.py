"""One synthetic clip: its waveform and its captions, from the parameters drawn by :mod:`.synth_specs`.

:mod:`m2dclap.data.synthetic` turns these into a corpus folder; this module writes nothing.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .synth_specs import CLASS_NAMES, SOUND_CLASSES, ClipSpec, Event

N_CAPTIONS = 5  # paraphrases per clip (Clotho also has five)


# ----------------------------------------------------------------------------------------------- synthesis


def _ramp_env(n: int, sr: int, attack: float = 0.01, release: float = 0.03) -> np.ndarray:
    a = max(1, min(int(attack * sr), n // 4))
    r = max(1, min(int(release * sr), n // 4))
    env = np.ones(n)
    env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    env[n - r :] = np.linspace(1.0, 0.0, r)
    return env


def _phase(freq_t: np.ndarray, sr: int) -> np.ndarray:
    """Instantaneous phase (radians) of a time-varying frequency (Hz)."""
    return 2 * np.pi * np.cumsum(freq_t) / sr


def _band_noise(n: int, sr: int, rng: np.random.Generator, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """White noise shaped in the frequency domain by ``gain(freqs_hz)``."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    return np.fft.irfft(spec * gain(freqs), n)


def _beep(n, f, sr, rng, ev):
    t = np.arange(n) / sr
    return np.sin(2 * np.pi * f * t) * _ramp_env(n, sr, 0.005, 0.01)


def _chirp(n, f, sr, rng, ev):
    ratio = rng.uniform(2.0, 4.0)  # total sweep, centred (geometrically) on f
    k = np.linspace(-0.5, 0.5, n) * (1 if ev.direction == "rising" else -1)
    return np.sin(_phase(f * ratio**k, sr)) * _ramp_env(n, sr, 0.005, 0.02)


def _siren(n, f, sr, rng, ev):
    t = np.arange(n) / sr
    rate, depth = rng.uniform(0.8, 3.0), rng.uniform(0.2, 0.35)
    ph = _phase(f * (1 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))), sr)
    return (np.sin(ph) + 0.3 * np.sin(2 * ph)) * _ramp_env(n, sr, 0.02, 0.05)


def _buzz(n, f, sr, rng, ev):
    cycles = f * np.arange(n) / sr + rng.uniform()
    if rng.random() < 0.5:
        wave = 2 * (cycles % 1.0) - 1  # sawtooth
    else:
        wave = np.where(cycles % 1.0 < 0.5, 1.0, -1.0)  # square
    return wave * _ramp_env(n, sr, 0.01, 0.02)


def _clicking(n, f, sr, rng, ev):
    rate = rng.uniform(15, 40)  # clicks per second
    pulses = np.zeros(n)
    idx = (np.arange(0, n / sr, 1.0 / rate) * sr).astype(int)
    pulses[idx[idx < n]] = rng.uniform(0.7, 1.0, size=int((idx < n).sum()))
    tk = np.arange(int(0.006 * sr)) / sr
    kernel = np.sin(2 * np.pi * f * tk) * np.exp(-tk / 0.0015)  # one click: a 1.5-ms damped resonance
    return np.convolve(pulses, kernel)[:n]


def _noise_burst(n, f, sr, rng, ev):
    width = rng.uniform(0.3, 0.6)  # octaves (Gaussian in log-frequency)
    x = _band_noise(n, sr, rng, lambda fr: np.exp(-0.5 * (np.log2(np.maximum(fr, 1.0) / f) / width) ** 2))
    return x * _ramp_env(n, sr, 0.005, 0.04)


def _rumble(n, f, sr, rng, ev):
    # pink noise (1/sqrt(f) amplitude) above 30 Hz, low-passed at f with a 4th-order slope
    x = _band_noise(n, sr, rng, lambda fr: (fr > 30) / np.sqrt(np.maximum(fr, 30.0)) / (1 + (fr / f) ** 4))
    t = np.arange(n) / sr
    wobble = 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)
    return x * wobble * _ramp_env(n, sr, 0.08, 0.15)


def _drum(n, f, sr, rng, ev):
    t = np.arange(n) / sr
    tau = rng.uniform(0.06, 0.2)
    body = np.sin(_phase(f * (1 + 1.5 * np.exp(-t / 0.02)), sr)) * np.exp(-t / tau)  # pitch drops as it decays
    snap = rng.standard_normal(n) * np.exp(-t / 0.01) * 0.5
    return (body + snap) * _ramp_env(n, sr, 0.001, 0.01)


def _chord(n, f, sr, rng, ev):
    t = np.arange(n) / sr
    third = 4 if rng.random() < 0.5 else 3  # major or minor triad
    notes = f * 2.0 ** (np.array([0, third, 7]) / 12)
    harm = np.arange(1, 4)
    ph = 2 * np.pi * (notes[:, None, None] * harm[None, :, None]) * t  # (notes, harmonics, T)
    wave = (np.sin(ph) / harm[None, :, None]).sum(axis=(0, 1))
    return wave * np.exp(-t / rng.uniform(0.5, 1.5)) * _ramp_env(n, sr, 0.01, 0.05)


def _whistle(n, f, sr, rng, ev):
    t = np.arange(n) / sr
    vib = 1 + rng.uniform(0.01, 0.03) * np.sin(2 * np.pi * rng.uniform(5, 7) * t)
    breath = _band_noise(n, sr, rng, lambda fr: np.exp(-0.5 * (np.log2(np.maximum(fr, 1.0) / f) / 0.2) ** 2))
    breath /= np.abs(breath).max() + 1e-9
    return (np.sin(_phase(f * vib, sr)) + 0.05 * breath) * _ramp_env(n, sr, 0.03, 0.04)


def _knock(n, f, sr, rng, ev):
    t = np.arange(n) / sr
    modes = f * np.array([1.0, 1.59, 2.14])  # inharmonic resonances of a struck plate
    taus = rng.uniform(0.01, 0.04) * np.array([1.0, 0.6, 0.4])
    wave = (np.sin(2 * np.pi * modes[:, None] * t) * np.exp(-t / taus[:, None])).sum(axis=0)
    return wave * _ramp_env(n, sr, 0.001, 0.005)


def _trill(n, f, sr, rng, ev):
    t = np.arange(n) / sr
    step = 2.0 ** (rng.choice([2, 3, 4]) / 12)
    alt = np.floor(t * rng.uniform(8, 14) * 2) % 2  # 0/1 alternating at the trill rate
    return np.sin(_phase(f * step**alt, sr)) * _ramp_env(n, sr, 0.01, 0.02)


_SYNTH: dict[str, Callable[..., np.ndarray]] = {
    "beep": _beep,
    "chirp": _chirp,
    "siren": _siren,
    "buzz": _buzz,
    "clicking": _clicking,
    "noise burst": _noise_burst,
    "rumble": _rumble,
    "drum": _drum,
    "chord": _chord,
    "whistle": _whistle,
    "knock": _knock,
    "trill": _trill,
}
assert set(_SYNTH) == set(CLASS_NAMES)


def _occurrence(ev: Event, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One occurrence of ``ev``, scaled to its loudness: RMS of a sine of that peak, peaks capped."""
    x = _SYNTH[ev.cls](n, ev.freq, sr, rng, ev)
    level = rng.uniform(0.5, 0.8) if ev.loudness == "loud" else rng.uniform(0.05, 0.1)
    x = x * (level / np.sqrt(2) / (np.sqrt(np.mean(x * x)) + 1e-12))
    peak = np.abs(x).max()
    return x * min(1.0, 1.6 * level / (peak + 1e-12))


def _place(out: np.ndarray, ev: Event, start: float, length: float, sr: int, rng: np.random.Generator) -> None:
    """Add ``ev.reps`` copies of one occurrence, evenly spread over [start, start + length) seconds."""
    sc = SOUND_CLASSES[ev.cls]
    period = length / ev.reps
    if sc.impulsive:
        occ = min(period * 0.9, sc.max_dur)
    elif ev.reps == 1:
        occ = min(length * rng.uniform(0.75, 1.0), sc.max_dur)
    else:
        occ = min(period * rng.uniform(0.55, 0.8), sc.max_dur)  # leave an audible gap between repeats
    n = max(int(occ * sr), 16)
    x = _occurrence(ev, n, sr, rng)
    for r in range(ev.reps):
        i0 = int((start + r * period) * sr)
        seg = out[i0 : i0 + n]
        seg += x[: len(seg)]


def render_clip(spec: ClipSpec, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Synthesise the float32 waveform (T,) of a clip, peak at most 0.99."""
    sr = sample_rate
    out = np.zeros(int(round(spec.duration * sr)))
    start, span = spec.lead, spec.duration - spec.lead - spec.tail
    if spec.relation == "overlap":
        fg, bg = spec.events
        _place(out, fg, start, span, sr, rng)
        sub = span * rng.uniform(0.5, 0.7)
        _place(out, bg, start + rng.uniform(0.0, span - sub), sub, sr, rng)
    else:
        weights = np.array([e.reps for e in spec.events], dtype=float)
        slots = (span - sum(spec.gaps)) * weights / weights.sum()  # a thrice-repeated event gets more time
        for i, (ev, slot) in enumerate(zip(spec.events, slots)):
            _place(out, ev, start, float(slot), sr, rng)
            start += float(slot) + (spec.gaps[i] if i < len(spec.gaps) else 0.0)
    n = len(out)
    if spec.background == "hiss":
        out += rng.standard_normal(n) * rng.uniform(0.003, 0.01)
    elif spec.background == "hum":
        t = np.arange(n) / sr
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        hum = np.sin(2 * np.pi * f0 * t) + 0.6 * np.sin(4 * np.pi * f0 * t) + 0.4 * np.sin(6 * np.pi * f0 * t)
        out += hum * rng.uniform(0.01, 0.025)
    peak = np.abs(out).max()
    if peak > 0.99:
        out *= 0.99 / peak
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------- captions

_PITCH_WORDS = {
    "low": ("low", "low-pitched", "deep"),
    "mid": ("mid-pitched", "medium-pitched", "mid-range"),
    "high": ("high", "high-pitched", "shrill"),
}
_LOUD_WORDS = {"quiet": ("quiet", "soft", "faint"), "loud": ("loud", "loud", "powerful")}
_COUNT_WORDS = {2: ("two", "a pair of"), 3: ("three",)}
_REP_ADVERBS = {1: ("", " once"), 2: (" twice", " two times"), 3: (" three times",)}
_BACKGROUND_PHRASES = {
    "none": ("", "", " in silence", " against a silent background"),
    "hiss": (" with a faint hiss in the background", " over a faint background hiss", ", with soft hiss underneath"),
    "hum": (" with a steady hum in the background", " over a constant electrical hum", ", with a mains hum underneath"),
}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _adjectives(ev: Event, rng: np.random.Generator) -> str:
    pitch = _pick(rng, ("low", "deep")) if ev.cls == "rumble" else _pick(rng, _PITCH_WORDS[ev.pitch])
    words = [_pick(rng, _LOUD_WORDS[ev.loudness]), pitch]
    if ev.direction:
        words.append(_pick(rng, {"rising": ("rising", "upward"), "falling": ("falling", "downward")}[ev.direction]))
    return " ".join(words)


def _event_phrase(ev: Event, form: str, rng: np.random.Generator) -> str:
    """One event as a clause ("a loud beep sounds twice"), a counted noun ("two loud beeps") or a repeat."""
    sc = SOUND_CLASSES[ev.cls]
    adj = _adjectives(ev, rng)
    if form == "count":
        if ev.reps == 1:
            return _pick(rng, (f"a single {adj} {sc.noun}", f"one {adj} {sc.noun}", _article(f"{adj} {sc.noun}")))
        return f"{_pick(rng, _COUNT_WORDS[ev.reps])} {adj} {sc.plural}"
    if form == "repeat":
        subject = _article(f"{adj} {sc.noun}")
        if ev.reps == 1:
            return f"{subject} {_pick(rng, ('is heard once', 'occurs just once'))}"
        return f"{subject} {_pick(rng, ('repeats', 'is repeated'))}{_pick(rng, _REP_ADVERBS[ev.reps])}"
    return f"{_article(f'{adj} {sc.noun}')} {_pick(rng, sc.verbs)}{_pick(rng, _REP_ADVERBS[ev.reps])}"


def _join_seq(parts: list[str], style: int) -> str:
    if len(parts) == 1:
        return parts[0]
    if style == 0:
        return ", then ".join(parts)
    if style == 1:
        return parts[0] + " followed by " + (parts[1] if len(parts) == 2 else f"{parts[1]} and then {parts[2]}")
    if style == 2:
        return "first " + ", then ".join(parts[:2]) + (f", and finally {parts[2]}" if len(parts) == 3 else "")
    return ", and then ".join(parts) if len(parts) == 2 else f"{parts[0]}, then {parts[1]}, and after that {parts[2]}"


# (event forms, style) per sequence combiner; "followed by" reads best with counted nouns
_SEQ_STYLES = ((("clause", "repeat"), 0), (("count",), 1), (("clause", "repeat", "count"), 2), (("count", "repeat"), 3))
_OVERLAP_STYLES = (
    (("clause", "repeat"), " while "),
    (("count",), " over "),
    (("count",), " together with "),
    (("clause",), " as "),
)


def make_captions(spec: ClipSpec, rng: np.random.Generator, k: int = N_CAPTIONS) -> list[str]:
    """``k`` distinct paraphrases describing ``spec`` (fewer only if the phrasings run out)."""
    captions: list[str] = []
    style_order = rng.permutation(4)
    for attempt in range(12 * k):
        if len(captions) == k:
            break
        s = int(style_order[attempt % 4])
        if spec.relation == "overlap":
            forms, joiner = _OVERLAP_STYLES[s]
            a, b = (_event_phrase(e, _pick(rng, forms), rng) for e in spec.events)
            text = a + joiner + b + (" at the same time" if joiner == " as " else "")
        else:
            forms, style = _SEQ_STYLES[s]
            text = _join_seq([_event_phrase(e, _pick(rng, forms), rng) for e in spec.events], style)
        text += _pick(rng, _BACKGROUND_PHRASES[spec.background])
        text = text[0].upper() + text[1:]
        if text not in captions:
            captions.append(text)
    return captions
