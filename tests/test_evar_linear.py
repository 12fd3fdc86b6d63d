"""The linear evaluation follows EVAR's protocol: each rule on a small synthetic feature set or manifest."""

from __future__ import annotations

import numpy as np

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
