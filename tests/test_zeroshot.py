"""Zero-shot classification: the paper's prompt rules, the metrics against scikit-learn, the classifier on a
tiny model, and both command lines on the embedded corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import m2dclap
from m2dclap.data.manifest import read_manifest
from m2dclap.data.synthetic import CLASS_NAMES, generate_corpus
from zeroshot import classify as classify_cli
from zeroshot import evaluate as evaluate_cli
from zeroshot.classifier import ZeroShotClassifier
from zeroshot.metrics import accuracy, average_precision, confusion_matrix, mean_average_precision, per_class_accuracy
from zeroshot.templates import (
    CREMAD_NAMES,
    CREMAD_SENTENCES,
    TemplateError,
    clean_label,
    encode_prompts,
    make_prompt,
    make_prompts,
    read_class_labels_indices,
)

from conftest import minilm_path, tone

# ----------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "rule,label,prompt",
    [
        ("esc50", "dog", "dog can be heard"),
        ("esc50", "crackling_fire", "crackling fire can be heard"),
        ("us8k", "air_conditioner", "air conditioner can be heard"),
        ("gtzan", "hiphop", "hiphop music can be heard"),
        ("nsynth", "keyboard", "the musical instrument sound of keyboard can be heard"),
        ("nsynth", "synth_lead", "the musical instrument sound of synth lead can be heard"),
        ("fsd50k", "Electric_guitar", "Electric guitar can be heard"),
        ("audioset", "Speech", "Speech can be heard"),
        ("default", "noise burst", "noise burst can be heard"),
    ],
)
def test_dataset_rules(rule, label, prompt):
    assert make_prompt(label, rule) == prompt


def test_cremad_rule_is_the_papers_six_sentences():
    prompts = [p[0] for p in make_prompts(["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"], "cremad")]
    assert prompts == [
        "angry person talking can be heard",
        "someone talking in disgust can be heard",
        "someone talking with a sense of fear can be heard",
        "someone talking happily and joyfully can be heard",
        "someone talking calmly can be heard",
        "someone talking sadly can be heard",
    ]
    # the display words of a CREMA-D dataset still reach the same sentences; user templates get the words
    assert make_prompt("happy", "cremad") == make_prompt("HAP", "cremad", CREMAD_NAMES)
    assert make_prompt("FEA", "a {label} voice", CREMAD_NAMES) == "a fearful voice"
    with pytest.raises(TemplateError, match="unknown emotion code 'CALM'"):
        make_prompt("CALM", "cremad")
    assert len(CREMAD_SENTENCES) == 6


def test_audioset_mids_to_display_names(tmp_path):
    csv_file = tmp_path / "class_labels_indices.csv"
    csv_file.write_text(
        'index,mid,display_name\n1,/m/05zppz,"Male speech, man speaking"\n0,/m/09x0r,"Speech"\n'
        '2,/m/07qfr4h,"Speech_synthesizer"\n'
    )
    pairs = read_class_labels_indices(csv_file)
    assert pairs == [
        ("/m/09x0r", "Speech"),
        ("/m/05zppz", "Male speech, man speaking"),
        ("/m/07qfr4h", "Speech_synthesizer"),
    ]  # index order
    names = dict(pairs)
    assert [p[0] for p in make_prompts([m for m, _ in pairs], "audioset", names)] == [
        "Speech can be heard",
        "Male speech, man speaking can be heard",
        "Speech synthesizer can be heard",
    ]
    assert make_prompt("/m/05zppz", "the sound of {}", names) == "the sound of Male speech, man speaking"
    assert clean_label("/m/unknown", names) == "/m/unknown"
    csv_file.write_text("index,mid,display_name\n0,/m/09x0r,Male speech, man speaking\n")
    with pytest.raises(ValueError, match=r"class_labels_indices\.csv, line 2: 4 field\(s\)"):
        read_class_labels_indices(csv_file)


def test_user_templates():
    assert make_prompt("dog_bark", "the sound of {}") == "the sound of dog bark"
    assert make_prompt("dog_bark", "{label}: a recording") == "dog bark: a recording"
    assert make_prompt("rain", "{{literal}} {label}") == "{literal} rain"
    assert make_prompts(["a", "b_c"], ["{} x", "y {label}"]) == [["a x", "y a"], ["b c x", "y b c"]]
    for bad in ("no field", "{name}", "{} and {}", "{0}", "{label!r}", "{:>5}", "{unclosed"):
        with pytest.raises(TemplateError, match="template"):
            make_prompt("dog", bad)
    with pytest.raises(TemplateError, match="empty list"):
        make_prompts(["dog"], [])


# ----------------------------------------------------------------------------------------------- metrics


def test_macro_map_equals_scikit_learn_on_random_data():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, c = int(rng.integers(5, 80)), int(rng.integers(1, 12))
        y = (rng.random((n, c)) < rng.uniform(0.05, 0.6)).astype(int)
        y[rng.integers(0, n, size=c), np.arange(c)] = 1  # every class has a positive
        # continuous scores, and coarse ones with many ties (tied scores form one step of the curve)
        s = rng.standard_normal((n, c)) if trial % 2 else rng.integers(0, 4, (n, c)) / 3
        ours, per_class, empty = mean_average_precision(y, s)
        assert ours == pytest.approx(sk.average_precision_score(y, s, average="macro"), abs=1e-12)
        assert per_class == pytest.approx(sk.average_precision_score(y, s, average=None), abs=1e-12)
        assert empty == []


def test_average_precision_by_hand_and_classes_without_positives():
    # positives ranked 1st and 3rd -> (1/1 + 2/3) / 2
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie is one step: precision 1/2
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.3]])
    m, ap, empty = mean_average_precision(y, s)
    assert empty == [1] and np.isnan(ap[1]) and m == pytest.approx(0.5)  # counts as 0, like scikit-learn
    assert mean_average_precision(y, s, no_positive="exclude")[0] == pytest.approx(1.0)


def test_accuracy_and_confusion_matrix():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    targets = [0, 1, 1, 2]
    assert accuracy(scores, targets) == pytest.approx(0.75)
    cm = confusion_matrix(targets, scores.argmax(1), 4)
    assert cm.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    pc = per_class_accuracy(cm)
    assert pc[:3].tolist() == [1.0, 0.5, 1.0] and np.isnan(pc[3])


# ----------------------------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def model():
    minilm_path()  # skips when the packaged text encoder is not installed
    torch.manual_seed(0)
    return m2dclap.create_model("tiny").eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return model.save_pretrained(tmp_path_factory.mktemp("zs_ckpt") / "tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("zs_corpus"), n_clips=40, seed=3)


class CountingModel:
    """The real model, with its ``encode_text`` calls counted."""

    def __init__(self, model):
        self.model, self.text_calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_text(self, *args, **kwargs):
        self.text_calls += 1
        return self.model.encode_text(*args, **kwargs)


def test_single_label_probabilities_are_softmax_of_cosines(model):
    counting = CountingModel(model)
    clf = ZeroShotClassifier.from_labels(counting, ["beep", "siren", "drum_roll"])
    assert counting.text_calls == 1 and clf.prompts[2] == ["drum roll can be heard"]
    waves = [tone(1.0, freq=440), tone(0.6, freq=2000, seed=1)]
    probs = clf.predict(waves)  # a list of waveforms of different lengths
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2), atol=1e-6)
    # the same figures straight from the public model API: cosine, no logit scale, softmax
    a = model.encode_audio(waves, model.sample_rate, normalize=True)
    t = model.encode_text([p[0] for p in clf.prompts], normalize=True)
    assert torch.allclose(probs, torch.softmax(model.similarity(a, t), dim=-1), atol=1e-5)
    cached = clf.text_embeddings
    assert torch.allclose(clf.predict(waves[1].numpy()), probs[[1]], atol=1e-5)  # one (T,) waveform, as an array
    assert torch.allclose(clf.predict(torch.stack([waves[0], waves[0]])), probs[[0, 0]], atol=1e-5)  # (B, T)
    assert counting.text_calls == 1 and clf.text_embeddings is cached  # text embedded once, then reused
    # a scale sharpens the probabilities but keeps the ranking (hence accuracy and mAP)
    sharp, sim = ZeroShotClassifier(model, clf.classes, clf.prompts, cached, scale=100.0).scores(a)
    assert torch.allclose(sim, model.similarity(a, t), atol=1e-5)
    assert torch.equal(sharp.argmax(1), probs.argmax(1)) and sharp.max() > probs.max()
    top = clf.top_k(probs, 2)
    assert len(top) == 2 and [len(t) for t in top] == [2, 2] and top[0][0][1] >= top[0][1][1]
    assert top[0][0][0] == clf.classes[int(probs[0].argmax())]


def test_multi_label_uses_sigmoid(model):
    clf = ZeroShotClassifier.from_labels(model, ["beep", "hum"], multi_label=True)
    x = tone(0.8, freq=100)
    probs = clf.predict(x)
    sim = model.similarity(model.encode_audio([x], model.sample_rate), clf.text_embeddings)
    assert torch.allclose(probs, torch.sigmoid(sim), atol=1e-5)
    assert not torch.allclose(probs.sum(1), torch.ones(1))


def test_prompt_ensemble_is_mean_of_normalised_embeddings(model):
    templates = ["{} can be heard", "the sound of {label}", "esc50"]
    clf = ZeroShotClassifier.from_labels(model, ["dog", "rain"], templates)
    assert clf.prompts[0] == ["dog can be heard", "the sound of dog", "dog can be heard"]
    each = F.normalize(model.encode_text([p for ps in clf.prompts for p in ps]), dim=-1).reshape(2, 3, -1)
    assert torch.allclose(clf.text_embeddings, F.normalize(each.mean(1), dim=-1), atol=1e-5)
    assert torch.allclose(clf.text_embeddings.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(encode_prompts(model, [["dog can be heard"]])[0], each[0, 0], atol=1e-5)  # K = 1


def test_predict_files_skips_bad_files(model, tmp_path):
    clf = ZeroShotClassifier.from_labels(model, ["beep", "siren", "rumble"])
    paths = []
    for i, f in enumerate((300, 1200, 80)):
        paths.append(tmp_path / f"clip{i}.wav")
        sf.write(paths[-1], tone(0.5 + 0.1 * i, freq=f, seed=i).numpy(), 16000 if i % 2 else 22050)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not audio at all")
    inputs = [paths[0], junk, paths[1], tmp_path / "gone.wav", paths[2]]  # batches of 2: each has a good file
    out = clf.predict_files(inputs, batch_size=2, progress=False)
    assert out.indices == [0, 2, 4] and out.paths == paths
    assert [p.name for p, _ in out.failed] == ["junk.wav", "gone.wav"]
    assert "junk.wav" in out.failed[0][1] and "no such file" in out.failed[1][1]
    assert out.probabilities.shape == (3, 3) and out.audio_embeddings.shape[0] == 3
    direct = clf.predict([m2dclap.load_audio(p, model.sample_rate) for p in paths])
    assert torch.allclose(out.probabilities, direct, atol=1e-5)
    empty = clf.predict_files([], progress=False)
    assert empty.probabilities.shape == (0, 3) and empty.failed == []


def test_from_labels_rejects_bad_input(model):
    with pytest.raises(ValueError, match="no labels"):
        ZeroShotClassifier.from_labels(model, [])
    with pytest.raises(ValueError, match="duplicate"):
        ZeroShotClassifier.from_labels(model, ["dog", "dog"])
    with pytest.raises(TemplateError):
        ZeroShotClassifier.from_labels(model, ["dog"], "no placeholder")


# ----------------------------------------------------------------------------------------------- CLIs


def test_evaluate_cli_on_embedded_corpus(checkpoint, corpus, model, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    rc = evaluate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            "manifest",
            "--root",
            str(corpus.parent),
            "--task",
            "single",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    test = [r for r in read_manifest(corpus, "test")]
    assert res["task"] == "single-label" and res["metric"] == "accuracy" and res["n_clips"] == len(test)
    assert res["classes"] == sorted(CLASS_NAMES) and res["chance"] == pytest.approx(1 / 12)
    assert res["prompts"]["noise burst"] == ["noise burst can be heard"] and res["templates"] == ["default"]
    assert np.sum(res["confusion_matrix"]) == len(test)
    assert sum(r["n"] for r in res["per_class"]) == len(test)
    # the figure is the accuracy of the library's classifier on the same clips
    clf = ZeroShotClassifier.from_labels(model, res["classes"])
    probs = clf.predict([m2dclap.load_audio(r.audio, model.sample_rate) for r in test])
    expected = accuracy(probs.numpy(), [res["classes"].index(r.labels[0]) for r in test])
    assert res["accuracy"] == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "accuracy:" in printed and "noise burst can be heard" in printed and str(out) in printed


def test_evaluate_cli_multi_label_ensemble_and_plot(checkpoint, corpus, model, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(evaluate_cli, "load_model", lambda *a: model)  # loading is tested above; save time
    out = tmp_path / "multi.json"
    rc = evaluate_cli.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            "manifest",
            "--manifest",
            str(corpus),
            "--split",
            "val",
            "--template",
            "{label} can be heard",
            "--template",
            "a {} sound",
            "--out",
            str(out),
            "--plot",
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "multi-label" and res["metric"] == "mAP" and 0 <= res["mAP"] <= 1
    assert res["prompts"]["beep"] == ["beep can be heard", "a beep sound"]
    assert len(res["per_class"]) == 12 and "confusion_matrix" not in res
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # single-label: a confusion matrix, at the path given
    cm_png = tmp_path / "cm.png"
    assert (
        evaluate_cli.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--dataset",
                "manifest",
                "--manifest",
                str(corpus),
                "--task",
                "single",
                "--limit",
                "3",
                "--plot",
                str(cm_png),
                "--quiet",
            ]
        )
        == 0
    )
    assert cm_png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_cli_errors(corpus, tmp_path, capsys, monkeypatch):
    base = ["--checkpoint", str(tmp_path / "none"), "--dataset", "manifest", "--manifest", str(corpus), "--quiet"]
    assert evaluate_cli.main(base + ["--template", "no placeholder"]) == 2
    assert "template 'no placeholder'" in capsys.readouterr().err
    assert evaluate_cli.main(["--checkpoint", "x", "--dataset", "esc50", "--root", str(tmp_path), "--quiet"]) == 2
    assert "esc50.csv: no such file" in capsys.readouterr().err
    assert evaluate_cli.main(base) == 2  # no such checkpoint
    assert str(tmp_path / "none") in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    assert evaluate_cli.main(base + ["--plot"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main(["--help"])
    assert e.value.code == 0 and "Table VI" in capsys.readouterr().out


def test_classify_cli(checkpoint, corpus, model, tmp_path, capsys, monkeypatch):
    clips = [r.audio for r in read_manifest(corpus, "test")][:2]
    rc = classify_cli.main(
        [
            *map(str, clips),
            str(tmp_path / "missing.wav"),
            "--checkpoint",
            str(checkpoint),
            "--labels",
            "beep, siren,rumble,siren",
            "--top",
            "2",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1 and "1 of 3 file(s) could not be used" in captured.err and "missing.wav" in captured.err
    lines = captured.out.splitlines()
    assert lines[0] == str(clips[0]) and len(lines) == 6
    assert lines[1].lstrip().startswith("1. ") and "p=" in lines[1] and "cos=" in lines[1]
    labels = {ln.split()[1] for ln in lines if ln.startswith("  ")}
    assert labels <= {"beep", "siren", "rumble"}
    monkeypatch.setattr(classify_cli, "load_model", lambda *a: model)  # loading is tested above; save time
    rc = classify_cli.main(
        [str(clips[0]), "--checkpoint", str(checkpoint), "--labels", "beep,siren", "--json", "--multi-label", "--quiet"]
    )
    row = json.loads(capsys.readouterr().out)
    assert rc == 0 and [t["label"] for t in row["top"]] != [] and len(row["top"]) == 2
    assert all(0 < t["probability"] < 1 for t in row["top"])
    assert classify_cli.main([str(clips[0]), "--checkpoint", str(checkpoint), "--quiet"]) == 2
    assert "no labels" in capsys.readouterr().err
