"""Retrieval and classification metrics in the CLAP-paper convention (paper Table VIII).

Text->audio: every caption is a query with one relevant clip; R@k = mean(rank < k);
mAP@10 = mean(1 / (rank + 1) if rank < 10 else 0).
Audio->text: every clip is a query; R@k counts the best-ranked of the clip's captions; mAP@10 sums
i / rank_i over the clip's captions ranked in the top 10 (ranks sorted, 1-based) and divides by the number of
captions of the clip (WavCaps; LAION-CLAP forgets to sort the ranks, which inflates the figure).
Similarities are processed in blocks of queries so memory stays bounded.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)

KS = (1, 5, 10)


def _ranks_of_relevant(sim: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's relevant column; ties count against the query (pessimistic)."""
    target = sim.gather(1, relevant[:, None])
    return (sim > target).sum(1) + (sim == target).sum(1) - 1


def text_to_audio(
    text_emb: torch.Tensor, audio_emb: torch.Tensor, caption_audio: torch.Tensor, block: int = 4096
) -> dict[str, float]:
    """text_emb (Q, D), audio_emb (N, D), caption_audio (Q,) index of each caption's clip."""
    ranks = torch.cat(
        [
            _ranks_of_relevant(text_emb[i : i + block] @ audio_emb.T, caption_audio[i : i + block])
            for i in range(0, len(text_emb), block)
        ]
    ).float()
    out = {f"R@{k}": (ranks < k).float().mean().item() for k in KS}
    out["mAP@10"] = torch.where(ranks < 10, 1.0 / (ranks + 1), torch.zeros_like(ranks)).mean().item()
    return out


def audio_to_text(
    audio_emb: torch.Tensor, text_emb: torch.Tensor, caption_audio: torch.Tensor, block: int = 1024
) -> dict[str, float]:
    """Each clip queries all captions; its relevant captions are those with caption_audio == clip."""
    n_audio = audio_emb.shape[0]
    n_caps = torch.bincount(caption_audio, minlength=n_audio).float()
    hits = {k: torch.zeros(n_audio) for k in KS}
    ap = torch.zeros(n_audio)
    for s in range(0, n_audio, block):
        sim = audio_emb[s : s + block] @ text_emb.T  # (b, Q)
        rel = caption_audio[None, :] == torch.arange(s, s + sim.shape[0])[:, None]  # (b, Q)
        # Relevant scores sorted best first, padded with -inf: (b, C_max)
        c_max = int(rel.sum(1).max().item()) if rel.numel() else 0
        rel_scores = torch.where(rel, sim, torch.full_like(sim, -math.inf)).topk(max(c_max, 1), dim=1).values
        # Position (1-based) of the i-th relevant caption, ties counted against the query: every irrelevant
        # caption scoring >= it comes first, then the i - 1 better relevant ones.
        irr_ge = torch.stack([((sim >= rel_scores[:, i : i + 1]) & ~rel).sum(1) for i in range(rel_scores.shape[1])], 1)
        order = torch.arange(1, rel_scores.shape[1] + 1)
        position = (irr_ge + order).float()
        valid = torch.isfinite(rel_scores)
        for k in KS:
            hits[k][s : s + sim.shape[0]] = ((position[:, 0] <= k) & valid[:, 0]).float()
        in_top = valid & (position <= 10)
        ap[s : s + sim.shape[0]] = torch.where(in_top, order / position, torch.zeros_like(position)).sum(1)
    out = {f"R@{k}": hits[k].mean().item() for k in KS}
    out["mAP@10"] = (ap / n_caps.clamp_min(1)).mean().item()
    return out


def chance_text_to_audio(n_audio: int) -> dict[str, float]:
    """Expected figures of a random ranking: R@k = k/N, mAP@10 = (1/N) sum_{r<=10} 1/r."""
    out = {f"R@{k}": min(k / n_audio, 1.0) for k in KS}
    out["mAP@10"] = sum(1.0 / r for r in range(1, min(10, n_audio) + 1)) / n_audio
    return out


def chance_audio_to_text(n_captions: int, n_relevant: int) -> dict[str, float]:
    """Random ranking of ``n_captions`` captions of which ``n_relevant`` are relevant (hypergeometric)."""
    M, C = n_captions, n_relevant

    def p_none_in_top(k: int) -> float:
        return math.comb(M - C, k) / math.comb(M, k) if k <= M - C else 0.0

    out = {f"R@{k}": 1.0 - p_none_in_top(min(k, M)) for k in KS}
    # E[i / p_i] for the i-th relevant at position p: P(position p relevant and i-1 relevant before it).
    ap = 0.0
    for p in range(1, min(10, M) + 1):
        for i in range(1, min(C, p) + 1):
            # P(i relevant among the top p and the p-th one relevant) = hypergeometric(i) * i / p
            prob = math.comb(C, i) * math.comb(M - C, p - i) / math.comb(M, p) * (i / p)
            ap += prob * i / p
    out["mAP@10"] = ap / C
    return out


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def accuracy(scores, targets) -> float:
    """Top-1 accuracy of (N, C) class scores against (N,) class indices (arrays or tensors); NaN for N = 0."""
    s, t = _numpy(scores), _numpy(targets)
    if s.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {s.shape}")
    if len(t) != len(s):
        raise ValueError(f"{len(s)} score rows but {len(t)} targets")
    if len(t) == 0:
        return float("nan")
    return float((s.argmax(axis=1) == t).mean())


# Average precision as scikit-learn's average_precision_score (tied scores form one threshold); used by
# zero-shot, linear evaluation and AudioSet fine-tuning.
def average_precision(y_true, scores) -> float:
    """AP of one class: y_true (N,) in {0, 1}, scores (N,) (arrays or tensors). NaN when there is no positive."""
    y = _numpy(y_true).astype(bool).ravel()
    s = _numpy(scores).astype(np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ in shape")
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    # the last position of each run of tied scores is a threshold of the curve
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(y_true, scores, no_positive: str = "zero") -> tuple[float, np.ndarray, list[int]]:
    """Macro mAP over classes of (N, C) 0/1 targets and (N, C) scores (arrays or tensors, targets first).

    Returns ``(mAP, per-class AP (C,), indices of classes without a positive)``. Those classes count as AP 0
    with ``no_positive="zero"`` (scikit-learn's and EVAR's figure) or are left out of the mean with
    ``"exclude"``; their per-class AP is NaN either way.
    """
    y, s = _numpy(y_true), _numpy(scores).astype(np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"targets {y.shape} and scores {s.shape} differ in shape")
    if no_positive not in ("zero", "exclude"):
        raise ValueError(f"no_positive must be 'zero' or 'exclude', got {no_positive!r}")
    ap = np.array([average_precision(y[:, c], s[:, c]) for c in range(s.shape[1])])
    empty = [int(c) for c in np.flatnonzero(np.isnan(ap))]
    if empty:
        log.warning(
            "%d of %d class(es) have no positive clip; their AP is %s",
            len(empty),
            len(ap),
            "0 in the mean (as scikit-learn)" if no_positive == "zero" else "left out of the mean",
        )
    if len(empty) == len(ap):
        return float("nan"), ap, empty
    mean = np.nan_to_num(ap, nan=0.0).mean() if no_positive == "zero" else np.nanmean(ap)
    return float(mean), ap, empty
