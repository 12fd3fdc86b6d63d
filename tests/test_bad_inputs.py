"""Bad input never loses data or kills a run (issue 10). Every case asserts the exit status (0 ok, 1 finished
with reported skips, 2 bad input or usage), that the message names the file, line or field, and, where the
command writes anything, that what existed before is byte-identical afterwards.

Sections: audio files (undecodable, empty, NaN, shorter than one STFT window) through every command that reads
many files; data and folders (the synthetic corpus never overwrites, finished runs stay finished, the umask,
CSV bytes and quotes); models (config.json fields, wrong-kind and damaged weight files, unreachable text models).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import m2dclap
from m2dclap.checkpoint import CheckpointError
from m2dclap.data.manifest import Record, read_manifest, write_manifest
from m2dclap.data.synthetic import generate_corpus
from m2dclap.embed_files import AudioBatches, load_clip, min_samples_of, report_skipped
from m2dclap.extract import main as extract_main

from conftest import minilm_path, tiny_audio_model, tone, write_wav

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with its content hash (folders: "dir")."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


# ===========================================================================================================
# Audio files: one bad clip never takes down a run
# ===========================================================================================================
SR = 16000
SHORT = ("one.wav", "hundred.wav")  # 1 and 100 samples: shorter than the 201 the frontend needs
BAD = SHORT + ("empty.wav", "nan.wav", "corrupt.wav")
REASONS = {
    "one.wav": "too short",
    "hundred.wav": "too short",
    "empty.wav": "zero samples",
    "nan.wav": "NaN",
    "corrupt.wav": "cannot decode",
}


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
    return tiny_audio_model().save_pretrained(tmp_path_factory.mktemp("audio_ckpt") / "tiny")


def manifest(path: Path, files: list[Path], split: str = "test", captions: bool = True, labels: bool = True) -> Path:
    records = [
        Record(
            id=f.stem,
            audio=f,
            captions=[f"a tone number {n}", f"sound {n}"] if captions else [],
            labels=["low" if n % 2 else "high"] if labels else [],
            split=split,
        )
        for n, f in enumerate(files)
    ]
    return write_manifest(records, path)


def no_model_load(monkeypatch):
    """Make any model load fail the test: bad requests must be refused before it."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded for a request that should have been refused")

    monkeypatch.setattr(m2dclap.checkpoint, "load", refuse)
    monkeypatch.setattr(m2dclap, "load", refuse)


# ----------------------------------------------------------------------------------------------- the shared reader
def test_audio_batches_skip_every_bad_kind_by_name(audio, good):
    paths = [
        good[0],
        audio["one.wav"],
        audio["empty.wav"],
        good[1],
        audio["hundred.wav"],
        audio["nan.wav"],
        audio["corrupt.wav"],
        good[2],
    ]
    batches = AudioBatches(paths, SR, min_samples=201, batch_size=2, workers=2)
    seen = list(batches)
    assert len(seen) == 4 and all(len(b.indices) + len(b.skipped) == 2 for b in seen)
    assert [i for b in seen for i in b.indices] == [0, 3, 7]
    assert [b.waves for b in seen][2] == []  # a batch whose files were all bad has no waves
    assert [Path(p).name for p, _ in batches.skipped] == [
        "one.wav",
        "empty.wav",
        "hundred.wav",
        "nan.wav",
        "corrupt.wav",
    ]
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
    rc = main(
        [str(p) for p in good]
        + [str(audio[b]) for b in BAD]
        + ["--checkpoint", str(audio_ckpt), "--out", str(out), "--features", "clip", "--batch-size", "2", "-q"]
    )
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
    before = snapshot(tmp_path)
    assert main([str(good[0]), "--checkpoint", str(audio_ckpt), "--out", str(target)]) == 2
    assert f"--out {target}: exists and is not a folder" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------- linear_eval
def _probe_manifest(path: Path, good_dir: Path, extra: list[Path] = ()) -> Path:
    """8 good clips (train 4, val 2, test 2) plus ``extra`` train clips."""
    rows = []
    for n in range(8):
        f = good_dir / f"le{n}.wav"
        sf.write(f, tone(0.5, SR, 300.0 + 150 * (n % 2), seed=n).numpy(), SR)
        rows.append(
            Record(
                id=f.stem,
                audio=f,
                labels=["low" if n % 2 else "high"],
                split="train" if n < 4 else "val" if n < 6 else "test",
            )
        )
    rows += [Record(id=f.stem, audio=f, labels=["high"], split="train") for f in extra]
    return write_manifest(rows, path)


def _linear_eval(checkpoint: Path, data: Path, out: Path, batch_size: int, *extra: str) -> int:
    """m2dclap.linear_eval on ``data`` for 2 epochs, quiet, its JSON written to ``out``."""
    from m2dclap import linear_eval as le

    argv = ["--checkpoint", str(checkpoint), "--data", str(data), "--batch-size", str(batch_size), "--epochs", "2"]
    return le.main([*argv, *extra, "--out", str(out), "--quiet"])


def test_linear_eval_batch_size_dividing_the_clip_count_calls_no_empty_batch(audio_ckpt, tmp_path, caplog):
    data = _probe_manifest(tmp_path / "m.csv", tmp_path)
    with caplog.at_level(logging.INFO, logger="m2dclap"):
        rc = _linear_eval(audio_ckpt, data, tmp_path / "r.json", 4)
    assert rc == 0
    assert "a batch of 0" not in caplog.text and "non-empty TensorList" not in caplog.text
    assert json.loads((tmp_path / "r.json").read_text())["n_bad"] == 0


def test_linear_eval_skips_short_clips_when_not_padding(audio, audio_ckpt, tmp_path, capsys):
    data = _probe_manifest(tmp_path / "m.csv", tmp_path, [audio[n] for n in SHORT])
    rc = _linear_eval(audio_ckpt, data, tmp_path / "r.json", 3, "--unit-seconds", "0")
    err = capsys.readouterr().err
    assert rc == 1 and all(str(audio[n]) in err for n in SHORT)
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["n_bad"] == 2 and all("too short" in b["error"] for b in res["bad_files"])
    # cut to a unit length, a short clip is padded with zeros (EVAR), not skipped
    rc = _linear_eval(audio_ckpt, data, tmp_path / "r.json", 3, "--unit-seconds", "0.5")
    assert rc == 0 and json.loads((tmp_path / "r.json").read_text())["n_train"] == 6


# ----------------------------------------------------------------------------------------------- zeroshot
def test_zeroshot_classify_skips_every_bad_kind(audio, good, clap_ckpt, capsys):
    from zeroshot import classify

    rc = classify.main(
        [str(p) for p in good]
        + [str(audio[b]) for b in BAD]
        + ["--checkpoint", str(clap_ckpt), "--labels", "tone,noise", "--json", "--quiet"]
    )
    captured = capsys.readouterr()
    assert rc == 1
    assert [json.loads(line)["file"] for line in captured.out.splitlines()] == [str(p) for p in good]
    for name in BAD:
        assert str(audio[name]) in captured.err


def test_zeroshot_evaluate_counts_skipped_clips_and_exits_1(audio, good, clap_ckpt, tmp_path, capsys):
    from zeroshot import evaluate

    data = manifest(tmp_path / "m.csv", good + [audio[n] for n in SHORT])
    out = tmp_path / "zs.json"
    rc = evaluate.main(
        [
            "--checkpoint",
            str(clap_ckpt),
            "--dataset",
            "manifest",
            "--manifest",
            str(data),
            "--task",
            "single",
            "--out",
            str(out),
            "--quiet",
        ]
    )
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
    rc = evaluate.main(
        [
            "--checkpoint",
            str(clap_ckpt),
            "--dataset",
            "manifest",
            "--root",
            str(data),
            "--out",
            str(out),
            "--no-cache",
            "--device",
            "cpu",
        ]
    )
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
    before = snapshot(tmp_path)
    rc = evaluate.main(
        ["--checkpoint", str(clap_ckpt), "--dataset", "manifest", "--root", str(data), "--out", str(out), "--no-cache"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and str(data) in err and "no clip has a caption" in err
    assert snapshot(tmp_path) == before


def test_retrieval_finetune_treats_short_clips_as_bad_audio(audio, good, clap_model, tmp_path):
    from retrieval import finetune

    recs = [Record(id=p.stem, audio=p, captions=["a tone"], split="train") for p in [good[0], audio["one.wav"]]]
    ds = finetune.CaptionedClips(recs, SR, 1.0, sample="clips", min_samples=min_samples_of(clap_model))
    batch = finetune.collate([ds[0], ds[1]])
    assert len(batch["waves"]) == 1 and batch["skipped"] == [str(audio["one.wav"])]
    strict = finetune.CaptionedClips(
        recs, SR, 1.0, sample="clips", on_bad_audio="fail", min_samples=min_samples_of(clap_model)
    )
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
    cfg = EnClapCfg(
        bart_name="tiny",
        bart_config={**TINY_BART, "vocab_size": len(tok)},
        clap_dim=m2dclap.get_model_config("tiny").encoder.embed_dim,
    )
    EnClapCaptioner(cfg, tokenizer=tok).save_pretrained(ck)
    (ck / CKPT_META).write_text(
        json.dumps({"codec": "random", "bandwidth": 12.0, "clap": "m2d-clap", "clap_checkpoint": str(audio_ckpt)})
    )
    return ck


def test_caption_skips_short_clips_and_writes_the_others(audio, good, caption_ckpt, tmp_path, capsys):
    from captioning import caption
    from captioning.metrics import read_predictions_csv

    out = tmp_path / "p.csv"
    rc = caption.main(
        [str(p) for p in good]
        + [str(audio[n]) for n in SHORT]
        + [
            "--checkpoint",
            str(caption_ckpt),
            "--num-beams",
            "1",
            "--max-length",
            "5",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
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
    before = snapshot(tmp_path)
    monkeypatch.setattr(caption, "Captioner", lambda *a, **k: pytest.fail("models loaded before the refusal"))
    rc = caption.main(
        [
            str(tmp_path / "a" / "x.wav"),
            str(tmp_path / "b" / "x.wav"),
            "--checkpoint",
            str(tmp_path / "none"),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "share a name" in err
    assert str(tmp_path / "a" / "x.wav") in err and str(tmp_path / "b" / "x.wav") in err
    assert snapshot(tmp_path) == before


def _preprocess_argv(data: Path, out: Path, clap: Path, codec: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--clap-checkpoint",
        str(clap),
        "--codec",
        codec,
        "--no-progress",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]


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

    not_cached = tmp_path / "empty-hub" / codec.CHECKPOINT_NAME  # the published weights are not cached
    monkeypatch.setattr(codec, "pretrained_checkpoint_path", lambda: not_cached)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    data = manifest(tmp_path / "m.csv", good)
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert pp.main(_preprocess_argv(data, out, audio_ckpt, "pretrained")) == 2
    assert "cannot download the EnCodec 24 kHz weights" in capsys.readouterr().err
    assert snapshot(out) == before  # no preprocess.json binding the folder to 'pretrained'
    assert pp.main(_preprocess_argv(data, out, audio_ckpt, "random")) == 0
    assert json.loads((out / pp.META_NAME).read_text())["codec"] == "random"
    assert len(list((out / "tokens").glob("*.npy"))) == 3


# ===========================================================================================================
# Data and folders: never destroy what the user has; CSV errors name the file and the line
# ===========================================================================================================
# ------------------------------------------------------------------------ the synthetic corpus never overwrites


def _foreign_manifest(folder: Path) -> str:
    write_wav(folder / "clips" / "mine.wav")
    (folder / "manifest.csv").write_text("audio,caption\nclips/mine.wav,my own recording\n")
    return "manifest.csv"


def _other_files(folder: Path) -> str:
    (folder / "notes.txt").write_text("field notes\n")
    write_wav(folder / "audio" / "take1.wav")
    return "notes.txt"


def _corpus_of_another_size(folder: Path) -> str:
    generate_corpus(folder, n_clips=6, seed=0)
    return "6 clips"


FOLDERS = {"foreign-manifest": _foreign_manifest, "other-files": _other_files, "another-size": _corpus_of_another_size}


@pytest.mark.parametrize("kind", FOLDERS)
def test_datasets_synthetic_refuses_a_folder_that_is_not_the_corpus(kind, tmp_path, capsys):
    from retrieval.datasets import main

    folder = tmp_path / "user"
    folder.mkdir()
    shown = FOLDERS[kind](folder)
    before = snapshot(folder)
    with pytest.raises(SystemExit) as info:
        main(["synthetic", "--root", str(folder), "--out", str(tmp_path / "out.csv")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(folder) in err and shown in err and "Traceback" not in err
    assert snapshot(folder) == before and not (tmp_path / "out.csv").exists()


@pytest.fixture(scope="module")
def retrieval_ckpt(tmp_path_factory, minilm):
    torch.manual_seed(0)
    return m2dclap.create_model("tiny").save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.parametrize("kind", FOLDERS)
def test_retrieval_finetune_refuses_a_synthetic_root_that_is_not_the_corpus(kind, retrieval_ckpt, tmp_path, capsys):
    from retrieval.finetune import main

    folder = tmp_path / "user"
    folder.mkdir()
    shown = FOLDERS[kind](folder)
    before = snapshot(folder)
    rc = main(
        [
            "--checkpoint",
            str(retrieval_ckpt),
            "--synthetic-root",
            str(folder),
            "--output-dir",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--tracker",
            "none",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert str(folder) in err and shown in err and "Traceback" not in err
    assert snapshot(folder) == before


def test_synthetic_cli_force_never_writes_into_a_foreign_folder(tmp_path, capsys):
    from m2dclap.data.synthetic import main

    _foreign_manifest(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path), "--n-clips", "3", "--force"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "manifest.csv" in err
    assert snapshot(tmp_path) == before


def test_interrupted_build_of_ours_is_resumed_and_an_empty_folder_built_into(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_manifest(generate_corpus(empty, n_clips=4, seed=0))[0].id == "syn_00000"
    (empty / ".complete").unlink()  # killed before the marker: corpus.json, written first, says it is ours
    (empty / "manifest.csv").unlink()
    (empty / "audio" / "syn_00003.wav").write_bytes(b"half")
    assert len(read_manifest(generate_corpus(empty, n_clips=4, seed=0))) == 4
    assert sf.info(str(empty / "audio" / "syn_00003.wav")).frames > 0


# ------------------------------------------------------------------------------------- stage 1.1 and saving


@pytest.fixture(scope="module")
def stage11(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    manifest = generate_corpus(root / "synthetic", n_clips=40, seed=2)
    init = tiny_audio_model().save_pretrained(root / "init")
    return manifest, init


def test_finetune_resume_of_a_finished_run_is_a_no_op(stage11, tmp_path, capsys, caplog):
    from m2dclap.train.finetune import main

    manifest, init = stage11
    args = [
        "--init",
        str(init),
        "--data",
        str(manifest),
        "--output-dir",
        str(tmp_path),
        "--input-size",
        "80x208",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--log-every",
        "1",
        "--tracker",
        "none",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["val_history"] and summary["final_losses"]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert "already finished at step 2" in caplog.text and str(tmp_path) in caplog.text
    assert json.loads(capsys.readouterr().out)["already_finished"] is True
    after = snapshot(tmp_path)
    assert after["summary.json"] == before["summary.json"]
    assert {k: v for k, v in after.items() if k.startswith(("model", "best"))} == {
        k: v for k, v in before.items() if k.startswith(("model", "best"))
    }


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_model_folders_respect_the_umask(mask, tmp_path):
    from m2dclap.fileio import atomic_write_text
    from m2dclap.train.finetune import AudioTagger, save_finetuned

    model = tiny_audio_model()
    old = os.umask(mask)
    try:
        folder = model.save_pretrained(tmp_path / "model")
        tagged = save_finetuned(model, AudioTagger(model.encoder, 3), ["a", "b", "c"], tmp_path / "stage1.1")
        atomic_write_text(tmp_path / "note.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(folder) == mode(tagged) == 0o777 & ~mask
    for name in ("model.safetensors", "config.json"):
        assert mode(folder / name) == 0o666 & ~mask, name
    assert mode(tagged / "head.safetensors") == mode(tagged / "head.json") == 0o666 & ~mask
    assert mode(tmp_path / "note.json") == 0o666 & ~mask


# --------------------------------------------------------------------------------------------- CSV readers


def test_clotho_id_ending_in_a_space_survives_a_manifest_round_trip(tmp_path, capsys):
    from retrieval.datasets import main

    root = tmp_path / "clotho"
    write_wav(root / "evaluation" / "Heat duct .wav")
    write_wav(root / "evaluation" / "rain.wav")
    cols = ",".join(f"caption_{i}" for i in range(1, 6))
    (root / "clotho_captions_evaluation.csv").write_text(
        f"file_name,{cols}\nHeat duct .wav,{','.join(['air hums in a duct'] * 5)}\n"
        f"rain.wav,{','.join(['rain falls'] * 5)}\n"
    )
    out = tmp_path / "clotho.csv"
    assert main(["clotho", "--root", str(root), "--out", str(out)]) == 0
    records = {r.id: r for r in read_manifest(out)}
    assert set(records) == {"Heat duct ", "rain"}
    assert records["Heat duct "].audio.is_file()


def test_non_utf8_manifest_names_the_file_and_the_line(tmp_path, capsys):
    from retrieval.datasets import main

    write_wav(tmp_path / "a.wav")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"audio,caption\na.wav,fine\na.wav,caf\xe9 noise\n")
    out = tmp_path / "out.csv"
    out.write_text("kept\n")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["manifest", "--root", str(bad), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3" in err and "UTF-8" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_clotho_csv_neither_utf8_nor_cp1252_names_the_file_and_the_line(tmp_path, capsys):
    from retrieval.datasets import main

    root = tmp_path / "clotho"
    csv_path = root / "clotho_captions_evaluation.csv"
    root.mkdir()
    csv_path.write_bytes(b"file_name,caption_1\nx.wav,ok\ny.wav,bad \x81 byte\n")  # 0x81: undefined in cp1252
    with pytest.raises(SystemExit) as info:
        main(["clotho", "--root", str(root), "--out", str(tmp_path / "o.csv")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{csv_path}, line 3" in err and "cp1252" in err
    assert not (tmp_path / "o.csv").exists()


def test_unbalanced_quote_in_references_csv_names_the_file_and_the_line(tmp_path, capsys):
    from captioning.metrics import main

    preds, refs, out = tmp_path / "p.csv", tmp_path / "r.csv", tmp_path / "scores.json"
    preds.write_text("file_name,caption\na.wav,a dog barks\nb.wav,rain falls\nc.wav,a car passes\n")
    refs.write_text(
        'file_name,caption_1,caption_2\na.wav,"a dog barks,a dog\nb.wav,rain,rain falls\nc.wav,a car,a car passes\n'
    )
    out.write_text("{}")
    before = snapshot(tmp_path)
    assert (
        main(
            [
                "--predictions",
                str(preds),
                "--references",
                str(refs),
                "--metrics",
                "bleu",
                "--no-tokenize",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{refs}, line 2" in err and "quote" in err and "no references" not in err
    assert snapshot(tmp_path) == before


def test_submit_captions_folder_is_a_usage_error_not_a_traceback(tmp_path, capsys):
    from retrieval.submit import main

    audio = tmp_path / "audio"
    for i in range(3):
        write_wav(audio / f"clip{i}.wav")
    out = tmp_path / "sub"
    out.mkdir()
    (out / "x.output.csv").write_text("kept\n")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(
            [
                "--captions",
                str(audio),
                "--audio-dir",
                str(audio),
                "--out",
                str(out / "x.output.csv"),
                "--checkpoint",
                "unused",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{audio}: is a folder" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


# ===========================================================================================================
# Models: config fields, weight files, text models
# ===========================================================================================================
BERT = "google-bert/bert-base-uncased"  # what the 'B' in an official 2025 folder name asks for


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def wav(tmp_path) -> Path:
    path = tmp_path / "clip.wav"
    sf.write(path, tone(1.5).numpy(), 16000)
    return path


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An output folder holding a previous run's files, which a failed run must leave as they were."""
    out = tmp_path / "feats"
    (out / "clip").mkdir(parents=True)
    np.save(out / "clip" / "old.npy", np.arange(6, dtype=np.float32))
    (out / "meta.json").write_text(json.dumps({"model": "tiny", "features": ["clip"]}))
    return out


def extract_fails(checkpoint: Path, wav: Path, out_dir: Path, capsys) -> str:
    """Run m2dclap.extract on a bad checkpoint; check exit code 2, one line, untouched outputs."""
    before = snapshot(out_dir)
    rc = extract_main([str(wav), "--checkpoint", str(checkpoint), "--out", str(out_dir), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert snapshot(out_dir) == before
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def saved_folder_with(tmp_path: Path, section: str, field: str, value) -> Path:
    folder = tiny_audio_model().save_pretrained(tmp_path / "model")
    meta = json.loads((folder / "config.json").read_text())
    meta["model"][section][field] = value
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def official_2025(tmp_path: Path) -> tuple[Path, m2dclap.M2DCLAP]:
    """A tiny fake of the released 2025 file: ``backbone.*`` + ``text_encoder.*`` keys in a folder whose
    name asks for BERT ('B') with its weights inside ('TI'). The official loader infers 64-dim heads."""
    src = tiny_audio_model(**{"encoder.num_heads": 1, "projector.kind": "transformer"})
    with torch.no_grad():
        src.norm_stats.copy_(torch.tensor([-7.26, 4.35]))
        for p in src.audio_proj.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {"backbone." + k: v for k, v in src.encoder.state_dict().items()}
    sd.update({"backbone.audio_proj." + k: v for k, v in src.audio_proj.state_dict().items()})
    sd["backbone.norm_stats"] = src.norm_stats.clone()
    sd["text_encoder.text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(30522, 768)
    path = tmp_path / "m2d_clap_vit_base-80x128p16x16p16kpBpTI-2025" / "checkpoint-30.pth"
    path.parent.mkdir(parents=True)
    torch.save({"model": sd, "epoch": 30}, path)
    return path, src


@pytest.fixture
def no_text_model_calls(monkeypatch):
    """Any attempt to look up a text model (tokenizer, config, weights, sentence model) fails the test."""
    import sentence_transformers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a text model was looked up: {args[:2]}")

    for name in ("AutoTokenizer", "AutoConfig", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", refuse)


def bert_is_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(BERT, "config.json"), str)


# ---------------------------------------------------------------------------------------------------
# config.json of a saved folder
# ---------------------------------------------------------------------------------------------------
def test_config_embed_dim_not_an_integer(tmp_path, wav, out_dir, capsys):
    folder = saved_folder_with(tmp_path, "encoder", "embed_dim", "big")
    err = extract_fails(folder, wav, out_dir, capsys)
    assert "config.json: encoder.embed_dim='big' is not an integer" in err


def test_config_num_heads_not_dividing_embed_dim(tmp_path, wav, out_dir, capsys):
    folder = saved_folder_with(tmp_path, "encoder", "num_heads", 3)
    err = extract_fails(folder, wav, out_dir, capsys)
    assert "config.json: encoder.num_heads=3 does not divide embed_dim=64" in err


def test_config_negative_depth(tmp_path, wav, out_dir, capsys):
    folder = saved_folder_with(tmp_path, "encoder", "depth", -2)
    err = extract_fails(folder, wav, out_dir, capsys)
    assert "config.json: encoder.depth=-2 must be at least 1" in err


@pytest.mark.parametrize(
    "value, expected",
    [
        ([80], "must be a list of 2 integers"),
        ([80, 128, 3], "must be a list of 2 integers"),
        ("80x128", "must be a list of 2 integers"),
        ([80, "128"], "[1]='128' is not an integer"),
    ],
)
def test_config_input_size_wrong_shape(tmp_path, wav, out_dir, capsys, value, expected):
    folder = saved_folder_with(tmp_path, "encoder", "input_size", value)
    err = extract_fails(folder, wav, out_dir, capsys)
    assert "config.json: encoder.input_size" in err and expected in err


def test_config_unknown_field_and_bad_section(tmp_path, wav, out_dir, capsys):
    folder = saved_folder_with(tmp_path, "projector", "heads", 2)
    assert "config.json: unknown field(s) projector.heads" in extract_fails(folder, wav, out_dir, capsys)
    meta = json.loads((folder / "config.json").read_text())
    del meta["model"]["projector"]["heads"]
    meta["model"]["text"] = "bert"
    (folder / "config.json").write_text(json.dumps(meta))
    assert "config.json: text must be a mapping" in extract_fails(folder, wav, out_dir, capsys)


def test_config_overrides_are_checked_too():
    with pytest.raises(m2dclap.config.ConfigError, match="encoder.num_heads=5 does not divide embed_dim=64"):
        m2dclap.get_model_config("tiny", **{"encoder.num_heads": 5})
    with pytest.raises(m2dclap.config.ConfigError, match="projector.kind='attention'"):
        m2dclap.get_model_config("tiny", **{"projector.kind": "attention"})


# ---------------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------------
def test_random_bytes_pth(tmp_path, wav, out_dir, capsys):
    path = tmp_path / "m2d_vit_base-80x608p16x16-221006" / "checkpoint-300.pth"
    path.parent.mkdir()
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = extract_fails(path, wav, out_dir, capsys)
    assert f"{path}: not a PyTorch checkpoint" in err and "refused" not in err


def test_damaged_pickle_is_not_called_tampered(tmp_path):
    path = tmp_path / "damaged.pth"
    path.write_bytes(b"\x80\x02" + bytes(range(200, 256)) * 20)  # a pickle header, then garbage
    with pytest.raises(CheckpointError, match="damaged.pth: not a (readable )?PyTorch checkpoint") as info:
        m2dclap.load(path)
    assert "refused" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["optimizer", "no-encoder-keys", "tensor", "non-tensors"])
def test_pth_of_the_wrong_kind(tmp_path, wav, out_dir, capsys, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "optimizer":
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
        opt.step()
        obj, expected = opt.state_dict(), "not an M2D checkpoint: it is an optimizer state"
    elif kind == "no-encoder-keys":
        obj, expected = {"model": {"conv1.weight": torch.zeros(3)}}, "not an M2D checkpoint: no 'patch_embed"
    elif kind == "tensor":
        obj, expected = torch.zeros(4), "not an M2D checkpoint: it holds a Tensor"
    else:
        obj, expected = {"model": {"lr": 0.1, "patch_embed.proj.weight": torch.zeros(1)}}, "non-tensor entries"
    torch.save(obj, path)
    err = extract_fails(path, wav, out_dir, capsys)
    assert f"{path}: " in err and expected in err


def test_pth_with_broken_encoder_tensors(tmp_path):
    sd = {k: v for k, v in tiny_audio_model().encoder.state_dict().items() if not k.startswith("blocks.")}
    path = tmp_path / "m2d_vit_base-80x128p16x16-221006" / "checkpoint-1.pth"
    path.parent.mkdir()
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="no transformer blocks"):
        m2dclap.load(path)
    sd = dict(tiny_audio_model().encoder.state_dict(), pos_embed=torch.zeros(5))
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(5,\)"):
        m2dclap.load(path)


def test_truncated_safetensors(tmp_path, wav, out_dir, capsys):
    folder = tiny_audio_model().save_pretrained(tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = extract_fails(folder, wav, out_dir, capsys)
    assert f"{weights}: not a readable safetensors file" in err


def test_safetensors_given_as_official_checkpoint(tmp_path):
    folder = tiny_audio_model().save_pretrained(tmp_path / "model")
    renamed = tmp_path / "weights.pth"
    renamed.write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="weights.pth: a safetensors file, not a PyTorch checkpoint"):
        m2dclap.load(renamed)


def test_bad_load_arguments(tmp_path):
    folder = tiny_audio_model().save_pretrained(tmp_path / "model")
    with pytest.raises(CheckpointError, match="input_size=.80,.: expected"):
        m2dclap.load(folder, input_size=(80,))
    with pytest.raises(CheckpointError, match="text_name=''"):
        m2dclap.load(folder, text_name="")


# ---------------------------------------------------------------------------------------------------
# Official checkpoints whose text model is in no cache
# ---------------------------------------------------------------------------------------------------
def test_official_clap_audio_only_never_touches_the_text_model(tmp_path, wav, no_text_model_calls, capsys):
    path, src = official_2025(tmp_path)
    model = m2dclap.load(path, audio_only=True, text_name="no-such-org/no-such-model")
    assert model.text_encoder is None and model.cfg.text.kind == "none"
    audio = [tone(2.0, freq=330), tone(3.1, freq=880, seed=2)]
    assert torch.equal(model.encode_audio(audio), src.encode_audio(audio))
    out = tmp_path / "feats"
    rc = extract_main([str(wav), "--checkpoint", str(path), "--out", str(out), "--features", "clip,clap", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "clap").is_dir() and any((out / "clip").iterdir())


def test_our_folder_audio_only_never_touches_the_text_model(tmp_path, minilm, monkeypatch):
    src = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.name": minilm})).eval()
    folder = src.save_pretrained(tmp_path / "default-run")
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower was loaded")

    for name in ("AutoTokenizer", "AutoConfig", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    model = m2dclap.load(folder, audio_only=True)
    assert model.text_encoder is None
    assert torch.equal(model.encode_audio(tone(1.0)), src.encode_audio(tone(1.0)))


def test_official_clap_with_text_names_the_model_and_the_option(tmp_path):
    if bert_is_cached():
        pytest.skip(f"{BERT} is in the local Hugging Face cache, so it is not unreachable here")
    path, _ = official_2025(tmp_path)
    with pytest.raises(CheckpointError) as info:
        m2dclap.load(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: cannot load the text model '{BERT}'")
    assert "text_name=PATH" in msg and "audio_only=True" in msg
    assert info.value.text_model == BERT  # for CLIs that offer an option for a local copy
    with pytest.raises(CheckpointError, match="cannot load the text model 'no-such-org/no-such-model'"):
        m2dclap.load(path, text_name="no-such-org/no-such-model")


def test_zeroshot_cli_reports_the_unreachable_text_model(tmp_path, wav, capsys):
    if bert_is_cached():
        pytest.skip(f"{BERT} is in the local Hugging Face cache, so it is not unreachable here")
    from zeroshot.classify import main as classify_main

    path, _ = official_2025(tmp_path)
    rc = classify_main([str(wav), "--checkpoint", str(path), "--labels", "dog,rain", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and f"'{BERT}'" in err and "--text-model PATH" in err  # the command's own option
    missing = tmp_path / "no-bert-here"
    rc = classify_main(
        [str(wav), "--checkpoint", str(path), "--labels", "dog,rain", "--quiet", "--text-model", str(missing)]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(missing) in err  # the option reached the loader


def test_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch):
    """Downloads allowed but no network: one connection attempt decides, the hub client never retries."""
    import transformers

    import m2dclap.clap as clap

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(clap, "_hub_offline", lambda: False)

    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(clap.socket, "create_connection", no_network)
    for name in ("AutoTokenizer", "AutoConfig", "AutoModel"):
        klass = getattr(transformers, name)

        def local_only(source, *args, _orig=klass.from_pretrained, **kwargs):
            assert kwargs.get("local_files_only"), "the hub was asked although it is unreachable"
            return _orig(source, *args, **kwargs)

        monkeypatch.setattr(klass, "from_pretrained", local_only)
    path, _ = official_2025(tmp_path)
    with pytest.raises(
        CheckpointError,
        match="cannot load the text model 'no-such-org/no-such-model': not a local "
        "folder, not in the Hugging Face cache, and .* is not reachable",
    ):
        m2dclap.load(path, text_name="no-such-org/no-such-model")


def test_text_name_folder_that_does_not_exist(tmp_path):
    path, _ = official_2025(tmp_path)
    with pytest.raises(CheckpointError, match="text model '/no/such/bert': no such folder. Give the folder"):
        m2dclap.load(path, text_name="/no/such/bert")


def test_pretrained_name_that_cannot_be_fetched(tmp_path, monkeypatch, wav, out_dir, capsys):
    import zipfile

    import m2dclap.pretrained as pretrained

    def damaged(url, dest):
        raise zipfile.BadZipFile("File is not a zip file")

    monkeypatch.setenv("M2DCLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "_download_and_unzip", damaged)
    name = "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025"
    err = extract_fails(name, wav, out_dir, capsys)
    assert "could not download and unpack" in err and f"folder name {name}" in err
