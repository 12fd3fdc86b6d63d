"""Retrieval metrics against hand-computed cases: ties, several relevant items, ranks 10 and 11, the two
conventions agreeing with one relevant item each, agreement with m2dclap.metrics, bounded-memory blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import m2dclap.metrics as shared
from retrieval.metrics import Relevance, caption_retrieval, relevant_positions, retrieval_scores, scores_from_positions


def scores(sim: list[list[float]], relevant: list[list[int]], protocol: str, **kw) -> dict[str, float]:
    """Figures for an exact similarity matrix: one-hot queries against candidates = sim.T."""
    S = torch.tensor(sim, dtype=torch.float32)
    q, n = S.shape
    return retrieval_scores(
        torch.eye(q), S.T.contiguous(), Relevance.from_lists(relevant, n), protocol, normalize=False, **kw
    )


def ranked(rank_of_relevant: int, n: int = 20) -> list[float]:
    """A row where the single relevant candidate (index 0) sits at 1-based position ``rank_of_relevant``."""
    row = [0.0] * n
    row[0] = 0.5
    for j in range(1, rank_of_relevant):
        row[j] = 0.9  # ranked above the relevant one
    return row


def test_relevant_item_at_rank_10_counts_and_at_rank_11_does_not():
    sim = [ranked(10), ranked(11)]
    for protocol in ("clap", "dcase"):
        got = scores(sim, [[0], [0]], protocol)
        assert got["R@1"] == 0 and got["R@5"] == 0
        assert got["R@10"] == pytest.approx(0.5)  # rank 10 is in the top 10, rank 11 is not
        assert got["mAP@10"] == pytest.approx((1 / 10 + 0) / 2)
    assert scores(sim, [[0], [0]], "dcase")["mAP@16"] == pytest.approx((1 / 10 + 1 / 11) / 2)


def test_ties_are_pessimistic():
    # relevant 0.5 tied with two irrelevant candidates, one irrelevant above: position 1 + 1 + 2 = 4
    sim = [[0.5, 0.9, 0.5, 0.5, 0.1, 0.0]]
    assert relevant_positions(
        torch.eye(1), torch.tensor(sim).T.contiguous(), Relevance.from_lists([[0]], 6)
    ).tolist() == [[4.0]]
    got = scores(sim, [[0]], "clap")
    assert (got["R@1"], got["R@5"], got["mAP@10"]) == (0.0, 1.0, pytest.approx(1 / 4))
    # all candidates equal: the relevant one is last
    assert scores([[0.3] * 7], [[2]], "clap")["mAP@10"] == pytest.approx(1 / 7)


def test_ties_between_relevant_and_irrelevant_items():
    # relevant a, b = 0.7, irrelevant c = 0.7 and d = 0.8: positions 1 + 2 = 3 and 2 + 2 = 4
    sim = [[0.7, 0.7, 0.7, 0.8, 0.0]]
    pos = relevant_positions(torch.eye(1), torch.tensor(sim).T.contiguous(), Relevance.from_lists([[0, 1]], 5))
    assert pos.tolist() == [[3.0, 4.0]]
    got = scores(sim, [[0, 1]], "dcase")
    assert got["mAP@10"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert got["R@1"] == 0 and got["R@5"] == 1.0


def test_several_relevant_items_both_conventions():
    # 14 candidates; relevant 0, 1, 2 at positions 1, 3 and 12
    row = [0.0] * 14
    row[0], row[5], row[1] = 0.99, 0.95, 0.9  # positions 1, 2 (irrelevant), 3
    for j in range(6, 14):
        row[j] = 0.5  # positions 4..11
    row[2] = 0.4  # position 12
    dcase = scores([row], [[0, 1, 2]], "dcase")
    assert dcase["R@1"] == pytest.approx(1 / 3)  # information-retrieval recall: 1 of 3 relevant items
    assert dcase["R@5"] == pytest.approx(2 / 3) and dcase["R@10"] == pytest.approx(2 / 3)
    assert dcase["mAP@10"] == pytest.approx((1 / 1 + 2 / 3) / 3)  # divided by all 3 relevant, not min(10, 3)
    assert dcase["mAP@16"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 12) / 3)
    clap = scores([row], [[0, 1, 2]], "clap")
    assert clap["R@1"] == 1.0 and clap["R@5"] == 1.0  # CLAP: the best-ranked relevant item counts
    assert clap["mAP@10"] == pytest.approx(dcase["mAP@10"])


def test_average_precision_is_divided_by_all_relevant_items():
    # 12 relevant candidates in the first 12 places (the 2025 annotations have up to 12): the top 10 are all
    # hits, yet AP@10 = 10 / 12, since the divisor is the number of relevant items, not min(10, 12)
    row = [1.0 - 0.01 * j for j in range(15)]
    got = scores([row], [list(range(12))], "dcase")
    assert got["mAP@10"] == pytest.approx(10 / 12) and got["mAP@16"] == pytest.approx(1.0)
    assert got["R@10"] == pytest.approx(10 / 12)


def test_audio_to_text_map_uses_sorted_ranks():
    # one clip, six captions; its captions 4 and 1 (listing order) sit at positions 2 and 5
    sim = [[0.2, 0.9, 0.1, 0.5, 0.8, 0.3]]  # positions: 1->1(c1), 4->2, 3->3, 5->4, 0->5, 2->6
    got = scores(sim, [[4, 0]], "clap")
    assert got["R@1"] == 0 and got["R@5"] == 1.0
    assert got["mAP@10"] == pytest.approx((1 / 2 + 2 / 5) / 2)  # LAION's unsorted order would give 1/5+2/2


def test_conventions_agree_with_one_relevant_item_each():
    g = torch.Generator().manual_seed(0)
    text, audio = torch.randn(300, 16, generator=g), torch.randn(60, 16, generator=g)
    target = torch.randint(0, 60, (300,), generator=g)
    rel = Relevance.one_each(target, 60)
    clap, dcase = retrieval_scores(text, audio, rel, "clap"), retrieval_scores(text, audio, rel, "dcase")
    for k in ("R@1", "R@5", "R@10", "mAP@10"):
        assert clap[k] == pytest.approx(dcase[k], abs=1e-7)
    assert 0 < clap["R@10"] < 1  # not a degenerate case


def test_clap_convention_equals_m2dclap_metrics():
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(40, 32, generator=g)
    owner = torch.arange(40).repeat_interleave(5)
    text = audio[owner] * 0.3 + torch.randn(200, 32, generator=g)
    got = caption_retrieval(text, audio, owner, "clap")
    t, a = F.normalize(text, dim=-1), F.normalize(audio, dim=-1)
    want_t2a, want_a2t = shared.text_to_audio(t, a, owner), shared.audio_to_text(a, t, owner)
    for k in want_t2a:
        assert got["text_to_audio"][k] == pytest.approx(want_t2a[k], abs=1e-6)
        assert got["audio_to_text"][k] == pytest.approx(want_a2t[k], abs=1e-6)
    assert 0.05 < got["text_to_audio"]["R@1"] < 0.95
    assert got["chance_text_to_audio"] == shared.chance_text_to_audio(40)


def test_blocks_do_not_change_the_figures():
    g = torch.Generator().manual_seed(2)
    text, audio = torch.randn(97, 8, generator=g), torch.randn(31, 8, generator=g)
    owner = torch.randint(0, 31, (97,), generator=g)
    text[5] = text[4]  # exact duplicates create ties
    whole = caption_retrieval(text, audio, owner, "dcase")
    tiny = caption_retrieval(text, audio, owner, "dcase", block_bytes=1)  # one query row per block
    for direction in ("text_to_audio", "audio_to_text"):
        assert tiny[direction] == pytest.approx(whole[direction], abs=1e-6)


def test_cosine_without_copies_equals_normalising_first():
    g = torch.Generator().manual_seed(3)
    q, c = torch.randn(50, 12, generator=g) * 7, torch.randn(20, 12, generator=g) * 0.1
    rel = Relevance.from_lists([[i % 20, (3 * i) % 20] for i in range(50)], 20)
    a = relevant_positions(q, c, rel, normalize=True)
    b = relevant_positions(F.normalize(q, dim=-1), F.normalize(c, dim=-1), rel)
    assert torch.equal(a, b)


def test_queries_without_relevant_items_are_counted_and_left_out():
    got = scores([[0.9, 0.1], [0.1, 0.9]], [[0], []], "dcase")
    assert got["n_queries"] == 1 and got["n_queries_without_relevant"] == 1
    assert got["R@1"] == 1.0 and got["mAP@10"] == 1.0
    empty = scores_from_positions(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), "clap")
    assert math.isnan(empty["R@1"])


def test_relevance_structures():
    rel = Relevance.grouped(torch.tensor([2, 0, 2, 1]), 3)  # caption -> clip
    assert [rel.indices[rel.indptr[i] : rel.indptr[i + 1]].tolist() for i in range(3)] == [[1], [3], [0, 2]]
    back = rel.transpose()
    assert back.n_queries == 4 and back.indices.tolist() == [2, 0, 2, 1]
    assert Relevance.from_lists([[3, 1, 3]], 4).indices.tolist() == [1, 3]  # duplicates dropped
    with pytest.raises(ValueError, match="out of range"):
        Relevance.from_lists([[4]], 4)
    with pytest.raises(ValueError, match="unknown protocol"):
        scores([[1.0]], [[0]], "laion")


def _baseline_average_precision_at_k(relevant_ranks: list[int], k: int) -> float:
    """The DCASE 2025 baseline's ``average_precision_at_k`` as the reference describes it (0-based ranks,
    sorted; ``ap += i / (rank + 1)`` while ``rank < k``; divided by the number of relevant items), in Python
    floats (float64)."""
    ap = 0.0
    for i, rank in enumerate(sorted(relevant_ranks), start=1):
        if rank >= k:
            break
        ap += i / (rank + 1)
    return ap / len(relevant_ranks)


def test_dcase_map_equals_the_baselines_float64_average_to_1e12():
    # 1,037 queries with 1-12 relevant clips each, as the 2025 metadata_eval.csv relevance sets
    g = torch.Generator().manual_seed(7)
    n_queries, width = 1037, 12
    positions = torch.full((n_queries, width), math.inf)
    ranks = []
    for q in range(n_queries):
        n = int(torch.randint(1, width + 1, (1,), generator=g))
        r = sorted(torch.randperm(60, generator=g)[:n].tolist())  # 0-based ranks among 60, many in the top 16
        ranks.append(r)
        positions[q, :n] = torch.tensor(r, dtype=torch.float32) + 1
    counts = torch.tensor([len(r) for r in ranks])
    got = scores_from_positions(positions, counts, "dcase", map_cutoffs=(10, 16))
    for k in (10, 16):
        expected = sum(_baseline_average_precision_at_k(r, k) for r in ranks) / n_queries
        assert abs(got[f"mAP@{k}"] - expected) < 1e-12, (k, got[f"mAP@{k}"], expected)
