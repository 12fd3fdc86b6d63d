"""One bad clip never takes down a run: every command that reads many audio files skips an undecodable,
empty, NaN or too-short (1 or 100 samples, under one STFT window) file, names it, and exits 1; bad requests
exit 2 before any model loads and leave existing outputs as they were."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import m2dclap
from conftest import minilm_path, tone
from m2dclap.data.manifest import Record, write_manifest
from m2dclap.embed_files import AudioBatches, load_clip, min_samples_of, report_skipped

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
SHORT = ("one.wav", "hundred.wav")  # 1 and 100 samples: shorter than the 201 the frontend needs
BAD = SHORT + ("empty.wav", "nan.wav", "corrupt.wav")
REASONS = {"one.wav": "too short", "hundred.wav": "too short", "empty.wav": "zero samples", "nan.wav": "NaN",
           "corrupt.wav": "cannot decode"}


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[str, Path]:
    """Three good tones and one file of each bad kind, by name."""
    root = tmp_path_factory.mktemp("audio")
    files = {}
    for n, freq in enumerate((330.0, 550.0, 880.0)):
        files[f"good{n}.wav"] = root / f"good{n}.wav"
        sf.write(files[f"good{n}.wav"], tone(0.6, SR, freq, seed=n).numpy(), SR)
    sf.write(root / "one.wav", np.full(1, 0.1, np.float32), SR)
    sf.write(root / "hundred.wav", tone(100 / SR, SR).numpy(), SR)
    sf.write(root / "empty.wav", np.zeros(0, np.float32), SR)
    nan = tone(0.3, SR).numpy()
    nan[50] = np.nan
    sf.write(root / "nan.wav", nan, SR, subtype="FLOAT")
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00not a wave file")
    for name in BAD:
        files[name] = root / name
    return files


@pytest.fixture(scope="module")
def good(audio) -> list[Path]:
    return [audio[f"good{n}.wav"] for n in range(3)]


@pytest.fixture(scope="module")
def clap_model():
    """A tiny CLAP with the packaged MiniLM text tower (zero-shot and retrieval need text)."""
    minilm_path()
    torch.manual_seed(0)
    return m2dclap.create_model("tiny").eval()


@pytest.fixture(scope="module")
def clap_ckpt(clap_model, tmp_path_factory) -> Path:
    return clap_model.save_pretrained(tmp_path_factory.mktemp("clap") / "tiny")


@pytest.fixture(scope="module")
def audio_ckpt(tmp_path_factory) -> Path:
    """A tiny audio-only model (extract, linear_eval, captioning's CLAP)."""
    torch.manual_seed(0)
    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    return model.save_pretrained(tmp_path_factory.mktemp("audio_ckpt") / "tiny")


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(path: Path, files: list[Path], split: str = "test", captions: bool = True,
             labels: bool = True) -> Path:
    records = [Record(id=f.stem, audio=f, captions=[f"a tone number {n}", f"sound {n}"] if captions else [],
                      labels=["low" if n % 2 else "high"] if labels else [], split=split)
               for n, f in enumerate(files)]
    return write_manifest(records, path)


def no_model_load(monkeypatch):
    """Make any model load fail the test: bad requests must be refused before it."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded for a request that should have been refused")
    monkeypatch.setattr(m2dclap.checkpoint, "load", refuse)
    monkeypatch.setattr(m2dclap, "load", refuse)


# ----------------------------------------------------------------------------------------------- the shared reader
def test_audio_batches_skip_every_bad_kind_by_name(audio, good):
    paths = [good[0], audio["one.wav"], audio["empty.wav"], good[1], audio["hundred.wav"], audio["nan.wav"],
             audio["corrupt.wav"], good[2]]
    batches = AudioBatches(paths, SR, min_samples=201, batch_size=2, workers=2)
    seen = list(batches)
    assert len(seen) == 4 and all(len(b.indices) + len(b.skipped) == 2 for b in seen)
    assert [i for b in seen for i in b.indices] == [0, 3, 7]
    assert [b.waves for b in seen][2] == []  # a batch whose files were all bad has no waves
    assert [Path(p).name for p, _ in batches.skipped] == ["one.wav", "empty.wav", "hundred.wav", "nan.wav",
                                                          "corrupt.wav"]
    for path, reason in batches.skipped:
        assert path in reason and REASONS[Path(path).name] in reason
    assert report_skipped([]) == 0 and report_skipped(batches.skipped) == 1


def test_min_samples_follow_the_frontend_and_rate(clap_model, audio):
    assert min_samples_of(clap_model) == clap_model.cfg.frontend.min_samples == 201
    assert min_samples_of(clap_model, 24000) == 302  # read at 24 kHz, resampled to 16 kHz later: still >= 201
    with pytest.raises(m2dclap.AudioError, match="hundred.wav: too short: 100 sample"):
        load_clip(audio["hundred.wav"], SR, 201)
    padded = load_clip(audio["one.wav"], SR, 201, transform=lambda i, w: torch.nn.functional.pad(w, (0, 400)))
    assert padded.shape == (401,)


# ----------------------------------------------------------------------------------------------- m2dclap.extract
def test_extract_skips_short_and_bad_files_and_exits_1(audio, good, audio_ckpt, tmp_path, capsys):
    from m2dclap.extract import main

    out = tmp_path / "feats"
    rc = main([str(p) for p in good] + [str(audio[b]) for b in BAD]
              + ["--checkpoint", str(audio_ckpt), "--out", str(out), "--features", "clip", "--batch-size", "2", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    for name in BAD:
        assert str(audio[name]) in err
    with open(out / "errors.csv", newline="") as f:
        errors = {r["file"]: r["error"] for r in csv.DictReader(f)}
    assert set(errors) == set(BAD) and all(REASONS[n] in errors[n] for n in BAD)
    assert sorted(p.name for p in (out / "clip").glob("*.npy")) == ["good0.npy", "good1.npy", "good2.npy"]


def test_extract_out_existing_file_is_refused_before_loading(good, audio_ckpt, tmp_path, capsys, monkeypatch):
    from m2dclap.extract import main

    no_model_load(monkeypatch)
    target = tmp_path / "feats.npy"
    target.write_bytes(b"keep me")
    before = folder_hashes(tmp_path)
    assert main([str(good[0]), "--checkpoint", str(audio_ckpt), "--out", str(target)]) == 2
    assert f"--out {target}: exists and is not a folder" in capsys.readouterr().err
    assert folder_hashes(tmp_path) == before


# ----------------------------------------------------------------------------------------------- linear_eval
def _probe_manifest(path: Path, good_dir: Path, extra: list[Path] = ()) -> Path:
    """8 good clips (train 4, val 2, test 2) plus ``extra`` train clips."""
    rows = []
    for n in range(8):
        f = good_dir / f"le{n}.wav"
        sf.write(f, tone(0.5, SR, 300.0 + 150 * (n % 2), seed=n).numpy(), SR)
        rows.append(Record(id=f.stem, audio=f, labels=["low" if n % 2 else "high"],
                           split="train" if n < 4 else "val" if n < 6 else "test"))
    rows += [Record(id=f.stem, audio=f, labels=["high"], split="train") for f in extra]
    return write_manifest(rows, path)


def test_linear_eval_batch_size_dividing_the_clip_count_calls_no_empty_batch(audio_ckpt, tmp_path, caplog):
    from m2dclap import linear_eval as le

    data = _probe_manifest(tmp_path / "m.csv", tmp_path)
    with caplog.at_level(logging.INFO, logger="m2dclap"):
        rc = le.main(["--checkpoint", str(audio_ckpt), "--data", str(data), "--batch-size", "4", "--epochs", "2",
                      "--out", str(tmp_path / "r.json"), "--quiet"])
    assert rc == 0
    assert "a batch of 0" not in caplog.text and "non-empty TensorList" not in caplog.text
    assert json.loads((tmp_path / "r.json").read_text())["n_bad"] == 0


def test_linear_eval_skips_short_clips_when_not_padding(audio, audio_ckpt, tmp_path, capsys):
    from m2dclap import linear_eval as le

    data = _probe_manifest(tmp_path / "m.csv", tmp_path, [audio[n] for n in SHORT])
    rc = le.main(["--checkpoint", str(audio_ckpt), "--data", str(data), "--batch-size", "3", "--epochs", "2",
                  "--unit-seconds", "0", "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and all(str(audio[n]) in err for n in SHORT)
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["n_bad"] == 2 and all("too short" in b["error"] for b in res["bad_files"])
    # cut to a unit length, a short clip is padded with zeros (EVAR), not skipped
    rc = le.main(["--checkpoint", str(audio_ckpt), "--data", str(data), "--batch-size", "3", "--epochs", "2",
                  "--unit-seconds", "0.5", "--out", str(tmp_path / "r.json"), "--quiet"])
    assert rc == 0 and json.loads((tmp_path / "r.json").read_text())["n_train"] == 6


# ----------------------------------------------------------------------------------------------- zeroshot
def test_zeroshot_classify_skips_every_bad_kind(audio, good, clap_ckpt, capsys):
    from zeroshot import classify

    rc = classify.main([str(p) for p in good] + [str(audio[b]) for b in BAD]
                       + ["--checkpoint", str(clap_ckpt), "--labels", "tone,noise", "--json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1
    assert [json.loads(line)["file"] for line in captured.out.splitlines()] == [str(p) for p in good]
    for name in BAD:
        assert str(audio[name]) in captured.err


def test_zeroshot_evaluate_counts_skipped_clips_and_exits_1(audio, good, clap_ckpt, tmp_path, capsys):
    from zeroshot import evaluate

    data = manifest(tmp_path / "m.csv", good + [audio[n] for n in SHORT])
    out = tmp_path / "zs.json"
    rc = evaluate.main(["--checkpoint", str(clap_ckpt), "--dataset", "manifest", "--manifest", str(data),
                        "--task", "single", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and all(str(audio[n]) in err for n in SHORT)
    res = json.loads(out.read_text())
    assert res["n_clips"] == 3 and res["n_skipped"] == 2 and res["n_failed_files"] == 2
    assert {Path(f["path"]).name for f in res["failed_files"]} == set(SHORT)


# ----------------------------------------------------------------------------------------------- retrieval
def test_retrieval_evaluate_skips_short_clips_and_exits_1(audio, good, clap_ckpt, tmp_path, capsys):
    from retrieval import evaluate

    data = manifest(tmp_path / "m.csv", good + [audio[n] for n in SHORT])
    out = tmp_path / "r.json"
    rc = evaluate.main(["--checkpoint", str(clap_ckpt), "--dataset", "manifest", "--root", str(data),
                        "--out", str(out), "--no-cache", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1 and all(str(audio[n]) in captured.err for n in SHORT)
    res = json.loads(out.read_text())
    assert res["n_clips"] == 3 and res["skipped"]["count"] == 2
    assert all("too short" in m for m in res["skipped"]["files"])
    assert "2 skipped clip(s)" in captured.out


def test_retrieval_evaluate_without_captions_is_bad_input(good, clap_ckpt, tmp_path, capsys, monkeypatch):
    from retrieval import evaluate

    no_model_load(monkeypatch)
    data = manifest(tmp_path / "m.csv", good, captions=False)
    out = tmp_path / "r.json"
    out.write_text('{"from": "an earlier run"}')
    before = folder_hashes(tmp_path)
    rc = evaluate.main(["--checkpoint", str(clap_ckpt), "--dataset", "manifest", "--root", str(data),
                        "--out", str(out), "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and str(data) in err and "no clip has a caption" in err
    assert folder_hashes(tmp_path) == before


def test_retrieval_finetune_treats_short_clips_as_bad_audio(audio, good, clap_model, tmp_path):
    from retrieval import finetune

    recs = [Record(id=p.stem, audio=p, captions=["a tone"], split="train") for p in [good[0], audio["one.wav"]]]
    ds = finetune.CaptionedClips(recs, SR, 1.0, sample="clips", min_samples=min_samples_of(clap_model))
    batch = finetune.collate([ds[0], ds[1]])
    assert len(batch["waves"]) == 1 and batch["skipped"] == [str(audio["one.wav"])]
    strict = finetune.CaptionedClips(recs, SR, 1.0, sample="clips", on_bad_audio="fail",
                                     min_samples=min_samples_of(clap_model))
    with pytest.raises(m2dclap.AudioError, match="one.wav: too short"):
        strict[1]
    # validation embeds whole clips through the same reader: the short clip is left out by name
    val = [Record(id=p.stem, audio=p, captions=[f"tone {p.stem}"]) for p in good + [audio["hundred.wav"]]]
    one_process = SimpleNamespace(num_processes=1, process_index=0)
    results = finetune.validate(one_process, clap_model, [("val", val)], batch_size=2)
    assert [Path(r.split(":")[0]).name for r in results["val"]["skipped"]] == ["hundred.wav"]
    assert 0.0 <= results["val"]["text_to_audio"]["mAP@10"] <= 1.0


# ----------------------------------------------------------------------------------------------- captioning
@pytest.fixture(scope="module")
def caption_ckpt(audio_ckpt, tmp_path_factory) -> Path:
    """An untrained tiny EnCLAP with the settings a training run records (random codec, the tiny CLAP)."""
    pytest.importorskip("encodec", reason="the encodec package is not installed")
    from captioning.data import build_word_tokenizer
    from captioning.model import EnClapCaptioner, EnClapCfg
    from captioning.train import CKPT_META, TINY_BART

    ck = tmp_path_factory.mktemp("enclap") / "epoch_001"
    tok = build_word_tokenizer(["a tone is heard", "a high tone", "a low hum"])
    torch.manual_seed(0)
    cfg = EnClapCfg(bart_name="tiny", bart_config={**TINY_BART, "vocab_size": len(tok)},
                    clap_dim=m2dclap.get_model_config("tiny").encoder.embed_dim)
    EnClapCaptioner(cfg, tokenizer=tok).save_pretrained(ck)
    (ck / CKPT_META).write_text(json.dumps({"codec": "random", "bandwidth": 12.0, "clap": "m2d-clap",
                                            "clap_checkpoint": str(audio_ckpt)}))
    return ck


def test_caption_skips_short_clips_and_writes_the_others(audio, good, caption_ckpt, tmp_path, capsys):
    from captioning import caption
    from captioning.metrics import read_predictions_csv

    out = tmp_path / "p.csv"
    rc = caption.main([str(p) for p in good] + [str(audio[n]) for n in SHORT]
                      + ["--checkpoint", str(caption_ckpt), "--num-beams", "1", "--max-length", "5",
                         "--batch-size", "2", "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1 and all(str(audio[n]) in captured.err and "too short" in captured.err for n in SHORT)
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [str(p) for p in good]
    assert sorted(read_predictions_csv(out)) == [p.name for p in good]


def test_caption_refuses_same_name_inputs_with_out(good, tmp_path, capsys, monkeypatch):
    from captioning import caption

    for d in "ab":
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.wav").write_bytes(good[0].read_bytes())
    out = tmp_path / "P.csv"
    out.write_text("file_name,caption\nold.wav,an earlier caption\n")
    before = folder_hashes(tmp_path)
    monkeypatch.setattr(caption, "Captioner", lambda *a, **k: pytest.fail("models loaded before the refusal"))
    rc = caption.main([str(tmp_path / "a" / "x.wav"), str(tmp_path / "b" / "x.wav"), "--checkpoint",
                       str(tmp_path / "none"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "share a name" in err
    assert str(tmp_path / "a" / "x.wav") in err and str(tmp_path / "b" / "x.wav") in err
    assert folder_hashes(tmp_path) == before


def _preprocess_argv(data: Path, out: Path, clap: Path, codec: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--clap-checkpoint", str(clap), "--codec", codec,
            "--no-progress", "--batch-size", "2", "--device", "cpu"]


def test_preprocess_skips_short_clips_by_name(audio, good, audio_ckpt, tmp_path, capsys):
    pytest.importorskip("encodec", reason="the encodec package is not installed")
    from captioning import preprocess as pp

    data = manifest(tmp_path / "m.csv", good + [audio[n] for n in SHORT])
    out = tmp_path / "cache"
    assert pp.main(_preprocess_argv(data, out, audio_ckpt, "random")) == 1
    err = capsys.readouterr().err
    assert all(str(audio[n]) in err for n in SHORT)
    with open(out / pp.ERRORS_NAME, newline="") as f:
        errors = list(csv.DictReader(f))
    assert sorted(e["id"] for e in errors) == ["hundred", "one"] and all("too short" in e["error"] for e in errors)
    assert sorted(p.stem for p in (out / "tokens").glob("*.npy")) == ["good0", "good1", "good2"]


def test_preprocess_retry_after_a_failed_pretrained_codec_load(good, audio_ckpt, tmp_path, capsys, monkeypatch):
    pytest.importorskip("encodec", reason="the encodec package is not installed")
    from captioning import codec
    from captioning import preprocess as pp

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(codec, "_hub_dir", lambda: tmp_path / "empty-hub")  # the weights are not cached
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    data = manifest(tmp_path / "m.csv", good)
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = folder_hashes(out)
    assert pp.main(_preprocess_argv(data, out, audio_ckpt, "pretrained")) == 2
    assert "cannot download the EnCodec 24 kHz weights" in capsys.readouterr().err
    assert folder_hashes(out) == before  # no preprocess.json binding the folder to 'pretrained'
    assert pp.main(_preprocess_argv(data, out, audio_ckpt, "random")) == 0
    assert json.loads((out / pp.META_NAME).read_text())["codec"] == "random"
    assert len(list((out / "tokens").glob("*.npy"))) == 3
