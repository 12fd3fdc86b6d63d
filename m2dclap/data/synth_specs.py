"""The synthetic clip model: its sound classes and the randomly drawn parameters (:class:`ClipSpec`) of a clip.

:mod:`m2dclap.data.synth_clips` renders a spec into a waveform and captions it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PITCHES = ("low", "mid", "high")
LOUDNESS = ("quiet", "loud")
BACKGROUNDS = ("none", "hiss", "hum")
_MIN_PERIOD = 0.2  # s: shortest time given to one repetition, so repeats stay audible


# ----------------------------------------------------------------------------------------------- sound classes


@dataclass(frozen=True)
class SoundClass:
    """How one class sounds and how captions name it."""

    name: str  # display name, used as the label and by zero-shot prompts
    noun: str  # singular noun phrase in captions (contains ``name``'s first word)
    plural: str  # plural noun phrase
    verbs: tuple[str, ...]  # third-person verbs, "a siren <wails>"
    freqs: dict[str, tuple[float, float]]  # pitch -> (low, high) Hz of the characteristic frequency
    max_dur: float  # s: longest single occurrence
    impulsive: bool = False  # decays by itself (no sustained envelope)


_CLASSES: tuple[SoundClass, ...] = (
    SoundClass(
        "beep",
        "beep",
        "beeps",
        ("sounds", "goes off", "rings out"),
        {"low": (200, 350), "mid": (500, 1000), "high": (1500, 3000)},
        0.45,
    ),
    SoundClass(
        "chirp",
        "chirp",
        "chirps",
        ("sounds", "is heard"),
        {"low": (150, 300), "mid": (400, 900), "high": (1200, 2500)},
        0.5,
    ),
    SoundClass(
        "siren",
        "siren",
        "sirens",
        ("wails", "sounds", "blares"),
        {"low": (300, 450), "mid": (600, 1000), "high": (1200, 2000)},
        1.6,
    ),
    SoundClass(
        "buzz", "buzz", "buzzes", ("sounds", "drones"), {"low": (60, 120), "mid": (150, 350), "high": (500, 1000)}, 1.0
    ),
    SoundClass(
        "clicking",
        "clicking sound",
        "clicking sounds",
        ("rattles", "is heard"),
        {"low": (400, 800), "mid": (1200, 2500), "high": (3500, 6000)},
        0.6,
    ),
    SoundClass(
        "noise burst",
        "noise burst",
        "noise bursts",
        ("sounds", "is heard", "crackles"),
        {"low": (200, 500), "mid": (1000, 2500), "high": (3500, 6500)},
        0.6,
    ),
    SoundClass("rumble", "rumble", "rumbles", ("sounds", "is heard", "rolls by"), {"low": (120, 300)}, 1.6),
    SoundClass(
        "drum",
        "drum hit",
        "drum hits",
        ("sounds", "thumps"),
        {"low": (50, 90), "mid": (110, 200), "high": (220, 400)},
        0.5,
        impulsive=True,
    ),
    SoundClass(
        "chord",
        "chord",
        "chords",
        ("rings out", "sounds", "plays"),
        {"low": (110, 196), "mid": (220, 440), "high": (523, 880)},
        1.2,
    ),
    SoundClass("whistle", "whistle", "whistles", ("blows", "sounds"), {"mid": (900, 1400), "high": (1600, 3200)}, 0.8),
    SoundClass(
        "knock",
        "knock",
        "knocks",
        ("sounds", "is heard"),
        {"low": (150, 300), "mid": (400, 800), "high": (1000, 2000)},
        0.25,
        impulsive=True,
    ),
    SoundClass(
        "trill",
        "trill",
        "trills",
        ("warbles", "sounds", "flutters"),
        {"low": (250, 400), "mid": (500, 1000), "high": (1200, 2400)},
        0.8,
    ),
)
CLASS_NAMES: list[str] = [c.name for c in _CLASSES]
SOUND_CLASSES: dict[str, SoundClass] = {c.name: c for c in _CLASSES}


# ----------------------------------------------------------------------------------------------- parameters


@dataclass
class Event:
    """One sound event of a clip."""

    cls: str  # class name
    pitch: str  # "low", "mid" or "high"
    loudness: str  # "quiet" or "loud"
    reps: int  # 1, 2 or 3 repetitions
    freq: float  # Hz, drawn inside the pitch range
    direction: str = ""  # chirps only: "rising" or "falling"


@dataclass
class ClipSpec:
    """Everything needed to render a clip and to caption it."""

    events: list[Event]  # events[0] is the primary (first or foreground) event
    relation: str  # "single", "seq" (one after the other) or "overlap" (events[1] under events[0])
    background: str  # "none", "hiss" or "hum"
    duration: float  # s
    lead: float  # s of silence before the first event
    tail: float  # s of silence after the last event
    gaps: list[float]  # s between consecutive events of a sequence

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(e.cls for e in self.events))


def sample_clip(rng: np.random.Generator, primary: str) -> ClipSpec:
    """Draw the parameters of one clip whose primary event is of class ``primary``."""
    n_events = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
    relation = "single" if n_events == 1 else ("seq" if n_events == 3 or rng.random() < 0.6 else "overlap")
    others = [c for c in CLASS_NAMES if c != primary]
    classes = [primary] + [str(c) for c in rng.choice(others, size=n_events - 1, replace=False)]
    events = [_sample_event(rng, c) for c in classes]
    if relation == "overlap" and events[0].loudness == "quiet":
        events[1].loudness = "quiet"  # the foreground event stays the most prominent one
    lead, tail = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.15)
    gaps = [float(rng.uniform(0.1, 0.25)) for _ in range(n_events - 1)] if relation == "seq" else []
    if relation == "overlap":
        need = lead + tail + _MIN_PERIOD * max(events[0].reps, events[1].reps / 0.5)
    else:
        need = lead + tail + sum(gaps) + _MIN_PERIOD * sum(e.reps for e in events)
    duration = float(rng.uniform(max(1.5, need), 3.0))
    background = str(rng.choice(BACKGROUNDS, p=[0.5, 0.25, 0.25]))
    return ClipSpec(events, relation, background, duration, float(lead), float(tail), gaps)


def _sample_event(rng: np.random.Generator, cls: str) -> Event:
    sc = SOUND_CLASSES[cls]
    pitch = str(rng.choice(sorted(sc.freqs, key=PITCHES.index)))
    lo, hi = sc.freqs[pitch]
    freq = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return Event(
        cls=cls,
        pitch=pitch,
        loudness=str(rng.choice(LOUDNESS)),
        reps=int(rng.choice([1, 2, 3], p=[0.5, 0.25, 0.25])),
        freq=freq,
        direction=str(rng.choice(["rising", "falling"])) if cls == "chirp" else "",
    )
