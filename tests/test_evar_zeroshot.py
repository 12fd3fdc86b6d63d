"""Zero-shot evaluation follows EVAR's protocol: sorted class lists, per-task unit lengths cut from the start,
and the test splits of GTZAN and CREMA-D. Each test builds a small synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from zeroshot.classifier import FilePredictions
from zeroshot.datasets import Clip, ZeroShotDataset, read_audioset, read_esc50, read_fsd50k, read_nsynth, read_us8k
from zeroshot.evaluate import score_predictions


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
