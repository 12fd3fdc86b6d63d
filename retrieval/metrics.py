"""Retrieval metrics in two named conventions, computed in bounded memory.

Both conventions rank every candidate of a query by similarity and look at the 1-based positions of the
query's relevant candidates. Ties are pessimistic, as in :mod:`m2dclap.metrics`: an irrelevant candidate with
the same score as a relevant one is ranked before it. With the relevant scores sorted, ``t_1 >= t_2 >= ...``,
the i-th relevant candidate sits at position ``p_i = i + #{irrelevant candidates scoring >= t_i}``.

``clap`` (the CLAP papers, paper Table VIII; WavCaps ``a2t``/``t2a``):
    * R@k = mean over queries of ``[p_1 <= k]`` (the best-ranked relevant candidate; for audio->text the best
      of the clip's captions);
    * mAP@10 = mean over queries of ``sum_{p_i <= 10} i / p_i`` divided by the number of relevant candidates
      (text->audio: one clip, so ``1 / p_1``; audio->text: the clip's captions, ranks sorted).

``dcase`` (DCASE 2023 ``xmodal_retrieval.measure`` and 2025 ``average_precision_at_k``, information-retrieval
style):
    * R@k = mean over queries of ``#{p_i <= k} / n_relevant`` (so audio->text R@1 <= 1/5 with five captions);
    * mAP@K = as above with a cut-off K (10, and 16 for the 2025 multi-positive annotations), always divided by
      the total number of relevant candidates, not ``min(K, n_relevant)``.

With exactly one relevant candidate per query the two conventions give the same numbers.

The figures of the CLAP convention equal :func:`m2dclap.metrics.text_to_audio` / ``audio_to_text`` (the
suite's quick evaluation); they differ only when a relevant caption ties with an irrelevant one, where
``m2dclap.metrics.audio_to_text`` takes the order of ``topk`` for mAP@10 and this module stays pessimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from m2dclap.metrics import KS, chance_audio_to_text, chance_text_to_audio

PROTOCOLS = ("clap", "dcase")
DCASE_MAP_CUTOFFS = (10, 16)  # mAP@10 (2022-2024 ranking metric) and mAP@16 (2025 ranking metric)
DEFAULT_BLOCK_BYTES = 256 * 2**20  # similarity rows computed at once: about this many bytes

PROTOCOL_TEXT = {
    "clap": "CLAP-paper convention (paper Table VIII; WavCaps t2a/a2t): every caption is a text->audio query "
    "with one relevant clip; every clip is an audio->text query whose relevant items are its captions. "
    "R@k = fraction of queries whose best-ranked relevant item is in the top k. mAP@10 = mean over "
    "queries of sum_{p_i<=10} i/p_i over the relevant items' sorted 1-based positions p_i, divided by "
    "the number of relevant items. Ties rank irrelevant items first (pessimistic). Cosine similarity.",
    "dcase": "DCASE multi-positive convention (2023 xmodal_retrieval.measure, 2025 average_precision_at_k): "
    "R@k = mean over queries of (relevant items in the top k) / (number of relevant items); "
    "mAP@K = mean over queries of sum_{p_i<=K} i/p_i divided by the number of relevant items (not "
    "min(K, n)), K = 10 and 16 (the 2025 ranking metric). Ties rank irrelevant items first "
    "(pessimistic). Cosine similarity.",
}


@dataclass
class Relevance:
    """Which candidates are relevant to each query, as compressed rows: query ``q`` has the candidates
    ``indices[indptr[q]:indptr[q + 1]]`` (no duplicates)."""

    indptr: torch.Tensor  # (Q + 1,) int64, offsets into indices
    indices: torch.Tensor  # (nnz,) int64, candidate indices
    n_candidates: int  # number of candidates every query ranks

    @property
    def n_queries(self) -> int:
        return self.indptr.numel() - 1

    def counts(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]], n_candidates: int) -> "Relevance":
        """From one list of relevant candidate indices per query (duplicates removed)."""
        rows = [sorted(set(int(i) for i in row)) for row in lists]
        for q, row in enumerate(rows):
            if row and (row[0] < 0 or row[-1] >= n_candidates):
                raise ValueError(f"query {q}: relevant index out of range 0..{n_candidates - 1}: {row}")
        counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
        indptr = torch.zeros(len(rows) + 1, dtype=torch.long)
        indptr[1:] = counts.cumsum(0)
        flat = [i for r in rows for i in r]
        return cls(indptr, torch.tensor(flat, dtype=torch.long), n_candidates)

    @classmethod
    def one_each(cls, target: torch.Tensor, n_candidates: int) -> "Relevance":
        """Query ``q`` has the single relevant candidate ``target[q]`` (text->audio with a caption's clip)."""
        target = torch.as_tensor(target, dtype=torch.long)
        if target.numel() and (target.min() < 0 or target.max() >= n_candidates):
            raise ValueError(f"relevant index out of range 0..{n_candidates - 1}")
        return cls(torch.arange(target.numel() + 1), target.clone(), n_candidates)

    @classmethod
    def grouped(cls, owner: torch.Tensor, n_queries: int) -> "Relevance":
        """Query ``j`` has the candidates ``c`` with ``owner[c] == j`` (audio->text with a clip's captions)."""
        owner = torch.as_tensor(owner, dtype=torch.long)
        return cls.from_pairs(owner, torch.arange(owner.numel()), n_queries, owner.numel())

    @classmethod
    def from_pairs(cls, query: torch.Tensor, candidate: torch.Tensor, n_queries: int, n_candidates: int) -> "Relevance":
        """From (query, candidate) index pairs, each pair once."""
        order = torch.argsort(query * max(n_candidates, 1) + candidate)
        query, candidate = query[order], candidate[order]
        indptr = torch.zeros(n_queries + 1, dtype=torch.long)
        indptr[1:] = torch.bincount(query, minlength=n_queries).cumsum(0)
        return cls(indptr, candidate, n_candidates)

    def transpose(self) -> "Relevance":
        """The same pairs seen from the candidates' side."""
        rows = torch.repeat_interleave(torch.arange(self.n_queries), self.counts())
        return Relevance.from_pairs(self.indices, rows, self.n_candidates, self.n_queries)


def relevant_positions(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    relevance: Relevance,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    normalize: bool = False,
) -> torch.Tensor:
    """1-based pessimistic positions of every query's relevant candidates, ascending, padded with ``inf``.

    queries (Q, D) and candidates (N, D) are compared by dot product, or by cosine similarity with
    ``normalize`` (done block by block, so the embeddings are never copied). The (Q, N) similarity matrix is
    never held whole: rows are computed in blocks of about ``block_bytes``.
    Returns (Q, M) float, M = the largest number of relevant candidates of a query.
    """
    Q, N = queries.shape[0], candidates.shape[0]
    if relevance.n_queries != Q or relevance.n_candidates != N:
        raise ValueError(f"relevance is {relevance.n_queries} x {relevance.n_candidates}, the embeddings {Q} x {N}")
    counts = relevance.counts()
    M = int(counts.max()) if Q else 0
    out = torch.full((Q, M), math.inf)
    if Q == 0 or M == 0:
        return out
    # Padded (Q, M) table of relevant indices; padding points at column 0 and is masked.
    slot = torch.arange(M)[None, :]
    valid = slot < counts[:, None]
    table = torch.zeros(Q, M, dtype=torch.long)
    table[valid] = relevance.indices
    if N >= 2**24:
        raise ValueError(f"{N} candidates: counts are summed in float32, exact only below 2**24")
    rows = max(1, min(Q, block_bytes // max(1, N * 8)))  # two float blocks: the scores and a work area
    candidates_t = candidates.float().T  # a view when the embeddings are float32 already
    inv_norm = 1.0 / _row_norms(candidates).clamp_min(1e-12) if normalize else None
    buffer, work = torch.empty(rows, N), torch.empty(rows, N)  # reused by every block
    for s in range(0, Q, rows):
        q = queries[s : s + rows].float()
        sim = torch.mm(F.normalize(q, dim=-1) if normalize else q, candidates_t, out=buffer[: q.shape[0]])  # (b, N)
        if inv_norm is not None:
            sim.mul_(inv_norm)  # cosine: divide each column by its candidate's norm
        ok = valid[s : s + rows]
        # relevant scores (b, M), sorted descending; padding is -inf and so comes last
        thr = sim.gather(1, table[s : s + rows]).masked_fill(~ok, -math.inf).sort(1, descending=True).values
        n_valid = ok.sum(1)
        ge_all = torch.zeros_like(thr)
        for m in range(int(n_valid.max())):
            # candidates scoring >= the m-th relevant score. (a - t) >= 0 exactly when a >= t for IEEE floats;
            # counting in a float work block avoids the (b, N) int64 copy that summing booleans makes.
            ge = torch.sub(sim, thr[:, m : m + 1], out=work[: sim.shape[0]]).ge_(0)
            ge_all[:, m] = ge.sum(1)
        # relevant ones among them: thr is sorted, so count by binary search (ties among relevant included)
        neg = (-thr).contiguous()
        ge_rel = torch.searchsorted(neg, neg, right=True).float()
        pos = torch.arange(1, M + 1, dtype=torch.float32)[None, :] + (ge_all - ge_rel)
        out[s : s + rows] = torch.where(slot < n_valid[:, None], pos, torch.full_like(pos, math.inf))
    return out


def _row_norms(x: torch.Tensor, rows: int = 65536) -> torch.Tensor:
    """L2 norm of every row, a block of rows at a time (no temporary as large as ``x``)."""
    return torch.cat([torch.linalg.vector_norm(x[s : s + rows].float(), dim=1) for s in range(0, x.shape[0], rows)])


def scores_from_positions(
    positions: torch.Tensor,
    n_relevant: torch.Tensor,
    protocol: str,
    ks: Sequence[int] = KS,
    map_cutoffs: Sequence[int] = (10,),
) -> dict[str, float]:
    """R@k and mAP@K from :func:`relevant_positions`; queries without a relevant candidate are left out."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    keep = n_relevant > 0
    # Positions are exact integers in float32 (below 2**24); the sums and means run in float64, as the DCASE
    # baselines' numpy code does (float32 accumulation was 1e-8 off at mAP 0.15 on 1,037 queries).
    pos, n = positions[keep].double(), n_relevant[keep].double()
    if pos.shape[0] == 0:
        return {**{f"R@{k}": math.nan for k in ks}, **{f"mAP@{c}": math.nan for c in map_cutoffs}}
    out: dict[str, float] = {}
    for k in ks:
        if protocol == "clap":
            out[f"R@{k}"] = (pos[:, 0] <= k).double().mean().item()
        else:
            out[f"R@{k}"] = ((pos <= k).sum(1) / n).mean().item()
    i = torch.arange(1, pos.shape[1] + 1, dtype=torch.float64)[None, :]  # i-th relevant found at p_i: i / p_i
    for c in map_cutoffs:
        ap = torch.where(pos <= c, i / pos, torch.zeros_like(pos)).sum(1) / n
        out[f"mAP@{c}"] = ap.mean().item()
    return out


def retrieval_scores(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    relevance: Relevance,
    protocol: str,
    normalize: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> dict[str, float]:
    """R@1/5/10 and mAP@10 (clap) or mAP@10/16 (dcase) of ``queries`` ranking ``candidates``."""
    positions = relevant_positions(queries, candidates, relevance, block_bytes, normalize)
    cutoffs = (10,) if protocol == "clap" else DCASE_MAP_CUTOFFS
    out = scores_from_positions(positions, relevance.counts(), protocol, map_cutoffs=cutoffs)
    out["n_queries"] = int((relevance.counts() > 0).sum())
    out["n_queries_without_relevant"] = int((relevance.counts() == 0).sum())
    return out


def caption_retrieval(
    text_emb: torch.Tensor,
    audio_emb: torch.Tensor,
    caption_audio: torch.Tensor,
    protocol: str = "clap",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> dict[str, dict]:
    """Both directions on a captioned set: caption ``c`` describes clip ``caption_audio[c]``.

    Returns ``{"text_to_audio": {...}, "audio_to_text": {...}}`` and, for the clap protocol, the chance levels
    of a random ranking (``m2dclap.metrics``) under ``chance_text_to_audio`` / ``chance_audio_to_text``.
    """
    caption_audio = torch.as_tensor(caption_audio, dtype=torch.long)
    t, a = text_emb, audio_emb
    n_audio = a.shape[0]
    out = {
        "text_to_audio": retrieval_scores(
            t, a, Relevance.one_each(caption_audio, n_audio), protocol, True, block_bytes
        ),
        "audio_to_text": retrieval_scores(a, t, Relevance.grouped(caption_audio, n_audio), protocol, True, block_bytes),
    }
    if protocol == "clap" and n_audio and len(caption_audio):
        per_clip = max(1, round(len(caption_audio) / n_audio))
        out["chance_text_to_audio"] = chance_text_to_audio(n_audio)
        out["chance_audio_to_text"] = chance_audio_to_text(len(caption_audio), per_clip)
    return out
