"""The linear evaluation follows EVAR's protocol: each rule on a small synthetic feature set or manifest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
