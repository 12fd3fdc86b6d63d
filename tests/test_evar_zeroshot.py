"""Zero-shot evaluation follows EVAR's protocol: sorted class lists, per-task unit lengths cut from the start,
and the test splits of GTZAN and CREMA-D. Each test builds a small synthetic dataset."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from zeroshot import classifier as classifier_module
from zeroshot import evaluate as evaluate_module
from zeroshot.classifier import FilePredictions, fit_from_start
from zeroshot.datasets import (
    Clip,
    DatasetError,
    ZeroShotDataset,
    read_audioset,
    read_cremad,
    read_esc50,
    read_fsd50k,
    read_gtzan,
    read_nsynth,
    read_us8k,
)
from zeroshot.evaluate import score_predictions
from zeroshot.metadata import CREMAD_TEST_SPEAKERS


def wav(path: Path, seconds: float = 0.1, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * sr), dtype=np.float32), sr)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- rule 1: class order


def test_every_reader_sorts_its_classes(tmp_path):
    esc = tmp_path / "esc"
    write(esc / "meta" / "esc50.csv", "filename,fold,target,category\na.wav,1,0,rooster\nb.wav,2,1,dog\n")
    wav(esc / "audio" / "a.wav"), wav(esc / "audio" / "b.wav")
    assert read_esc50(esc).classes == ["dog", "rooster"]  # target order would give rooster first
    us = tmp_path / "us"
    write(
        us / "metadata" / "UrbanSound8K.csv", "slice_file_name,fold,classID,class\na.wav,1,0,siren\nb.wav,1,1,drill\n"
    )
    assert read_us8k(us).classes == ["drill", "siren"]
    fsd = tmp_path / "fsd"
    write(fsd / "FSD50K.ground_truth" / "eval.csv", "fname,labels,mids\n1,Rain,/m/1\n2,Bark,/m/2\n")
    write(fsd / "FSD50K.ground_truth" / "vocabulary.csv", "0,Rain,/m/1\n1,Bark,/m/2\n")
    assert read_fsd50k(fsd).classes == ["Bark", "Rain"]  # not vocabulary.csv's order
    aset = tmp_path / "as"
    write(aset / "class_labels_indices.csv", "index,mid,display_name\n0,/m/09x0r,Speech\n1,/m/05zppz,Male\n")
    write(aset / "eval_segments.csv", '# c\nY1, 0.0, 10.0, "/m/09x0r"\n')
    ds = read_audioset(aset)
    assert ds.classes == ["/m/05zppz", "/m/09x0r"] and ds.label_names["/m/09x0r"] == "Speech"
    ns = tmp_path / "ns"
    write(ns / "examples.json", '{"n1": {"instrument_family_str": "aaa_new"}}')
    assert read_nsynth(ns).classes[0] == "aaa_new"  # a family outside the 11 known is sorted in, not appended


class _Clf:
    def __init__(self, classes):
        self.prompts, self.scale = [[f"{c} can be heard"] for c in classes], 1.0


def _scores(classes, order, probs, labels, multi):
    """score_predictions with the classes (and the probability columns) taken in ``order``."""
    classes = [classes[i] for i in order]
    clips = [Clip(Path(f"{n}.wav"), lab) for n, lab in enumerate(labels)]
    ds = ZeroShotDataset("t", clips, classes, multi)
    p = torch.tensor(probs[:, order])
    preds = FilePredictions([c.path for c in clips], list(range(len(clips))), p, p, p)
    return score_predictions(ds, _Clf(classes), preds)


@pytest.mark.parametrize("multi", [False, True])
def test_scores_do_not_depend_on_class_order(multi):
    rng = np.random.default_rng(0)
    classes = ["c", "a", "d", "b"]
    probs = rng.random((30, 4)).astype(np.float32)
    labels = [[classes[i] for i in rng.choice(4, 2 if multi else 1, replace=False)] for _ in range(30)]
    metadata = _scores(classes, [0, 1, 2, 3], probs, labels, multi)
    evar = _scores(classes, [1, 3, 0, 2], probs, labels, multi)
    assert evar["classes"] == ["a", "b", "c", "d"]
    assert evar["score"] == pytest.approx(metadata["score"])
    key = "ap" if multi else "accuracy"
    by_class = {r["class"]: r[key] for r in metadata["per_class"]}
    assert [r[key] for r in evar["per_class"]] == pytest.approx([by_class[c] for c in evar["classes"]])


# ----------------------------------------------------------------------------------------------- rule 2: units


class LengthModel:
    """Records the length of every waveform it encodes; the embedding says nothing."""

    sample_rate = 1000
    cfg = SimpleNamespace(encoder=SimpleNamespace(embed_dim=3))

    def __init__(self):
        self.lengths: list[int] = []
        self.first: list[float] = []

    def encode_text(self, texts, normalize=True):
        return torch.eye(3)[torch.arange(len(texts)) % 3]

    def encode_audio(self, waves, sample_rate, normalize=True, batch_size=32):
        self.lengths += [int(w.shape[-1]) for w in waves]
        self.first += [float(w[0]) for w in waves]
        return torch.ones(len(waves), 3)


def _clips(tmp_path: Path, seconds: list[float], sr: int = 1000) -> list[Clip]:
    clips = []
    for n, sec in enumerate(seconds):
        path = tmp_path / f"{n}.wav"
        x = np.arange(int(sec * sr), dtype=np.float32) / (sec * sr)  # a ramp: the first sample says where a cut began
        sf.write(path, x, sr)
        clips.append(Clip(path, ["dog"]))
    return clips


@pytest.mark.parametrize("name,unit", [("esc50", 5.0), ("us8k", 4.0), ("cremad", 2.5), ("fsd50k", 7.6358)])
def test_known_tasks_cut_or_pad_test_clips_to_evars_unit_from_the_start(tmp_path, monkeypatch, name, unit):
    monkeypatch.setattr(classifier_module, "min_samples_of", lambda model: 1)
    model = LengthModel()
    ds = ZeroShotDataset(name, _clips(tmp_path, [1.0, 3.61, 12.0]), ["cat", "dog"], False)
    res = evaluate_module.evaluate(model, ds, progress=False, workers=0)
    assert model.lengths == [round(unit * 1000)] * 3  # not the whole clips (1000, 3610, 12000 samples)
    assert model.first == [0.0, 0.0, 0.0]  # cut from the start, never at random
    assert res["clips"] == "evar-unit" and res["unit_seconds"] == unit
    assert f"EVAR's {unit:g} s unit" in evaluate_module.format_report(res)


def test_whole_clips_option_and_unknown_tasks_encode_whole_clips(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier_module, "min_samples_of", lambda model: 1)
    model = LengthModel()
    ds = ZeroShotDataset("esc50", _clips(tmp_path, [1.0, 6.0]), ["cat", "dog"], False)
    res = evaluate_module.evaluate(model, ds, progress=False, workers=0, whole_clips=True)
    assert model.lengths == [1000, 6000] and res["clips"] == "whole" and res["unit_seconds"] is None
    assert "clips: whole" in evaluate_module.format_report(res)
    model.lengths = []
    ds = ZeroShotDataset("manifest", ds.clips, ["cat", "dog"], False)
    assert evaluate_module.evaluate(model, ds, progress=False, workers=0)["clips"] == "whole"
    assert model.lengths == [1000, 6000]


def test_fit_from_start():
    wave = torch.arange(10.0)
    assert fit_from_start(0, wave, 4).tolist() == [0, 1, 2, 3]
    assert fit_from_start(0, wave[:2], 4).tolist() == [0, 1, 0, 0]
    assert fit_from_start(0, wave, 10).tolist() == wave.tolist()


# ----------------------------------------------------------------------------------------------- rule 3: splits


def _gtzan(root: Path) -> Path:
    for genre in ("blues", "jazz"):
        for i in range(3):
            wav(root / "genres" / genre / f"{genre}.0000{i}.wav")
    return root


def test_gtzan_defaults_to_the_filtered_test_list_in_the_root(tmp_path):
    root = _gtzan(tmp_path)
    write(root / "test_filtered.txt", "blues/blues.00001.au\njazz/jazz.00002.au\n")
    ds = read_gtzan(root)  # today: all 6 clips
    assert [c.path.name for c in ds.clips] == ["blues.00001.wav", "jazz.00002.wav"]
    assert ds.classes == ["blues", "jazz"] and ds.clips[0].fold == "test_filtered"
    assert len(read_gtzan(root, split="all").clips) == 6


def test_gtzan_without_the_test_list_is_bad_input(tmp_path, capsys):
    root = _gtzan(tmp_path)
    with pytest.raises(DatasetError, match=r"test_filtered\.txt.*--split-file.*--split all"):
        read_gtzan(root)
    rc = evaluate_module.main(["--checkpoint", str(tmp_path / "none"), "--dataset", "gtzan", "--root", str(root)])
    assert rc == 2 and "test_filtered.txt" in capsys.readouterr().err


def test_cremad_defaults_to_evars_test_speakers(tmp_path):
    names = ["1001_DFA_ANG_XX.wav", "1002_DFA_SAD_XX.wav", "1083_IEO_HAP_HI.wav", "1091_WSI_SAD_LO.wav"]
    for name in names:
        wav(tmp_path / "AudioWAV" / name)
    ds = read_cremad(tmp_path)  # today: all 4 clips
    assert [c.path.name for c in ds.clips] == ["1001_DFA_ANG_XX.wav", "1083_IEO_HAP_HI.wav"]
    assert all(c.fold == "test" for c in ds.clips)
    assert len(CREMAD_TEST_SPEAKERS) == 19
    assert len(read_cremad(tmp_path, split="all").clips) == 4
    with pytest.raises(DatasetError, match="--split-file"):
        read_cremad(tmp_path, split="train")
