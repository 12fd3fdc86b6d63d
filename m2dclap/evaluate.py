"""Quick evaluation of a CLAP model on a manifest split: retrieval and zero-shot, with chance levels.

Used for the pretraining report; the full retrieval and zero-shot tools live in ``retrieval/`` and
``zeroshot/``. Uses only the public model API.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from . import metrics
from .embed_files import embed_files

log = logging.getLogger(__name__)

PROMPT = "{} can be heard"  # the paper's ESC-50/US8K rule (Table VI)


@torch.no_grad()
def embed_records(model, records: Sequence[Any], batch_size: int = 32, progress: bool = True):
    """CLAP audio embeddings of the records' whole clips; returns (embeddings, kept records, skipped paths).
    Clips are read through :func:`m2dclap.embed_files.embed_files` (unusable ones skipped by name)."""
    emb, skipped = embed_files(model, [rec.audio for rec in records], batch_size, progress=progress)
    bad = {i for i, _ in skipped}
    keep = [i for i in range(len(records)) if i not in bad]
    return emb[keep].to(model.device), [records[i] for i in keep], [str(records[i].audio) for i in sorted(bad)]


def evaluate_clap(
    model, records: Sequence[Any], class_names: Sequence[str] | None = None, batch_size: int = 32, progress: bool = True
) -> dict[str, Any]:
    """Text->audio / audio->text retrieval (CLAP-paper convention) and zero-shot accuracy on the first
    label of each clip, each beside its chance level."""
    model.eval()
    audio, kept, bad = embed_records(model, records, batch_size, progress)
    captions, owner = [], []
    for i, rec in enumerate(kept):
        captions.extend(rec.captions)
        owner.extend([i] * len(rec.captions))
    result: dict[str, Any] = {"n_clips": len(kept), "n_captions": len(captions), "bad_clips": bad}
    if captions:
        text = model.encode_text(captions, batch_size=64)
        owner_t = torch.tensor(owner)
        a, t = torch.nn.functional.normalize(audio, dim=-1), torch.nn.functional.normalize(text, dim=-1)
        per_clip = max(1, round(len(captions) / max(len(kept), 1)))
        result["text_to_audio"] = metrics.text_to_audio(t, a, owner_t)
        result["audio_to_text"] = metrics.audio_to_text(a, t, owner_t)
        result["chance_text_to_audio"] = metrics.chance_text_to_audio(len(kept))
        result["chance_audio_to_text"] = metrics.chance_audio_to_text(len(captions), per_clip)
    labelled = [(i, r.labels[0]) for i, r in enumerate(kept) if r.labels]
    if labelled:
        names = sorted(class_names or {lab for _, lab in labelled})
        index = {n: j for j, n in enumerate(names)}
        labelled = [(i, lab) for i, lab in labelled if lab in index]
        prompts = model.encode_text([PROMPT.format(n.replace("_", " ")) for n in names], normalize=True)
        rows = torch.tensor([i for i, _ in labelled])
        scores = torch.nn.functional.normalize(audio[rows], dim=-1) @ prompts.T
        result["zeroshot_accuracy"] = metrics.accuracy(scores, torch.tensor([index[lab] for _, lab in labelled]))
        result["zeroshot_chance"] = 1.0 / len(names)
        result["n_classes"] = len(names)
    return result


def format_report(result: dict[str, Any]) -> str:
    """A short table of every figure beside its chance level."""
    lines = [
        f"evaluated {result['n_clips']} clips, {result['n_captions']} captions"
        + (f", {len(result['bad_clips'])} unusable clips skipped" if result.get("bad_clips") else "")
    ]
    for key, title in (("text_to_audio", "text->audio"), ("audio_to_text", "audio->text")):
        if key in result:
            got, chance = result[key], result["chance_" + key]
            cells = "  ".join(f"{m} {100 * got[m]:5.1f} (chance {100 * chance[m]:4.1f})" for m in got)
            lines.append(f"{title:12s} {cells}")
    if "zeroshot_accuracy" in result:
        lines.append(
            f"zero-shot    accuracy {100 * result['zeroshot_accuracy']:5.1f} "
            f"(chance {100 * result['zeroshot_chance']:4.1f}, {result['n_classes']} classes)"
        )
    return "\n".join(lines)
