"""Readers of the public retrieval layouts: Clotho, AudioCaps, WavCaps, the DCASE evaluation set and the
2025 multi-positive annotations; missing clips are reported with their path and counted, --strict fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from m2dclap.data.manifest import read_manifest
from retrieval import datasets as D


def wav(path: Path, seconds: float = 0.2, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(int(seconds * sr)) / 7)).astype(np.float32), sr)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def clotho(tmp_path):
    root = tmp_path / "clotho"
    write(
        root / "clotho_captions_evaluation.csv",
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        'a dog.wav,A dog barks.,Barking dog.,"A dog, loud.",Dog noise.,A hound barks.\n'
        "rain_01.wav,Rain falls.,Rain on a roof.,Steady rain.,Rain.,Drizzle.\n"
        "gone.wav,Nothing here.,x,y,z,w\n",
    )
    wav(root / "evaluation" / "a dog.wav")
    wav(root / "evaluation" / "rain_01.wav")
    return root


def test_clotho_reads_captions_and_reports_missing(clotho, caplog):
    result = D.read_clotho(clotho, "eval")
    assert [r.id for r in result.records] == ["a dog", "rain_01"]
    assert result.records[0].captions[2] == "A dog, loud." and len(result.records[0].captions) == 5
    assert result.records[0].split == "test" and result.records[0].audio == clotho / "evaluation" / "a dog.wav"
    assert result.missing == [clotho / "evaluation" / "gone.wav"] and result.n_listed == 3
    assert "1 of 3 listed clip(s) missing" in caplog.text and "gone.wav" in caplog.text
    assert result.report()["missing"] == 1
    with pytest.raises(D.MissingAudioError, match="gone.wav"):
        D.read_clotho(clotho, "evaluation", strict=True)
    with pytest.raises(ValueError, match="unknown Clotho split"):
        D.read_clotho(clotho, "holdout")
    with pytest.raises(FileNotFoundError, match="clotho_captions_validation.csv"):
        D.read_clotho(clotho, "validation")


def test_datasets_cli_writes_a_manifest_and_strict_fails(clotho, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert D.main(["clotho", "--root", str(clotho), "--split", "evaluation", "--out", str(out)]) == 0
    records = read_manifest(out)
    assert [len(r.captions) for r in records] == [5, 5] and records[1].audio.name == "rain_01.wav"
    assert "1 listed clips missing" in capsys.readouterr().out
    assert D.main(["clotho", "--root", str(clotho), "--out", str(tmp_path / "s.csv"), "--strict"]) == 1
    assert "gone.wav" in capsys.readouterr().err and not (tmp_path / "s.csv").exists()


def test_audiocaps_groups_rows_by_file_with_a_pattern(tmp_path):
    root = tmp_path / "audiocaps"
    write(
        root / "test.csv",
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,abc,30,a man speaks\n2,xyz,0,a car passes\n3,abc,30,someone talks\n"
        "4,nope,10,not downloaded\n",
    )
    wav(root / "test" / "Yabc.wav")
    wav(root / "test" / "Yxyz.wav")
    result = D.read_audiocaps(root, "test", pattern="Y{youtube_id}.wav")
    assert [(r.id, r.captions) for r in result.records] == [
        ("Yabc", ["a man speaks", "someone talks"]),
        ("Yxyz", ["a car passes"]),
    ]
    assert [p.name for p in result.missing] == ["Ynope.wav"]
    # another download names clips by id and start: nothing matches, everything is reported
    other = D.read_audiocaps(root, "test", pattern="{youtube_id}_{start_time}.flac")
    assert other.records == [] and other.missing[0].name == "abc_30.flac" and len(other.missing) == 3
    with pytest.raises(ValueError, match="unknown field"):
        D.read_audiocaps(root, "test", pattern="{ytid}.wav")


def test_wavcaps_json_with_patterns(tmp_path):
    doc = {
        "num_captions_per_audio": 1,
        "data": [
            {"id": "Y0AbC.wav", "caption": "A bell rings.", "audio": "wav_path", "duration": 10.0},
            {"id": "180913", "caption": "Birds chirp.", "audio": "wav_path", "duration": 3.5},
            {"id": "999", "caption": "Lost clip.", "audio": "wav_path", "duration": 1.0},
        ],
    }
    js = write(tmp_path / "json" / "wavcaps.json", json.dumps(doc))
    wav(tmp_path / "audio" / "Y0AbC.flac")
    wav(tmp_path / "audio" / "180913.flac")
    result = D.read_wavcaps(js, tmp_path / "audio")
    assert [(r.id, r.captions, r.split) for r in result.records] == [
        ("Y0AbC", ["A bell rings."], "train"),
        ("180913", ["Birds chirp."], "train"),
    ]
    assert [p.name for p in result.missing] == ["999.flac"]
    with pytest.raises(ValueError, match="no field"):
        D.read_wavcaps(js, tmp_path / "audio", pattern="{sound_id}.flac")


def test_dcase_eval_set_and_2025_relevance(tmp_path):
    write(tmp_path / "retrieval_captions.csv", 'caption\nA dog barks twice.\n"Rain, then thunder."\n')
    for name in ("b.wav", "a.wav"):
        wav(tmp_path / "audio" / name)
    write(tmp_path / "audio" / "notes.txt", "not audio")
    ev = D.read_dcase_eval(tmp_path / "retrieval_captions.csv", tmp_path / "audio")
    assert ev.captions == ["A dog barks twice.", "Rain, then thunder."]
    assert [r.id for r in ev.audio.records] == ["a.wav", "b.wav"]  # sorted, audio files only
    meta = write(tmp_path / "meta.csv", "file_name,keywords\na.wav,x\nc.wav,y\n")
    listed = D.read_dcase_eval(tmp_path / "retrieval_captions.csv", tmp_path / "audio", meta)
    assert [p.name for p in listed.audio.missing] == ["c.wav"]
    with pytest.raises(D.MissingAudioError):
        D.read_dcase_eval(tmp_path / "retrieval_captions.csv", tmp_path / "audio", meta, strict=True)
    rel = write(
        tmp_path / "metadata_eval.csv", "query,audio_filenames\n\"a dog barks\",\"['a.wav', 'b.wav']\"\nrain,b.wav\n"
    )
    assert D.read_relevance(rel) == [("a dog barks", ["a.wav", "b.wav"]), ("rain", ["b.wav"])]
    bad = write(tmp_path / "bad.csv", "query,audio_filenames\nq,\"[__import__('os')]\"\n")
    with pytest.raises(ValueError, match="list literal"):
        D.read_relevance(bad)


def test_read_retrieval_dataset_manifest_and_errors(tmp_path):
    wav(tmp_path / "x.wav")
    write(tmp_path / "m.csv", "audio,caption,split\nx.wav,hello,test\ny.wav,bye,test\nz.wav,no,train\n")
    result = D.read_retrieval_dataset("manifest", tmp_path / "m.csv", "test")
    assert [r.id for r in result.records] == ["x"] and [p.name for p in result.missing] == ["y.wav"]
    with pytest.raises(ValueError, match="needs --root"):
        D.read_retrieval_dataset("clotho", None, "evaluation")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.read_retrieval_dataset("esc50", tmp_path, "test")


def test_finetune_dataset_specs_mix_layouts(clotho, tmp_path):
    from retrieval.finetune import TRAIN_SPLITS, RetrievalFinetuneCfg, read_sets

    wav(tmp_path / "x.wav")
    write(tmp_path / "m.csv", "audio,caption_1,caption_2,split\nx.wav,hello,hi,train\ny.wav,bye,ciao,val\n")
    wav(tmp_path / "y.wav")
    cfg = RetrievalFinetuneCfg(clotho_root=str(clotho))
    sets = read_sets(cfg, f"clotho:evaluation, {tmp_path / 'm.csv'}", TRAIN_SPLITS)
    assert [(name, [r.id for r in recs]) for name, recs in sets] == [
        ("clotho:evaluation", ["a dog", "rain_01"]),
        ("m", ["x"]),
    ]
    assert [r.id for _, recs in read_sets(cfg, f"{tmp_path / 'm.csv'}:val", TRAIN_SPLITS) for r in recs] == ["y"]
    with pytest.raises(ValueError, match="--audiocaps-root"):
        read_sets(cfg, "audiocaps", TRAIN_SPLITS)
    with pytest.raises(FileNotFoundError, match="clotho_captions_development.csv"):
        read_sets(cfg, "clotho", TRAIN_SPLITS)  # the default training split is development


def test_finetune_cli_types_follow_the_config_annotations():
    from retrieval.finetune import RetrievalFinetuneCfg, build_parser

    args = build_parser().parse_args(["--warmup-epochs", "0.5", "--epochs", "3", "--train-audio-encoder"])
    assert args.warmup_epochs == 0.5 and args.epochs == 3 and args.train_audio_encoder and not args.freeze_text
    assert (
        args.crop_seconds == RetrievalFinetuneCfg().crop_seconds and tuple(args.betas) == RetrievalFinetuneCfg().betas
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--sample", "frames"])
