"""m2dclap.extract: the CLI end to end on a tiny model, batching, bad files, resume after a kill."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import m2dclap
from m2dclap.extract import ExtractError, extract_features, find_audio_files, main

GOOD = ["a.wav", "b.wav", "stereo.wav", "sub/c.wav"]
BAD = ["corrupt.wav", "empty.wav", "nan.wav"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return m2dclap.create_model("tiny").eval()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    return str(model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    sf.write(root / "a.wav", 0.1 * rng.standard_normal(8000), 16000, subtype="PCM_16")  # 0.5 s
    sf.write(root / "b.wav", 0.1 * rng.standard_normal(32000), 16000, subtype="PCM_16")  # 2 s: two chunks
    sf.write(root / "stereo.wav", 0.1 * rng.standard_normal((12800, 2)), 16000)  # 0.8 s stereo
    sf.write(root / "sub" / "c.wav", 0.1 * rng.standard_normal(44100), 44100)  # 1 s at 44.1 kHz
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    sf.write(root / "empty.wav", np.zeros(0), 16000)
    nan = 0.1 * rng.standard_normal(4000).astype(np.float32)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    (root / "notes.txt").write_text("not audio, not scanned")
    return root


def _outputs(out: Path) -> dict[str, tuple[int, int]]:
    """Every .npy under out -> (inode, mtime_ns); a rewrite (tmp + rename) always changes the inode."""
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.npy")}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_find_audio_files(data, tmp_path):
    items = find_audio_files([data])
    assert [i.file for i in items] == sorted(BAD + GOOD)  # notes.txt is not audio
    assert "sub/c.wav" not in [i.file for i in find_audio_files([data], recursive=False)]
    # a file given directly and again through its folder is kept once, under its first name
    assert [i.file for i in find_audio_files([data / "a.wav", data])].count("a.wav") == 1
    with pytest.raises(FileNotFoundError, match="nope"):
        find_audio_files([tmp_path / "nope"])
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in "xy":
        sf.write(tmp_path / d / "same.wav", np.zeros(1600), 16000)
    with pytest.raises(ExtractError, match="same outputs"):
        find_audio_files([tmp_path / "x" / "same.wav", tmp_path / "y" / "same.wav"])


def test_shared_finder_keeps_a_missing_file_when_asked(data, tmp_path):
    """captioning.caption reports a missing file with the unreadable ones: the shared finder keeps it."""
    from m2dclap.audio_files import find_audio_files as find

    items = find([tmp_path / "gone.wav", data / "sub"], keep_missing=True)
    assert [i.path for i in items] == [tmp_path / "gone.wav", data / "sub" / "c.wav"]
    assert [i.file for i in items] == ["gone.wav", "c.wav"]


def test_cli_extracts_reports_and_resumes(model, ckpt, data, tmp_path, capsys):
    out = tmp_path / "feats"
    rc = main([str(data), "--checkpoint", ckpt, "--out", str(out), "--batch-size", "3", "--features", "all"])
    captured = capsys.readouterr()
    assert rc == 1  # files were skipped
    assert f"extracted 4 files, 3 failed (see {out / 'errors.csv'})" in captured.out
    for bad in BAD:  # every bad file is named on stderr, with a reason
        assert str(data / bad) in captured.err

    D, FD = model.cfg.encoder.embed_dim, model.cfg.encoder.grid_size[0] * model.cfg.encoder.embed_dim
    for name in GOOD:
        key = name[:-4]
        wave = m2dclap.load_audio(data / name, model.sample_rate)
        ref = model.audio_features(wave, model.sample_rate)
        clip, frame, clap = (np.load(out / k / f"{key}.npy") for k in ("clip", "frame", "clap"))
        assert clip.dtype == frame.dtype == clap.dtype == np.float32
        assert clip.shape == (FD,) and clap.shape == (D,) and frame.shape[1] == FD
        stft_frames = len(wave) // model.cfg.frontend.hop_length + 1  # centred STFT
        assert frame.shape[0] == ref["frame"].shape[1] == -(-stft_frames // model.cfg.encoder.patch_size[1])
        np.testing.assert_allclose(clip, ref["clip"][0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(frame, ref["frame"][0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(clap, model.encode_audio(wave, model.sample_rate)[0].numpy(), rtol=1e-4, atol=1e-5)
    for bad in BAD:
        assert not list(out.rglob(bad[:-4] + ".npy"))

    index = {r["file"]: r for r in _csv(out / "index.csv")}
    assert list(index) == sorted(GOOD + BAD)
    assert {f for f, r in index.items() if r["status"] == "ok"} == set(GOOD)
    assert float(index["sub/c.wav"]["duration_s"]) == pytest.approx(1.0, abs=1e-3)
    assert int(index["b.wav"]["n_frames"]) == np.load(out / "frame" / "b.npy").shape[0]
    errors = {r["file"]: r["error"] for r in _csv(out / "errors.csv")}
    assert set(errors) == set(BAD)
    assert "zero samples" in errors["empty.wav"] and "NaN" in errors["nan.wav"]
    assert "cannot decode" in errors["corrupt.wav"] and str(data / "corrupt.wav") in errors["corrupt.wav"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["checkpoint"] == str(Path(ckpt).resolve()) and meta["model"] == "tiny"
    assert meta["features"] == ["clip", "frame", "clap"] and meta["dtype"] == "float32"
    assert meta["frame_hop_s"] == pytest.approx(0.16)

    # resume: delete one output; only that file is recomputed, the others are not touched
    before = _outputs(out)
    old_clap = np.load(out / "clap" / "sub" / "c.npy")
    (out / "clap" / "sub" / "c.npy").unlink()
    rc = main([str(data), "--checkpoint", ckpt, "--out", str(out), "--batch-size", "3"])
    captured = capsys.readouterr()
    assert rc == 1 and "extracted 4 files (3 already done), 3 failed" in captured.out
    after = _outputs(out)
    assert set(after) == set(before)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"clip/sub/c.npy", "frame/sub/c.npy", "clap/sub/c.npy"}
    np.testing.assert_allclose(np.load(out / "clap" / "sub" / "c.npy"), old_clap, rtol=1e-5, atol=1e-6)
    assert {r["file"] for r in _csv(out / "index.csv")} == set(GOOD + BAD)
    assert {r["file"] for r in _csv(out / "errors.csv")} == set(BAD)


def test_cli_usage_errors(ckpt, data, tmp_path, capsys):
    missing = tmp_path / "missing.wav"
    assert main([str(missing), "--checkpoint", ckpt, "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main([str(data), "--checkpoint", str(tmp_path / "no-ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert main([str(data), "--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--features", "clop"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--checkpoint",
        "--out",
        "--features",
        "--batch-size",
        "--device",
        "--dtype",
        "--recursive",
        "--no-recursive",
        "--overwrite",
        "index.csv",
        "errors.csv",
        "meta.json",
    ):
        assert option in text


def test_cli_all_failed_exit_1(ckpt, data, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main([str(data / b) for b in BAD] + ["--checkpoint", ckpt, "--out", str(out), "--features", "clip"])
    assert rc == 1
    assert "extracted 0 files, 3 failed" in capsys.readouterr().out
    assert {r["file"] for r in _csv(out / "errors.csv")} == set(BAD)


def test_resume_after_kill_matches_uninterrupted_run(model, data, tmp_path, monkeypatch):
    items = find_audio_files([data])
    ref = tmp_path / "ref"
    extract_features(model, items, ref, "all", batch_size=2, progress=False)

    out = tmp_path / "out"
    calls = {"n": 0}
    real = model.audio_features

    def killed_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "audio_features", killed_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, items, out, "all", batch_size=2, progress=False)
    monkeypatch.undo()
    partial = _outputs(out)
    assert 0 < len(partial) < len(_outputs(ref))
    # the ledgers were kept up to date while it ran: finished files are listed, failures already explained
    done = {r["file"] for r in _csv(out / "index.csv") if r["status"] == "ok"}
    assert done == {"a.wav", "b.wav", "stereo.wav"} and len(partial) == 3 * len(done)
    assert {"corrupt.wav", "empty.wav"} <= {r["file"] for r in _csv(out / "errors.csv")}
    # what a kill -9 can leave: a half-written temporary array and an index row cut short
    (out / "clip" / ".b.npy.abc123.tmp").write_bytes(b"\x93NUMPY half")
    with open(out / "index.csv", "a") as f:
        f.write("sub/c.wav,1.0")

    summary = extract_features(model, items, out, "all", batch_size=3, progress=False)
    assert summary.skipped == len(partial) // 3 and summary.failed == len(BAD)
    assert not list(out.rglob("*.tmp"))
    assert set(_outputs(out)) == set(_outputs(ref))
    for rel in _outputs(ref):  # batches differ between the runs: equal up to float rounding
        np.testing.assert_allclose(np.load(out / rel), np.load(ref / rel), rtol=1e-5, atol=1e-6)
    for name in ("index.csv", "errors.csv", "meta.json"):
        assert (out / name).read_text() == (ref / name).read_text(), name


def test_bfloat16_outputs_float32_and_refuses_mixing(model, data, tmp_path):
    items = [i for i in find_audio_files([data]) if i.file in ("a.wav", "b.wav")]
    stats = model.norm_stats.clone()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.norm_stats, stats) and bf16.norm_stats.dtype == torch.float32
    out = tmp_path / "bf16"
    summary = extract_features(bf16, items, out, "clip,clap", batch_size=2, checkpoint="ck", progress=False)
    assert summary.extracted == 2 and not (out / "frame").exists()
    clip = np.load(out / "clip" / "b.npy")
    assert clip.dtype == np.float32
    ref = model.audio_features(m2dclap.load_audio(data / "b.wav", 16000))["clip"][0].numpy()
    assert np.abs(clip - ref).max() < 0.1 * np.abs(ref).max()  # bf16 compute, same features
    assert json.loads((out / "meta.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ExtractError, match="dtype"):  # float32 features must not join a bf16 folder
        extract_features(model, items, out, "clip", checkpoint="ck", progress=False)
    before = _outputs(out)
    assert extract_features(model, items, out, "clip", checkpoint="ck", overwrite=True, progress=False).extracted == 2
    assert json.loads((out / "meta.json").read_text())["dtype"] == "float32"
    after = _outputs(out)
    assert {k for k in after if after[k] != before[k]} == {"clip/a.npy", "clip/b.npy"}  # clap/ is left as it was
    np.testing.assert_allclose(np.load(out / "clip" / "b.npy"), ref, rtol=1e-5, atol=1e-6)
