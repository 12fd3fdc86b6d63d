"""Linear evaluation (paper IV-B1): the probe trainer, the metrics, the CLI on the embedded corpus, the cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import m2dclap
from m2dclap import linear_eval as le
from m2dclap.data.manifest import Record, read_manifest, write_manifest
from m2dclap.data.synthetic import generate_corpus
from m2dclap.metrics import average_precision, mean_average_precision


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("corpus"), n_clips=60, seed=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


def run(checkpoint: Path, manifest: Path, tmp_path: Path, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "result.json"
    rc = le.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(manifest),
            "--epochs",
            "4",
            "--patience",
            "2",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def single_label_manifest(corpus: Path, path: Path, drop_val: bool = False, bad: int = 0) -> Path:
    """The corpus with one label per clip (its primary class); val merged into train if ``drop_val``;
    ``bad`` extra train clips whose files are not audio."""
    records = []
    for r in read_manifest(corpus):
        split = "train" if drop_val and r.split == "val" else r.split
        records.append(Record(id=r.id, audio=r.audio, labels=r.labels[:1], split=split))
    for i in range(bad):
        junk = path.parent / f"junk_{i}.wav"
        junk.write_bytes(b"RIFF not really a wav file")
        records.append(Record(id=f"junk_{i}", audio=junk, labels=["beep"], split="train"))
    return write_manifest(records, path)


# ----------------------------------------------------------------------------------------------- metrics
def test_average_precision_hand_computed():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    s = np.array([[0.9, 0.2, 0.5], [0.8, 0.7, 0.1], [0.3, 0.6, 0.4], [0.1, 0.9, 0.3]])
    # class 0: positives ranked 1st and 3rd -> (1/1 + 2/3) / 2; class 1: ranked 2nd and 3rd -> (1/2 + 2/3) / 2
    mAP, ap, empty = mean_average_precision(y, s, no_positive="exclude")
    assert empty == [2]
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert ap[1] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert math.isnan(ap[2])  # no positive: left out of the mean
    assert mAP == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2)


def test_average_precision_ties_and_sklearn():
    # tied scores form one threshold: both items at 0.5 are ranked together -> precision 1/2 at recall 1
    assert average_precision(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = (rng.random((50, 6)) < 0.3).astype(int)
    s = np.round(rng.random((50, 6)), 1)  # many ties
    for c in range(6):
        assert average_precision(y[:, c], s[:, c]) == pytest.approx(skm.average_precision_score(y[:, c], s[:, c]))


# ----------------------------------------------------------------------------------------------- the probe
def blobs(n_per: int, n_classes: int, dim: int, seed: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((n_classes, dim)) * 3
    y = np.repeat(np.arange(n_classes), n_per)
    x = centres[y] + rng.standard_normal((len(y), dim))
    return (x * 50 + offset).astype(np.float32), y  # far from standardised: the probe must standardise


def test_probe_learns_separable_blobs():
    xtr, ytr = blobs(40, 4, 32, seed=1, offset=1000.0)
    xva, yva = blobs(10, 4, 32, seed=2, offset=1000.0)
    xte, yte = blobs(10, 4, 32, seed=3, offset=1000.0)
    probe = le.train_linear_probe(xtr, ytr, xva, yva, epochs=30, patience=5, lr=1e-2, batch_size=16, seed=0)
    assert probe.metric == "accuracy"
    assert le.score_predictions(yte, probe.predict(xte)) >= 0.95
    # validation accuracy saturates at once; an equal score resets the patience (EVAR), so it never runs out
    assert not probe.stopped_early and probe.epochs_run == probe.best_epoch == 30
    np.testing.assert_allclose(probe.mean, np.concatenate([xtr, xva]).mean(0), rtol=1e-4)


def test_probe_keeps_the_best_validation_epoch():
    # multi-label, validation labels are the opposite of train's: learning train makes val mAP worse,
    # so the first epoch is the best and the returned weights must be that epoch's, not the last.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)
    probe = le.train_linear_probe(x, y, x, 1 - y, epochs=30, patience=10, lr=1e-2, seed=0)
    scores = [h["val_score"] for h in probe.history]
    assert probe.metric == "mAP"
    assert probe.best_epoch == int(np.argmax(scores)) + 1 and probe.val_score == max(scores)
    assert scores[-1] < probe.val_score  # the last epoch was worse...
    assert le.score_predictions(1 - y, probe.predict(x)) == pytest.approx(probe.val_score)  # ...and not kept
    assert probe.epochs_run == probe.best_epoch + 10


def test_carve_val_is_seeded_ten_percent():
    ids = [f"c{i}" for i in range(50)]
    train, val = le.carve_val(ids, seed=3)
    assert len(val) == 5 and sorted(train + val) == sorted(ids)
    assert le.carve_val(ids, seed=3) == (train, val)
    assert le.carve_val(ids, seed=4)[1] != val
    with pytest.raises(le.LinearEvalError, match="cannot carve"):
        le.carve_val(["only"], seed=0)


# ----------------------------------------------------------------------------------------------- the CLI
def test_main_multilabel_on_the_synthetic_corpus(corpus, checkpoint, tmp_path, capsys):
    rc, res = run(checkpoint, corpus, tmp_path)
    assert rc == 0
    counts = {s: sum(r.split == s for r in read_manifest(corpus)) for s in ("train", "val", "test")}
    assert res["task"] == "multi-label" and res["metric"] == "mAP"  # synthetic clips have 1-3 labels
    assert isinstance(res["value"], float) and 0.0 <= res["value"] <= 1.0
    assert 0.0 < res["chance"] < 1.0
    assert (res["n_train"], res["n_val"], res["n_test"]) == (counts["train"], counts["val"], counts["test"])
    assert not res["val_from_train"] and res["n_bad"] == 0 and res["bad_files"] == []
    assert res["feature_dim"] == 5 * 64  # tiny: F' = 80 / 16 frequency patches x D = 64
    assert 1 <= res["best_epoch"] <= res["epochs_run"] <= 4
    assert res["n_classes"] == 12 and 1 <= res["n_classes_scored"] <= 12
    # every class counts, one without a test positive as AP 0
    assert res["value"] == pytest.approx(sum(res["per_class_ap"].values()) / res["n_classes"])
    assert len(res["classes_without_positive"]) == res["n_classes"] - res["n_classes_scored"]
    line = capsys.readouterr().out
    assert "mAP" in line and f"epochs run {res['epochs_run']}" in line and f"test {res['n_test']}" in line


def test_main_single_label_carves_val_and_skips_bad_files(corpus, checkpoint, tmp_path, capsys):
    manifest = single_label_manifest(corpus, tmp_path / "single.csv", drop_val=True, bad=2)
    rc, res = run(checkpoint, manifest, tmp_path, "--seed", "7")
    assert rc == 1  # clips were skipped
    assert res["task"] == "single-label" and res["metric"] == "accuracy"
    assert 0.0 <= res["value"] <= 1.0
    assert res["n_bad"] == 2 and {Path(b["path"]).name for b in res["bad_files"]} == {"junk_0.wav", "junk_1.wav"}
    n_train_all = sum(r.split in ("train", "val") for r in read_manifest(corpus))  # bad clips excluded
    assert res["val_from_train"] and res["n_val"] == round(0.1 * n_train_all)
    assert res["n_train"] + res["n_val"] == n_train_all
    err = capsys.readouterr().err
    assert "junk_0.wav" in err and "junk_1.wav" in err


def test_cache_is_reused_and_invalidated(corpus, checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    rc, first = run(checkpoint, corpus, tmp_path, "--cache", str(cache))
    assert rc == 0 and not first["cache_hit"]
    assert [p.name for p in cache.iterdir()] == [Path(first["cache"]).name]  # no temporary file left

    def no_model(*args, **kwargs):
        raise AssertionError("the model was called although the features are cached")

    monkeypatch.setattr(m2dclap.M2DCLAP, "audio_features", no_model)
    rc, second = run(checkpoint, corpus, tmp_path, "--cache", str(cache))
    assert rc == 0 and second["cache_hit"]
    assert second["value"] == first["value"] and second["epochs_run"] == first["epochs_run"]

    # another manifest (here: the same clips with one label each) is another cache entry: extraction runs
    other = single_label_manifest(corpus, tmp_path / "other.csv")
    with pytest.raises(AssertionError, match="cached"):
        run(checkpoint, other, tmp_path, "--cache", str(cache))


def test_cache_survives_a_corrupt_file(corpus, checkpoint, tmp_path):
    cache = tmp_path / "cache"
    rc, first = run(checkpoint, corpus, tmp_path, "--cache", str(cache))
    Path(first["cache"]).write_bytes(b"not an npz")
    rc, again = run(checkpoint, corpus, tmp_path, "--cache", str(cache))
    assert rc == 0 and not again["cache_hit"] and again["value"] == first["value"]


def test_clear_errors(corpus, checkpoint, tmp_path, capsys):
    rc, _ = run(checkpoint, corpus, tmp_path, "--label-column", "genre")
    assert rc == 2 and "no 'genre' column" in capsys.readouterr().err

    rc, _ = run(checkpoint, corpus, tmp_path, "--split-column", "fold")
    assert rc == 2 and "no 'fold' column" in capsys.readouterr().err

    no_labels = tmp_path / "nolabels.csv"  # the column is there, every cell is empty
    no_labels.write_text(
        "id,audio,labels,split\n" + "".join(f"{r.id},{r.audio},,{r.split}\n" for r in read_manifest(corpus))
    )
    rc, _ = run(checkpoint, no_labels, tmp_path)
    assert rc == 2 and "no clip has both labels" in capsys.readouterr().err

    no_test = write_manifest([r for r in read_manifest(corpus) if r.split != "test"], tmp_path / "notest.csv")
    rc, _ = run(checkpoint, no_test, tmp_path)
    assert rc == 2 and "test split is empty" in capsys.readouterr().err


def test_unlabelled_rows_are_left_out(corpus, checkpoint, tmp_path):
    records = read_manifest(corpus)
    records[0].labels = []
    records[1].split = None
    task = le.read_task(write_manifest(records, tmp_path / "partial.csv"))
    assert task.n_unlabelled == 1 and task.n_no_split == 1
    assert records[0].id not in task.labels and records[1].id not in task.labels
    assert len(task.labels) == len(records) - 2


# ------------------------------------------------------------------------------------ unit-length inputs
def test_fit_to_unit_crops_randomly_and_pads_with_zeros():
    import torch

    wave = torch.arange(10, dtype=torch.float32)
    padded = le.fit_to_unit(wave, 14, np.random.default_rng(0))
    assert padded.tolist() == list(range(10)) + [0, 0, 0, 0]
    starts = {int(le.fit_to_unit(wave, 4, np.random.default_rng(s))[0]) for s in range(40)}
    assert starts == set(range(7))  # every start 0..n-unit is reachable
    crop = le.fit_to_unit(wave, 4, np.random.default_rng(3))
    assert crop.tolist() == list(range(int(crop[0]), int(crop[0]) + 4))
    assert le.fit_to_unit(wave, 10, np.random.default_rng(0)) is wave


def test_unit_length_is_the_mean_duration_and_matches_manual_cuts(corpus, checkpoint, tmp_path):
    import soundfile as sf

    records = read_manifest(corpus)[:6]
    durations = [sf.info(str(r.audio)).duration for r in records]
    assert le.mean_duration(records) == pytest.approx(np.mean(durations))
    model = m2dclap.load(checkpoint, audio_only=True)
    unit = round(0.7 * model.sample_rate)
    feats = le.extract_clip_features(model, records, batch_size=4, progress=False, unit_samples=unit, seed=5)
    for i in (0, 5):
        wave = le.fit_to_unit(
            m2dclap.load_audio(records[i].audio, model.sample_rate), unit, np.random.default_rng([5, i])
        )
        alone = model.audio_features([wave], sample_rate=model.sample_rate)["clip"][0].detach().numpy()
        np.testing.assert_allclose(feats.clip[i], alone, rtol=1e-4, atol=1e-5)


def test_unit_seconds_option_reaches_the_result_and_the_cache_key(corpus, checkpoint, tmp_path):
    cache = tmp_path / "cache"
    rc, auto = run(checkpoint, corpus, tmp_path, "--cache", str(cache))
    assert rc == 0 and auto["unit_seconds"] == pytest.approx(le.mean_duration(read_manifest(corpus)))
    rc, whole = run(checkpoint, corpus, tmp_path, "--cache", str(cache), "--unit-seconds", "0")
    assert rc == 0 and whole["unit_seconds"] is None and not whole["cache_hit"]
    assert len(list(cache.iterdir())) == 2
    with pytest.raises(SystemExit):
        le.main(["--checkpoint", str(checkpoint), "--data", str(corpus), "--unit-seconds", "long"])


def test_best_epoch_at_the_cap_warns_that_the_probe_may_not_have_converged(
    corpus, checkpoint, tmp_path, caplog, capsys
):
    rc, res = run(checkpoint, corpus, tmp_path, "--epochs", "1")  # the only epoch is the best: at the cap
    assert rc == 0 and res["best_epoch"] == 1 and res["maybe_unconverged"] is True
    assert "may not have converged" in capsys.readouterr().out
    assert any("may not have converged" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    rc, res = run(checkpoint, corpus, tmp_path, "--epochs", "60", "--patience", "1", "--lr", "1e-2")
    assert rc == 0 and res["stopped_early"] and res["maybe_unconverged"] is False


@pytest.mark.parametrize(
    "args, named, usage",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1", False),
        (["--patience", "0"], "--patience must be at least 1", False),
        (["--lr", "0"], "--lr must be positive", True),
        (["--unit-seconds", "-1"], "--unit-seconds must not be negative", True),
        (["--device", "tpu:x"], "--device tpu:x: not a device", False),
    ],
)
def test_bad_option_values_exit_2_naming_the_option(corpus, checkpoint, tmp_path, capsys, args, named, usage):
    out = tmp_path / "result.json"
    out.write_text("{}")
    before = out.read_bytes()
    argv = ["--checkpoint", str(checkpoint), "--data", str(corpus), "--out", str(out), *args]
    if usage:  # a wrong value reported with the usage line, as argparse does
        with pytest.raises(SystemExit) as info:
            le.main(argv)
        assert info.value.code == 2
    else:
        assert le.main(argv) == 2
    assert named in capsys.readouterr().err
    assert out.read_bytes() == before


def test_missing_manifest_exits_2_naming_it(checkpoint, tmp_path, capsys):
    missing = tmp_path / "no-such.csv"
    assert le.main(["--checkpoint", str(checkpoint), "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "python -m m2dclap.linear_eval: error:" in err and str(missing) in err and "Traceback" not in err
