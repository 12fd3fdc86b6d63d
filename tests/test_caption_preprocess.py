"""EnCodec tokens, CLAP backends and the caption feature cache (captioning.codec / clap_backends / preprocess)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("encodec", reason="the encodec package is not installed")

import m2dclap  # noqa: E402
from captioning import preprocess as pp  # noqa: E402
from captioning.clap_backends import BackendError, ClapBackend, M2DClapBackend, get_backend, list_backends  # noqa: E402
from captioning.codec import CodecError, encode_batch, encode_tokens, load_codec, num_codebooks  # noqa: E402
from m2dclap.data.synthetic import generate_corpus  # noqa: E402


@pytest.fixture(scope="module")
def codec():
    return load_codec("random", seed=0)


@pytest.fixture(scope="module")
def clap_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    folder = tmp_path_factory.mktemp("clap") / "tiny"
    m2dclap.save_pretrained(model, folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("corpus"), n_clips=12, seed=5)


def _noise(seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(int(seconds * sr), generator=g)


# ---------------------------------------------------------------------------------------------- codec


def test_codebooks_per_bandwidth():
    assert num_codebooks(12.0) == 16 and num_codebooks(24.0) == 32 and num_codebooks(6.0) == 8


def test_tokens_shape_range_and_rate(codec):
    tok = encode_tokens(codec, _noise(0.4, 16000), 16000)  # resampled to 24 kHz inside
    assert tok.dtype == torch.int64 and tok.shape == (16, 30)
    assert int(tok.min()) >= 0 and int(tok.max()) < 1024
    assert all(tok[k].unique().numel() > 1 for k in range(16)), "random codec gives constant codes"
    # 0.5 s at 44.1 kHz stereo -> mono 24 kHz, ceil(0.5 * 75) frames
    stereo = torch.stack([_noise(0.5, 44100, 1), _noise(0.5, 44100, 2)])
    assert encode_tokens(codec, stereo, 44100).shape == (16, math.ceil(0.5 * 75))


def test_tokens_deterministic_and_batch_independent(codec):
    a, b = _noise(0.4, 24000, 3), _noise(0.4, 24000, 4)
    c = _noise(0.3, 24000, 5)
    alone = [encode_tokens(codec, w, 24000) for w in (a, b, c)]
    batched = encode_batch(codec, [a, b, c], 24000)
    for x, y in zip(alone, batched):
        assert torch.equal(x, y)
    assert not torch.equal(alone[0], alone[1])
    other = load_codec("random", seed=0)  # a fresh build with the same seed gives the same tokens
    assert torch.equal(encode_tokens(other, a, 24000), alone[0])


def test_codec_missing_local_weights_is_clear(tmp_path):
    with pytest.raises(CodecError, match="encodec_24khz-d7cc33bc.th"):
        load_codec(tmp_path)  # an empty folder


# ---------------------------------------------------------------------------------------------- backends


def test_backend_registry_errors(clap_ckpt):
    assert "m2d-clap" in list_backends()
    with pytest.raises(BackendError, match=r"unknown CLAP backend 'nope'.*m2d-clap"):
        get_backend("nope")
    with pytest.raises(BackendError, match="needs a checkpoint"):
        get_backend("m2d-clap")
    b = get_backend("m2d-clap", checkpoint=clap_ckpt)
    assert isinstance(b, ClapBackend) and isinstance(b, M2DClapBackend) and b.name == "m2d-clap"
    emb = b.embed_audio([_noise(1.0, 16000), _noise(0.7, 22050, 1)], 16000)
    assert emb.shape == (2, b.dim) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    ref = m2dclap.load(clap_ckpt, audio_only=True).encode_audio([_noise(1.0, 16000)], sample_rate=16000)
    torch.testing.assert_close(emb[0], ref[0].float())


# ---------------------------------------------------------------------------------------------- preprocess CLI


@pytest.fixture
def shared_codec(codec, monkeypatch):
    """The CLI builds the same seeded random codec as the module fixture (checked above); reuse it to save time."""
    import captioning.codec as codec_module  # where LazyCodec looks the loader up

    monkeypatch.setattr(
        codec_module, "load_codec", lambda source, **kw: codec if source == "random" else load_codec(source, **kw)
    )


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_preprocess_cache_resume_and_bad_file(corpus, clap_ckpt, tmp_path, monkeypatch, capsys, shared_codec):
    records = m2dclap.data.manifest.read_manifest(corpus)[:4]  # 4 of the 12 clips keep the test fast on CPU
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "audio", "caption", "split"])
        for r in records:
            w.writerow([r.id, str(r.audio), r.captions[0], r.split])
        w.writerow(["broken", str(bad), "nothing", "train"])
    out = tmp_path / "cache"
    argv = [
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--clap",
        "m2d-clap",
        "--clap-checkpoint",
        str(clap_ckpt),
        "--codec",
        "random",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert pp.main(argv) == 1  # one unreadable file
    captured = capsys.readouterr()
    assert str(bad) in captured.err and "1 skipped" in captured.out

    errors = _read_csv(out / pp.ERRORS_NAME)
    assert [e["id"] for e in errors] == ["broken"] and errors[0]["audio"] == str(bad)
    index = _read_csv(out / pp.INDEX_NAME)
    assert [r["id"] for r in index] == [r.id for r in records]
    dims = set()
    for row, rec in zip(index, records):
        tok = np.load(out / row["tokens"])
        emb = np.load(out / row["clap"])
        assert tok.dtype == np.int16 and tok.shape[0] == 16 and int(row["frames"]) == tok.shape[1]
        assert 0 <= tok.min() and tok.max() < 1024
        seconds = m2dclap.load_audio(rec.audio).shape[0] / 16000
        assert tok.shape[1] == math.ceil(seconds * 75)
        assert emb.dtype == np.float32 and emb.ndim == 1
        dims.add(emb.shape[0])
        assert row["caption_1"] == rec.captions[0] and row["split"] == rec.split
    assert len(dims) == 1
    # the index is itself a manifest of the suite
    assert [r.id for r in m2dclap.data.manifest.read_manifest(out / pp.INDEX_NAME)] == [r.id for r in records]

    # resume: nothing recomputed, files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    calls = []
    real = pp.encode_batch
    monkeypatch.setattr(pp, "encode_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert pp.main(argv) == 1
    assert "0 token file(s) and 0 embedding(s) computed, 4 already cached" in capsys.readouterr().out
    assert not calls and {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == mtimes

    # a deleted embedding is recomputed alone; the tokens stay as they were
    (out / index[0]["clap"]).unlink()
    assert pp.main(argv + ["--split", "train", "val", "test"]) == 1
    assert "0 token file(s) and 1 embedding(s) computed, 3 already cached" in capsys.readouterr().out
    assert not calls


def test_preprocess_split_and_errors(corpus, clap_ckpt, tmp_path, capsys, shared_codec):
    out = tmp_path / "cache"
    base = [
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--clap-checkpoint",
        str(clap_ckpt),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert pp.main(base + ["--clap", "laion-clap", "--codec", "random"]) == 2
    assert "known backends: m2d-clap" in capsys.readouterr().err
    assert pp.main(base + ["--codec", str(tmp_path / "nowhere")]) == 2
    assert "encodec_24khz-d7cc33bc.th" in capsys.readouterr().err
    test_ids = [r.id for r in m2dclap.data.manifest.read_manifest(corpus, split="test")]
    assert pp.main(base + ["--codec", "random", "--split", "test"]) == 0
    assert [r["id"] for r in _read_csv(out / pp.INDEX_NAME)] == test_ids
    assert _read_csv(out / pp.ERRORS_NAME) == []
    # tokens of another bandwidth into the same cache are refused
    assert pp.main(base + ["--codec", "random", "--bandwidth", "6", "--split", "test"]) == 2
    assert "bandwidth" in capsys.readouterr().err


def test_help_mentions_outputs(capsys):
    with pytest.raises(SystemExit) as e:
        pp.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--clap-checkpoint" in text and "int16" in text and "resumable" in text.lower()
