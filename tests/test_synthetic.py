"""The embedded synthetic corpus: contents, captions that describe the audio, splits, determinism, caching."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import soundfile as sf

from m2dclap.data import manifest as manifest_mod
from m2dclap.data import synthetic
from m2dclap.data.synthetic import (
    CLASS_NAMES,
    ClipSpec,
    Event,
    assign_splits,
    default_corpus_dir,
    generate_corpus,
    make_captions,
    render_clip,
)

SR = 16000
N = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return generate_corpus(out, n_clips=N, seed=3)


def test_corpus_contents(corpus):
    recs = manifest_mod.read_manifest(corpus)
    assert len(recs) == N and len(CLASS_NAMES) >= 12
    header = corpus.read_text().splitlines()[0].split(",")
    assert header == ["id", "audio"] + [f"caption_{i}" for i in range(1, 6)] + ["labels", "split"]
    for r in recs:
        info = sf.info(str(r.audio))
        assert info.samplerate == SR and info.channels == 1 and info.subtype == "PCM_16"
        assert 1.5 <= info.duration <= 3.0
        assert len(r.captions) == len(set(r.captions)) >= 3
        assert 1 <= len(r.labels) <= 3 and set(r.labels) <= set(CLASS_NAMES)
        wave, _ = sf.read(str(r.audio))
        assert np.abs(wave).max() > 0.01  # not silent


def test_captions_name_every_class_present(corpus):
    for r in manifest_mod.read_manifest(corpus):
        for caption in r.captions:
            for label in r.labels:
                assert label in caption.lower(), (r.id, label, caption)


def test_primary_classes_are_balanced_and_splits_stratified(corpus):
    recs = manifest_mod.read_manifest(corpus)
    primaries = collections.Counter(r.labels[0] for r in recs)
    assert max(primaries.values()) - min(primaries.values()) <= 1 and len(primaries) == len(CLASS_NAMES)
    assert collections.Counter(r.split for r in recs) == {"train": 32, "val": 4, "test": 4}

    rng = np.random.default_rng(0)
    prim = list(rng.permutation([c for c in CLASS_NAMES for _ in range(10)]))
    splits = assign_splits(prim, rng)
    for c in CLASS_NAMES:  # ten clips per class: exactly 8/1/1 each
        assert collections.Counter(s for p, s in zip(prim, splits) if p == c) == {"train": 8, "val": 1, "test": 1}


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path):
    a = generate_corpus(tmp_path / "a", n_clips=6, seed=11)
    b = generate_corpus(tmp_path / "b", n_clips=6, seed=11)
    c = generate_corpus(tmp_path / "c", n_clips=6, seed=12)
    ra, rb, rc = (manifest_mod.read_manifest(p) for p in (a, b, c))
    assert [r.captions for r in ra] == [r.captions for r in rb]
    assert all(x.audio.read_bytes() == y.audio.read_bytes() for x, y in zip(ra, rb))
    assert [r.captions for r in ra] != [r.captions for r in rc]
    assert any(x.audio.read_bytes() != z.audio.read_bytes() for x, z in zip(ra, rc))


def test_cache_reuse_and_regeneration(tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    manifest = generate_corpus(out, n_clips=8, seed=0)
    wav = out / "audio" / "syn_00003.wav"
    stamp = (manifest.stat().st_mtime_ns, wav.stat().st_mtime_ns)

    calls = []
    monkeypatch.setattr(synthetic, "_write_clips", lambda *a: calls.append(a) or [])
    assert generate_corpus(out, n_clips=8, seed=0) == manifest
    assert calls == []  # cached: nothing synthesised or rewritten
    assert (manifest.stat().st_mtime_ns, wav.stat().st_mtime_ns) == stamp
    monkeypatch.undo()

    good = wav.read_bytes()
    wav.write_bytes(b"half-written")
    (out / ".complete").unlink()  # an interrupted run: no completion marker
    generate_corpus(out, n_clips=8, seed=0)
    assert wav.read_bytes() == good and (out / ".complete").is_file()

    with pytest.raises(synthetic.CorpusFolderError, match="8 clips"):  # another size: refused, untouched
        generate_corpus(out, n_clips=5, seed=0)
    assert len(manifest_mod.read_manifest(manifest)) == 8 and is_ours_complete(out, 8)
    generate_corpus(out, n_clips=5, seed=0, force=True)  # forced: regenerated, stale clips removed
    assert len(manifest_mod.read_manifest(manifest)) == 5
    assert sorted(p.name for p in (out / "audio").iterdir()) == [f"syn_{i:05d}.wav" for i in range(5)]

    (out / "audio" / "syn_00002.wav").unlink()  # marker present but a file lost: not complete
    assert not synthetic.is_complete(out, n_clips=5, seed=0)
    generate_corpus(out, n_clips=5, seed=0)
    assert (out / "audio" / "syn_00002.wav").is_file()


def is_ours_complete(out, n):
    return synthetic.is_complete(out, n_clips=n, seed=0)


def _single(cls, pitch="mid", loudness="loud", reps=1, background="none", freq=None):
    lo, hi = synthetic.SOUND_CLASSES[cls].freqs[pitch]
    ev = Event(cls, pitch, loudness, reps, freq or float(np.sqrt(lo * hi)), "rising" if cls == "chirp" else "")
    return ClipSpec([ev], "single", background, 2.5, 0.1, 0.1, [])


def _centroid(x):
    power = np.abs(np.fft.rfft(x)) ** 2
    return float((power * np.fft.rfftfreq(len(x), 1 / SR)).sum() / power.sum())


def _count_events(x, hop=800):
    env = np.sqrt(np.convolve(x**2, np.ones(hop) / hop, "same")[::hop])  # 50-ms RMS envelope
    on = (env > 0.25 * env.max()).astype(int)
    return int((np.diff(on) == 1).sum() + on[0])


@pytest.mark.parametrize("cls", CLASS_NAMES)
def test_audio_matches_its_parameters(cls):
    """Pitch words order the spectral centroid, loud is louder than quiet, repetitions are countable."""
    pitches = sorted(synthetic.SOUND_CLASSES[cls].freqs, key=synthetic.PITCHES.index)
    cents = [_centroid(render_clip(_single(cls, p), SR, np.random.default_rng(1))) for p in pitches]
    assert len(pitches) >= 2 or cls == "rumble"  # rumble has one pitch: nothing to order
    assert all(a < b for a, b in zip(cents, cents[1:]))
    rms = {
        lv: np.sqrt(np.mean(render_clip(_single(cls, pitches[0], lv), SR, np.random.default_rng(2)) ** 2))
        for lv in ("quiet", "loud")
    }
    assert 20 * np.log10(rms["loud"] / rms["quiet"]) > 10
    for reps in (1, 2, 3):
        x = render_clip(_single(cls, pitches[-1], reps=reps), SR, np.random.default_rng(3))
        assert _count_events(x) == reps


def test_sequence_order_in_time():
    """'A then B': A's energy comes first. A high beep then a low rumble: centroid falls over time."""
    beep = Event("beep", "high", "loud", 1, 2000.0)
    rumble = Event("rumble", "low", "loud", 1, 200.0)
    spec = ClipSpec([beep, rumble], "seq", "none", 2.0, 0.1, 0.1, [0.2])
    x = render_clip(spec, SR, np.random.default_rng(0))
    half = len(x) // 2
    assert _centroid(x[:half]) > 4 * _centroid(x[half:])


def test_caption_wording_follows_parameters():
    rng = np.random.default_rng(0)
    spec = ClipSpec(
        [Event("beep", "high", "loud", 3, 2000.0), Event("rumble", "low", "quiet", 1, 200.0)],
        "seq",
        "hiss",
        2.5,
        0.1,
        0.1,
        [0.2],
    )
    caps = make_captions(spec, rng)
    assert len(caps) == len(set(caps)) == 5
    for c in caps:
        low = c.lower()
        assert low.index("beep") < low.index("rumble")  # order of events
        assert "three" in low and "hiss" in low
        assert any(w in low for w in ("high", "shrill")) and any(w in low for w in ("deep", "low"))
        assert any(w in low for w in ("quiet", "soft", "faint"))
    overlap = ClipSpec(
        [Event("siren", "mid", "loud", 1, 800.0), Event("knock", "low", "quiet", 2, 200.0)],
        "overlap",
        "hum",
        2.5,
        0.1,
        0.1,
        [],
    )
    for c in make_captions(overlap, rng):
        low = c.lower()
        assert any(w in low for w in (" while ", " over ", " together with ", " at the same time"))
        assert any(w in low for w in ("two", "twice", "pair")) and "hum" in low


def test_default_dir_and_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("M2DCLAP_DATA", str(tmp_path / "env"))
    assert default_corpus_dir() == tmp_path / "env"
    monkeypatch.delenv("M2DCLAP_DATA")
    assert default_corpus_dir().parts[-2:] == ("m2dclap", "synthetic-v1")

    assert synthetic.main(["--out", str(tmp_path / "cli"), "--n-clips", "3", "--seed", "5"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "cli" / "manifest.csv") and os.path.isfile(out)
    assert len(manifest_mod.read_manifest(out)) == 3
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--help"])
    assert info.value.code == 0
    assert "--n-clips" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "x"), "--n-clips", "0"])
