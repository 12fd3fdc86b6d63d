"""Retrieval and classification metrics in the CLAP-paper convention (paper Table VIII).

Text->audio: every caption is a query with one relevant clip; R@k = mean(rank < k);
mAP@10 = mean(1 / (rank + 1) if rank < 10 else 0).
Audio->text: every clip is a query; R@k counts the best-ranked of the clip's captions; mAP@10 sums
i / rank_i over the clip's captions ranked in the top 10 (ranks sorted, 1-based) and divides by the number of
captions of the clip (WavCaps; LAION-CLAP forgets to sort the ranks, which inflates the figure).
Similarities are processed in blocks of queries so memory stays bounded.
"""
from __future__ import annotations

import math

import torch

KS = (1, 5, 10)


def _ranks_of_relevant(sim: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's relevant column; ties count against the query (pessimistic)."""
    target = sim.gather(1, relevant[:, None])
    return (sim > target).sum(1) + (sim == target).sum(1) - 1


def text_to_audio(text_emb: torch.Tensor, audio_emb: torch.Tensor, caption_audio: torch.Tensor,
                  block: int = 4096) -> dict[str, float]:
    """text_emb (Q, D), audio_emb (N, D), caption_audio (Q,) index of each caption's clip."""
    ranks = torch.cat([_ranks_of_relevant(text_emb[i:i + block] @ audio_emb.T, caption_audio[i:i + block])
                       for i in range(0, len(text_emb), block)]).float()
    out = {f"R@{k}": (ranks < k).float().mean().item() for k in KS}
    out["mAP@10"] = torch.where(ranks < 10, 1.0 / (ranks + 1), torch.zeros_like(ranks)).mean().item()
    return out


def audio_to_text(audio_emb: torch.Tensor, text_emb: torch.Tensor, caption_audio: torch.Tensor,
                  block: int = 1024) -> dict[str, float]:
    """Each clip queries all captions; its relevant captions are those with caption_audio == clip."""
    n_audio = audio_emb.shape[0]
    n_caps = torch.bincount(caption_audio, minlength=n_audio).float()
    hits = {k: torch.zeros(n_audio) for k in KS}
    ap = torch.zeros(n_audio)
    for s in range(0, n_audio, block):
        sim = audio_emb[s:s + block] @ text_emb.T  # (b, Q)
        rel = caption_audio[None, :] == torch.arange(s, s + sim.shape[0])[:, None]  # (b, Q)
        # Relevant scores sorted best first, padded with -inf: (b, C_max)
        c_max = int(rel.sum(1).max().item()) if rel.numel() else 0
        rel_scores = torch.where(rel, sim, torch.full_like(sim, -math.inf)).topk(max(c_max, 1), dim=1).values
        # Position (1-based) of the i-th relevant caption, ties counted against the query: every irrelevant
        # caption scoring >= it comes first, then the i - 1 better relevant ones.
        irr_ge = torch.stack([((sim >= rel_scores[:, i:i + 1]) & ~rel).sum(1) for i in range(rel_scores.shape[1])], 1)
        order = torch.arange(1, rel_scores.shape[1] + 1)
        position = (irr_ge + order).float()
        valid = torch.isfinite(rel_scores)
        for k in KS:
            hits[k][s:s + sim.shape[0]] = ((position[:, 0] <= k) & valid[:, 0]).float()
        in_top = valid & (position <= 10)
        ap[s:s + sim.shape[0]] = torch.where(in_top, order / position, torch.zeros_like(position)).sum(1)
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


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of (N, C) class scores against (N,) label indices."""
    return (scores.argmax(1) == labels).float().mean().item()
