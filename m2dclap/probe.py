"""The linear probe of the EVAR protocol (paper IV-B1) on features already at hand: standardise with the
statistics of train and validation together, train one linear layer with Adam (weight decay 1e-8), keep the
epoch with the best validation score (an equal score counts as better).

    probe = train_linear_probe(x_train, y_train, x_val, y_val)
    score = score_predictions(y_test, probe.predict(x_test))

Single-label targets (N,) use cross-entropy and accuracy; multi-hot targets (N, C) binary cross-entropy and
the macro mAP over all classes, a class without a positive scoring 0 (EVAR's figure with current scikit-learn;
:func:`m2dclap.metrics.mean_average_precision`, ``no_positive="zero"``).
:mod:`m2dclap.linear_eval` reads a manifest, extracts and caches the features and calls this.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import accuracy, mean_average_precision

log = logging.getLogger(__name__)


class LinearEvalError(ValueError):
    """A request that cannot be evaluated (a missing column, no labels, an empty split, no features)."""


def score_predictions(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Accuracy for (N,) class indices; for (N, C) multi-hot targets the macro mAP over all C classes, a class
    without a positive counting as AP 0 (as EVAR with current scikit-learn)."""
    if y_true.ndim == 1:
        return accuracy(y_score, y_true)
    return mean_average_precision(y_true, y_score, no_positive="zero")[0]


def target_matrix(ids: Sequence[str], labels: dict[str, list[str]], classes: list[str], multilabel: bool) -> np.ndarray:
    """The probe's targets of clips ``ids``: class indices (N,), or multi-hot (N, C) when ``multilabel``."""
    index = {c: j for j, c in enumerate(classes)}
    if not multilabel:
        return np.array([index[labels[i][0]] for i in ids], dtype=np.int64)
    y = np.zeros((len(ids), len(classes)), dtype=np.float32)
    for n, i in enumerate(ids):
        y[n, [index[lab] for lab in labels[i]]] = 1.0
    return y


def chance_level(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy of always answering the most frequent train class, or the mAP of random scores (the mean
    positive rate over all classes: a class without a positive counts 0, as in :func:`score_predictions`)."""
    if y_train.ndim == 1:
        return float((y_test == np.bincount(y_train).argmax()).mean())
    return float(y_test.mean(0).mean())


@dataclass
class ProbeResult:
    """A trained linear probe and how its training went (epochs are 1-based)."""

    metric: str  # "accuracy" or "mAP"
    val_score: float  # validation score of the kept (best) epoch
    best_epoch: int  # the epoch whose weights are kept
    epochs_run: int  # epochs trained before stopping
    stopped_early: bool  # patience ran out before the epoch limit
    mean: np.ndarray  # (D,) feature mean of train and validation together (EVAR's scaler)
    std: np.ndarray  # (D,) their standard deviation (1 where a feature is constant)
    weight: torch.Tensor  # (C, D) of the best epoch
    bias: torch.Tensor  # (C,)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train/val loss, val score

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Raw features (N, D) -> logits (N, C), standardised with the train+validation statistics."""
        z = torch.from_numpy(((np.asarray(x, dtype=np.float32) - self.mean) / self.std).astype(np.float32))
        return (z @ self.weight.T + self.bias).numpy()


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and population std of ``x``; constant features get std 1."""
    mean = x.mean(0, dtype=np.float64)
    std = x.std(0, dtype=np.float64)
    std[std < 1e-12] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y) if y.dim() == 1 else F.binary_cross_entropy_with_logits(logits, y)


def train_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int | None = None,
    epochs: int = 200,
    patience: int = 20,
    lr: float = 3e-5,
    batch_size: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    weight_decay: float = 1e-8,
) -> ProbeResult:
    """Train one linear layer on standardised features with Adam, keeping the best-validation epoch.
    The scaler is fitted on train and validation together and Adam's weight decay is 1e-8, as EVAR's.

    Args:
        x_train, x_val: features (N, D).
        y_train, y_val: class indices (N,) for single-label (cross-entropy, accuracy) or multi-hot (N, C)
            for multi-label (binary cross-entropy, macro mAP).
        n_classes: single-label only; default the largest index + 1.
        epochs: the most epochs; patience: stop after this many epochs without a validation score at least
            as good as the best so far (EVAR: an equal score resets the patience and its later epoch is kept).
        batch_size: mini-batch size, capped at the train size (EVAR: min(200, N)).
    """
    if len(x_train) == 0 or len(x_val) == 0:
        raise LinearEvalError(f"need train and validation features, got {len(x_train)} and {len(x_val)}")
    multilabel = y_train.ndim == 2
    C = y_train.shape[1] if multilabel else int(n_classes or max(y_train.max(), y_val.max()) + 1)
    device = torch.device(device)
    mean, std = standardisation(np.concatenate([x_train, x_val]))

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xt = torch.from_numpy(((x - mean) / std).astype(np.float32)).to(device)
        return xt, torch.as_tensor(y, dtype=torch.float32 if multilabel else torch.long, device=device)

    (xt, yt), (xv, yv) = tensors(x_train, y_train), tensors(x_val, y_val)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(x_train.shape[1], C).to(device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    bs = max(1, min(batch_size, len(xt)))
    best = (-math.inf, 0, layer.weight.detach().clone(), layer.bias.detach().clone())
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, epochs + 1):
        layer.train()
        total = 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(bs):
            idx = idx.to(device)
            loss = _loss(layer(xt[idx]), yt[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        layer.eval()
        with torch.no_grad():
            logits = layer(xv)
            val_loss = float(_loss(logits, yv))
        val = score_predictions(np.asarray(y_val), logits.cpu().numpy())
        history.append({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss, "val_score": val})
        log.debug("epoch %d: train loss %.5f, val loss %.5f, val score %.5f", epoch, total / len(xt), val_loss, val)
        if not math.isnan(val) and val >= best[0]:
            best = (val, epoch, layer.weight.detach().clone(), layer.bias.detach().clone())
        elif epoch - best[1] >= patience:
            break
    val_score, best_epoch, weight, bias = best
    return ProbeResult(
        metric="mAP" if multilabel else "accuracy",
        val_score=val_score,
        best_epoch=best_epoch,
        epochs_run=epoch,
        stopped_early=epoch < epochs,
        mean=mean,
        std=std,
        weight=weight.cpu(),
        bias=bias.cpu(),
        history=history,
    )


def train_over_seeds(
    x: dict[str, np.ndarray], y: dict[str, np.ndarray], seeds: Sequence[int], n_classes: int | None = None, **train_kw
) -> dict[str, Any]:
    """EVAR's figure: the probe trained once per seed on ``x``/``y`` (by split: train, val, test), each scored on
    test, and the scores averaged. Returns ``value`` (the mean), ``seed_values``, the mean ``val_value``, the
    longest run (``epochs_run``, ``best_epoch``), ``stopped_early`` (every seed), ``maybe_unconverged`` (any
    seed's best epoch in the last tenth of ``epochs`` without stopping early), the per-class AP averaged over
    the seeds for multi-label targets, and ``seeds``: each seed's figures and history."""
    epochs = train_kw.get("epochs", 200)
    runs, per_class = [], []
    for seed in seeds:
        probe = train_linear_probe(x["train"], y["train"], x["val"], y["val"], n_classes, seed=seed, **train_kw)
        logits = probe.predict(x["test"])
        if y["test"].ndim == 2:
            per_class.append(mean_average_precision(y["test"], logits, no_positive="zero")[1])
        unconverged = not probe.stopped_early and probe.best_epoch > 0.9 * epochs
        runs.append(
            {
                "seed": seed,
                "value": score_predictions(y["test"], logits),
                "val_value": probe.val_score,
                "epochs_run": probe.epochs_run,
                "best_epoch": probe.best_epoch,
                "stopped_early": probe.stopped_early,
                "maybe_unconverged": unconverged,
                "history": probe.history,
            }
        )
    out: dict[str, Any] = {
        "metric": "mAP" if y["train"].ndim == 2 else "accuracy",
        "value": float(np.mean([r["value"] for r in runs])),
        "seed_values": [r["value"] for r in runs],
        "val_value": float(np.mean([r["val_value"] for r in runs])),
        "epochs_run": max(r["epochs_run"] for r in runs),
        "best_epoch": max(r["best_epoch"] for r in runs),
        "stopped_early": all(r["stopped_early"] for r in runs),
        "maybe_unconverged": any(r["maybe_unconverged"] for r in runs),
        "seeds": runs,
    }
    if per_class:
        out["per_class_ap"] = np.mean(per_class, axis=0)  # (C,), NaN for a class without a test positive
    return out


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads. The probe's steps are small matmuls (batch 200 x D x C): a second
    thread gains little on a quiet machine, and when other jobs share the cores every step waits for a
    descheduled thread (measured on 2 shared cores, 100 epochs: 2.1-8.6 s with one thread, 14-15 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
