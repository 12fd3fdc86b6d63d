"""Per-epoch validation of the captioner during training: captions for the validation clips and the score
that ranks the epoch checkpoints (SPIDEr as EnCLAP where SPICE can run, else the Java-free CIDEr-D)."""

from __future__ import annotations

import torch

from .data import normalize_caption


@torch.no_grad()
def predict(model, loader, device, num_beams=None, max_length=None) -> tuple[dict, dict]:
    """Captions and references for every clip of ``loader`` (an evaluation ``CaptionDataset`` loader)."""
    model.eval()
    preds, refs = {}, {}
    for batch in loader:
        texts = model.generate(
            batch["tokens"].to(device),
            batch["token_mask"].to(device),
            batch["clap"].to(device),
            num_beams=num_beams,
            max_length=max_length,
        )
        for i, t, r in zip(batch["id"], texts, batch["captions"]):
            preds[i], refs[i] = t, r
    return preds, refs


def score_fast(preds: dict, refs: dict, metrics=("cider_d",)) -> dict:
    """Scores on normalised text without PTB tokenisation (no Java): the per-epoch validation score."""
    from .metrics import evaluate_captions

    p = {k: normalize_caption(v) for k, v in preds.items()}
    r = {k: [normalize_caption(x) for x in v if normalize_caption(x)] for k, v in refs.items()}
    return evaluate_captions(p, r, metrics=metrics, tokenize=False)


def choose_selection_metric(requested: str) -> tuple[str, str]:
    """(metric, why): EnCLAP ranks checkpoints by validation SPIDEr, which needs SPICE's CoreNLP jars."""
    from .metrics import MetricUnavailableError, available_metrics

    ok, why, _ = available_metrics(fense=False)
    if requested == "spider" and "spider" not in ok:
        raise MetricUnavailableError(f"--selection-metric spider: {why['spider']}")
    if requested == "cider_d":
        return "cider_d", "validation CIDEr-D (normalised text, no PTB tokenisation), chosen by --selection-metric"
    if "spider" in ok:
        return "spider", "validation SPIDEr (PTB tokenisation, CIDEr-D + SPICE) as in EnCLAP"
    return "cider_d", (
        "EnCLAP selects by validation SPIDEr, but SPICE cannot run here (" + why["spider"] + "); "
        "checkpoints are selected by validation CIDEr-D (normalised text, no PTB tokenisation)"
    )


def validation_scores(preds: dict, refs: dict, metric: str) -> dict:
    """The per-epoch validation scores: SPIDEr as EnCLAP computes it, or the Java-free CIDEr-D."""
    if metric == "spider":
        from .metrics import evaluate_captions

        return evaluate_captions(preds, refs, ["cider_d", "spice", "spider"], tokenize=True)
    return score_fast(preds, refs)
