"""The linear evaluation follows EVAR's protocol: each rule on a small synthetic feature set or manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import m2dclap
from m2dclap import linear_eval as le
from m2dclap import probe as pr


def separable(n_per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    x = np.eye(3, 8)[y] * 20 + rng.standard_normal((len(y), 8)) * 0.1
    return x.astype(np.float32), y


# ----------------------------------------------------------------------------------------------- early stopping
def test_an_equal_validation_score_resets_the_patience_and_the_later_epoch_is_kept():
    x, y = separable(10, seed=0)
    xv, yv = separable(5, seed=1)
    probe = pr.train_linear_probe(x, y, xv, yv, epochs=8, patience=2, lr=0.5, seed=0)
    scores = [h["val_score"] for h in probe.history]
    assert scores[1:] == [1.0] * 7  # a plateau from the second epoch on
    # strict '>' would keep epoch 2 and stop at epoch 4
    assert probe.best_epoch == 8 and probe.epochs_run == 8 and not probe.stopped_early


# ----------------------------------------------------------------------------------------------- scaler, weight decay
def test_the_scaler_is_fitted_on_train_and_valid_and_adam_decays_weights_by_1e_8(monkeypatch):
    x, y = separable(10, seed=0)
    xv, yv = separable(5, seed=1)
    xv = xv + 100.0  # validation far from train: a train-only scaler would have another mean
    seen = {}
    adam = torch.optim.Adam

    def spy(params, **kwargs):
        seen.update(kwargs)
        return adam(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    probe = pr.train_linear_probe(x, y, xv, yv, epochs=2, patience=2, lr=1e-2, seed=0)
    both = np.concatenate([x, xv]).astype(np.float64)
    np.testing.assert_allclose(probe.mean, both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(probe.std, both.std(0), rtol=1e-5)
    assert seen["weight_decay"] == 1e-8


# ----------------------------------------------------------------------------------------------- mAP
def test_multilabel_map_averages_over_all_classes_a_class_without_positives_scoring_zero():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32)  # class 2: no positive
    s = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.1], [0.8, 0.7, 0.4], [0.2, 0.1, 0.3]])
    assert pr.score_predictions(y, s) == pytest.approx((1.0 + 1.0 + 0.0) / 3)  # not 1.0 over the two scored
    assert pr.chance_level(y, y) == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_help_says_how_map_treats_a_class_without_positives(capsys):
    with pytest.raises(SystemExit):
        le.main(["--help"])
    assert "scores 0" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------------------------- test crops
def test_test_clips_are_cropped_from_the_start_train_and_valid_at_random(tmp_path, monkeypatch):
    import soundfile as sf

    from m2dclap import eval_features as ef
    from m2dclap.data.manifest import Record

    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    sr, unit = model.sample_rate, model.sample_rate // 2
    records = []
    for i in range(8):  # ramps of 3 units: a crop's first sample tells where it starts
        path = tmp_path / f"c{i}.wav"
        sf.write(path, np.linspace(-0.9, 0.9, 3 * unit, dtype=np.float32), sr, subtype="FLOAT")
        records.append(Record(id=f"c{i}", audio=path, labels=["a"], split="test" if i < 4 else "train"))
    # the "feature" of a clip: the first sample of its cut
    monkeypatch.setattr(ef, "_encode", lambda model, waves: [w[:1].numpy() for w in waves])
    feats = ef.extract_clip_features(
        model, records, batch_size=4, progress=False, unit_samples=unit, seed=0, from_start=[r.id for r in records[:4]]
    )
    first = feats.clip[:, 0]
    np.testing.assert_allclose(first[:4], -0.9, atol=1e-6)  # test: from the start
    assert (first[4:] > -0.89).any()  # train: random crops (today's rule crops every clip at random)


def test_the_cache_key_holds_the_crop_seed_and_which_clips_are_cropped_from_the_start(tmp_path):
    from m2dclap.data.manifest import Record, write_manifest
    from m2dclap.eval_features import cache_key

    records = [Record(id=f"c{i}", audio=tmp_path / f"c{i}.wav", labels=["a"], split="train") for i in range(3)]
    manifest = write_manifest(records, tmp_path / "m.csv")
    key = cache_key("tiny", manifest, records, 1.0, seed=0, from_start=["c0"])
    assert key == cache_key("tiny", manifest, records, 1.0, seed=0, from_start=["c0"])
    assert key != cache_key("tiny", manifest, records, 1.0, seed=1, from_start=["c0"])
    assert key != cache_key("tiny", manifest, records, 1.0, seed=0, from_start=["c1"])
    assert key != cache_key("tiny", manifest, records, 1.0, seed=0)


# ----------------------------------------------------------------------------------------------- per-task units
def test_known_tasks_get_evars_unit_explicit_seconds_win_others_keep_the_mean_duration(tmp_path):
    import soundfile as sf

    from m2dclap import eval_protocol as ep
    from m2dclap.data.manifest import Record

    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(1600, np.float32), 16000)  # 0.1 s
    records = [Record(id="a", audio=path, labels=["x"], split="train")]
    assert ep.unit_length("esc50", "auto", records) == (5.0, "EVAR's unit for esc50")
    assert ep.unit_length("ESC-50", "auto", records)[0] == 5.0
    units = {"us8k": 4.0, "fsd50k": 7.6358, "gtzan": 30, "nsynth": 4, "cremad": 2.5, "spcv2": 1.0}
    units |= {"vc1": 8.2, "voxforge": 5.8, "surge": 4.0}
    assert all(ep.unit_length(t, "auto", records)[0] == u for t, u in units.items())
    assert ep.unit_length("esc50", 2.0, records) == (2.0, "--unit-seconds")
    unit, why = ep.unit_length(None, "auto", records)
    assert unit == pytest.approx(0.1) and "mean" in why
    with pytest.raises(le.LinearEvalError, match="esc50"):
        ep.task_name("esc-51")


def test_task_option_reaches_the_result_json_and_line(tmp_path, monkeypatch, capsys):
    from m2dclap.data.manifest import Record, write_manifest

    records = [
        Record(id=f"c{i}", audio=tmp_path / f"c{i}.wav", labels=["ab"[i % 2]], split=["train", "val", "test"][i % 3])
        for i in range(12)
    ]
    manifest = write_manifest(records, tmp_path / "m.csv")
    seen = {}

    def fake_features(checkpoint, manifest, records, *args, **kwargs):
        seen["unit"] = args[4]
        x = np.array([[float(r.id[1:]) % 2, 1.0] for r in records], np.float32)
        return le.Features([r.id for r in records], x, []), {"unit_seconds": args[4]}

    monkeypatch.setattr(le, "clip_features", fake_features)
    out = tmp_path / "r.json"
    rc = le.main(["-c", "tiny", "--data", str(manifest), "--task", "esc50", "--epochs", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and seen["unit"] == 5.0 and res["unit_seconds"] == 5.0
    assert res["evar_task"] == "esc50" and res["unit_rule"] == "EVAR's unit for esc50"
    assert "unit 5 s (EVAR's unit for esc50)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        le.main(["-c", "tiny", "--data", str(manifest), "--task", "nope"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------- carved validation
def test_a_carved_validation_set_is_drawn_again_until_it_holds_every_train_class(caplog):
    ids = [f"c{i}" for i in range(40)]
    labels = {i: ["common"] for i in ids} | {"c7": ["rare"], "c23": ["rare"], "c31": ["other"], "c2": ["other"]}
    first = le.carve_val(ids, seed=0)[1]  # today's single draw
    train, val = le.carve_val(ids, seed=0, labels=labels)
    assert len(val) == 4 and sorted(train + val) == sorted(ids)
    assert {c for i in val for c in labels[i]} == {"common", "rare", "other"}
    assert {c for i in first for c in labels[i]} != {"common", "rare", "other"}  # one draw was not enough
    assert le.carve_val(ids, seed=0, labels=labels) == (train, val)  # seeded


def test_a_carved_validation_set_that_cannot_hold_every_class_warns(caplog):
    ids = [f"c{i}" for i in range(10)]
    labels = {i: [f"class{i}"] for i in ids}  # ten classes, one validation clip
    train, val = le.carve_val(ids, seed=0, labels=labels, max_draws=5)
    assert len(val) == 1 and "lacks 9" in caplog.text


# ----------------------------------------------------------------------------------------------- seeds
def test_the_probe_is_trained_with_three_seeds_by_default_and_the_scores_averaged(tmp_path, monkeypatch, capsys):
    from m2dclap.data.manifest import Record, write_manifest

    rng = np.random.default_rng(0)
    records = [
        Record(id=f"c{i}", audio=tmp_path / f"c{i}.wav", labels=["ab"[i % 2]], split=["train", "val", "test"][i % 3])
        for i in range(60)
    ]
    manifest = write_manifest(records, tmp_path / "m.csv")
    x = rng.standard_normal((60, 6)).astype(np.float32)
    x[:, 0] += np.arange(60) % 2 * 0.7  # weakly separable: the seeds differ

    def fake_features(checkpoint, manifest, records, *args, **kwargs):
        return le.Features([r.id for r in records], x, []), {"unit_seconds": None}

    monkeypatch.setattr(le, "clip_features", fake_features)
    out = tmp_path / "r.json"
    rc = le.main(["-c", "tiny", "--data", str(manifest), "--epochs", "3", "--lr", "1e-2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["n_seeds"] == 3 and [r["seed"] for r in res["seeds"]] == [0, 1, 2]
    assert len(res["seed_values"]) == 3 and res["value"] == pytest.approx(np.mean(res["seed_values"]))
    assert [r["value"] for r in res["seeds"]] == res["seed_values"]
    assert "mean of 3 seeds" in capsys.readouterr().out
    rc = le.main(["-c", "tiny", "--data", str(manifest), "--epochs", "3", "--seeds", "1", "--out", str(out)])
    assert rc == 0 and len(json.loads(out.read_text())["seed_values"]) == 1


# ----------------------------------------------------------------------------------------------- folds
def test_leave_one_fold_out_from_the_fold_column_averages_the_folds(tmp_path, monkeypatch, capsys):
    rows = ["id,audio,labels,fold"] + [f"c{i},c{i}.wav,{'ab'[i % 2]},{i % 5 + 1}" for i in range(50)]
    manifest = tmp_path / "esc.csv"
    manifest.write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    x[:, 0] += np.arange(50) % 2 * 3.0
    calls = []

    def fake_features(checkpoint, manifest, records, *args, from_start=(), **kwargs):
        calls.append(sorted(from_start))
        return le.Features([r.id for r in records], x, []), {"unit_seconds": args[4]}

    monkeypatch.setattr(le, "clip_features", fake_features)
    out = tmp_path / "r.json"
    args = ["-c", "tiny", "--data", str(manifest), "--epochs", "3", "--lr", "1e-2", "--seeds", "1", "--out", str(out)]
    assert le.main([*args, "--task", "esc50"]) == 0  # automatic: esc50 with a fold column
    res = json.loads(out.read_text())
    assert list(res["fold_values"]) == ["1", "2", "3", "4", "5"]
    assert res["value"] == pytest.approx(np.mean(list(res["fold_values"].values())))
    assert res["n_test"] == 10 and res["n_train"] + res["n_val"] == 40 and res["val_from_train"]
    assert [f["n_test"] for f in res["folds"]] == [10] * 5
    # features twice: train clips cropped at random, test clips from the start
    assert calls == [[], sorted(f"c{i}" for i in range(50))]
    assert "mean of 5 folds" in capsys.readouterr().out
    assert le.main([*args, "--folds", "--unit-seconds", "0"]) == 0  # explicit, any task
    assert len(json.loads(out.read_text())["fold_values"]) == 5


def test_help_names_the_protocol_and_the_options_that_depart_from_it(capsys):
    with pytest.raises(SystemExit):
        le.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "EVAR's protocol" in text and "per-task units" in text
    assert "Departing from it: --unit-seconds, --seeds other than 3" in text
    assert "EVAR's protocol" in le.__doc__ and "depart from EVAR's protocol" in " ".join(le.__doc__.split())
