"""The pretraining report's retrieval metrics (CLAP-paper convention) on hand-computed cases."""

import pytest
import torch

from m2dclap.metrics import audio_to_text, chance_audio_to_text, chance_text_to_audio, text_to_audio


def test_audio_to_text_ties_count_against_the_query():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.9, 0.1], [0.9, 0.2], [0.5, 0.3]])
    owner = torch.tensor([0, 1, 0])
    out = audio_to_text(a, t, owner)
    # clip 0: caption 0 ties with irrelevant caption 1 -> position 2; caption 2 -> position 3: AP (1/2 + 2/3) / 2
    # clip 1: caption 1 is beaten by caption 2 -> position 2: AP 1/2
    assert out["R@1"] == 0.0 and out["R@5"] == 1.0
    assert out["mAP@10"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 2) / 2)


def test_text_to_audio_rank_10_and_11():
    n = 12
    audio = torch.eye(n)
    # caption 0 scores its clip (0) below 9 others -> rank 10 (inside); caption 1 below 10 others -> rank 11
    t0 = torch.full((n,), 0.5)
    t0[0] = 0.4
    t0[10:] = 0.0
    t1 = torch.full((n,), 0.5)
    t1[1] = 0.4
    t1[11] = 0.0
    out = text_to_audio(torch.stack([t0, t1]), audio, torch.tensor([0, 1]))
    assert out["R@10"] == 0.5 and out["mAP@10"] == pytest.approx(0.1 / 2)


def test_chance_levels_match_random_rankings():
    torch.manual_seed(0)
    n, c = 40, 3
    owner = torch.arange(n).repeat_interleave(c)
    runs = [
        (text_to_audio(t, a, owner), audio_to_text(a, t, owner))
        for a, t in ((torch.randn(n, 8), torch.randn(n * c, 8)) for _ in range(150))
    ]
    t2a = sum(r[0]["R@10"] for r in runs) / len(runs)
    a2t = sum(r[1]["mAP@10"] for r in runs) / len(runs)
    assert t2a == pytest.approx(chance_text_to_audio(n)["R@10"], abs=0.02)
    assert a2t == pytest.approx(chance_audio_to_text(n * c, c)["mAP@10"], abs=0.01)


def test_accuracy_is_one_function_for_tensors_and_arrays():
    """m2dclap.evaluate passes tensors, zero-shot and the linear probe numpy arrays: one implementation."""
    import numpy as np

    import zeroshot.metrics
    from m2dclap import metrics
    from m2dclap.probe import score_predictions

    scores = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]
    assert metrics.accuracy(torch.tensor(scores), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert metrics.accuracy(np.array(scores), [0, 1, 1]) == pytest.approx(2 / 3)
    assert score_predictions(np.array([0, 1, 1]), np.array(scores)) == pytest.approx(2 / 3)
    assert zeroshot.metrics.accuracy is metrics.accuracy
    assert np.isnan(metrics.accuracy(np.zeros((0, 2)), []))
    with pytest.raises(ValueError, match="3 score rows but 2 targets"):
        metrics.accuracy(np.array(scores), [0, 1])


def test_average_precision_takes_tensors_targets_first():
    import numpy as np

    from m2dclap import metrics

    y, s = [[1, 0], [0, 1], [1, 1], [0, 0]], [[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.1, 0.9]]
    from_arrays = metrics.mean_average_precision(np.array(y), np.array(s), no_positive="exclude")
    from_tensors = metrics.mean_average_precision(
        torch.tensor(y) > 0.5, torch.tensor(s, dtype=torch.float16), no_positive="exclude"
    )
    assert from_tensors[0] == pytest.approx(from_arrays[0]) and from_arrays[0] == pytest.approx(
        ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    )
    assert metrics.average_precision(torch.tensor([0, 1]), torch.tensor([0.5, 0.5])) == pytest.approx(0.5)
