"""Audio-text retrieval evaluation: text->audio and audio->text R@1/5/10 and mAP@10 (paper Table VIII).

    python -m retrieval.evaluate --checkpoint runs/default/stage2/model --dataset clotho --root data/clotho \
        --split evaluation [--protocol clap|dcase] [--relevance metadata_eval.csv] [--out result.json]

The ``clap`` protocol gives the numbers of Table VIII; ``dcase`` the DCASE multi-positive figures (and, with
the 2025 ``query,audio_filenames`` annotations, mAP@16, the 2025 ranking metric). Conventions are spelled out
in :mod:`retrieval.metrics` and copied into the JSON output. Audio embeddings are cached per checkpoint and
file (:mod:`retrieval.cache`), so a second evaluation only embeds the captions again if they changed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import m2dclap
from m2dclap.cli import EXIT_SKIPPED, TEXT_MODEL_HELP, CliError, UsageError, option, resolve_device, run_cli
from m2dclap.data.manifest import Record, atomic_write_text
from m2dclap.embed_files import report_skipped

from .cache import EmbeddingCache, default_cache_dir, embed_audio_files, embed_texts
from .datasets import DATASETS, MissingAudioError, ReadResult, read_relevance, read_retrieval_dataset
from .metrics import DEFAULT_BLOCK_BYTES, PROTOCOL_TEXT, PROTOCOLS, Relevance, caption_retrieval, retrieval_scores

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {"clotho": "evaluation", "audiocaps": "test", "manifest": "test", "synthetic": "test", "wavcaps": ""}


QUERIES = {
    "text_to_audio": "every caption ranks all clips; relevant: the clip it describes",
    "audio_to_text": "every clip ranks all captions; relevant: its own captions",
}
QUERIES_2025 = (
    "each annotated query ranks all clips; relevant: its audio_filenames (matched by file name); "
    "audio->text: each clip named by a query ranks the annotated queries; relevant: those naming it"
)


def evaluate_records(
    model,
    records: Sequence[Record],
    protocol: str = "clap",
    relevance: list[tuple[str, list[str]]] | None = None,
    cache: EmbeddingCache | None = None,
    batch_size: int = 32,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed the records' audio and captions with ``model`` and score retrieval in ``protocol``.

    ``relevance`` (DCASE 2025 annotations) adds a multi-positive text->audio evaluation with its own queries,
    the relevant clips matched by file name. Clips that cannot be used (undecodable, empty, NaN/Inf, shorter
    than the frontend's window) are reported, left out and counted under ``skipped`` (an error if ``strict``).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    t0 = time.perf_counter()
    audio, bad = embed_audio_files(model, [r.audio for r in records], cache, batch_size, progress)
    if bad and strict:
        raise MissingAudioError("unusable audio:\n  " + "\n  ".join(msg for _, msg in bad))
    bad_rows = {i for i, _ in bad}
    kept = [i for i in range(len(records)) if i not in bad_rows]
    audio = audio[kept]
    captions, owner = [], []
    for j, i in enumerate(kept):
        captions.extend(records[i].captions)
        owner.extend([j] * len(records[i].captions))
    t1 = time.perf_counter()
    text = embed_texts(model, captions, cache) if captions else torch.zeros(0, audio.shape[1])
    t2 = time.perf_counter()
    result: dict[str, Any] = {
        "protocol": {
            "name": protocol,
            "description": PROTOCOL_TEXT[protocol],
            "similarity": "cosine",
            "ties": "pessimistic (irrelevant items ranked first)",
            "scale": "fractions in [0, 1]",
            "queries": QUERIES if relevance is None else {**QUERIES, "relevance": QUERIES_2025},
        },
        "n_clips": len(kept),
        "n_captions": len(captions),
        # the figures are over the kept clips only: say how many were left out, and which
        "skipped": {"count": len(bad), "files": [msg for _, msg in bad]},
    }
    if captions and len(kept):
        result.update(caption_retrieval(text, audio, torch.tensor(owner), protocol, block_bytes))
    elif not captions:
        log.warning("no captions: only the relevance annotations (if any) are evaluated")
    if relevance is not None:
        result["relevance"] = relevance_scores(model, relevance, [records[i] for i in kept], audio, cache, block_bytes)
    result["seconds"] = {
        "embed_audio": round(t1 - t0, 3),
        "embed_text": round(t2 - t1, 3),
        "metrics": round(time.perf_counter() - t2, 3),
    }
    return result


def relevance_scores(
    model,
    relevance: list[tuple[str, list[str]]],
    records: Sequence[Record],
    audio: torch.Tensor,
    cache: EmbeddingCache | None,
    block_bytes: int,
) -> dict[str, Any]:
    """DCASE 2025 multi-positive figures: each annotated query ranks the clips, its relevant clips named by
    file name; audio->text uses the same pairs the other way round."""
    index = {Path(r.audio).name: i for i, r in enumerate(records)}
    lists, unmatched = [], []
    for _, names in relevance:
        lists.append([index[n] for n in names if n in index])
        unmatched.extend(n for n in names if n not in index)
    if unmatched:
        log.warning(
            "%d relevant file name(s) of the annotations are not among the evaluated clips, e.g. %s",
            len(unmatched),
            unmatched[:3],
        )
    queries = [q for q, _ in relevance]
    text = embed_texts(model, queries, cache)
    rel = Relevance.from_lists(lists, len(records))
    counts = rel.counts().float()
    return {
        "n_queries": len(queries),
        "relevant_per_query": round(counts.mean().item(), 3) if len(queries) else 0.0,
        "unmatched_filenames": {"count": len(unmatched), "names": sorted(set(unmatched))[:100]},
        "text_to_audio": retrieval_scores(text, audio, rel, "dcase", block_bytes=block_bytes),
        "audio_to_text": retrieval_scores(audio, text, rel.transpose(), "dcase", block_bytes=block_bytes),
    }


def _pct(x: Any) -> str:
    return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"


def format_table(result: dict[str, Any]) -> str:
    """The figures as percentages, in Table VIII's column order, with chance levels when known."""
    cols = ["R@1", "R@5", "R@10", "mAP@10"] + (["mAP@16"] if result["protocol"]["name"] == "dcase" else [])
    head = f"{'':22s}" + "".join(f"{c:>8s}" for c in cols)
    lines = [
        f"{result.get('dataset', '')} {result.get('split', '')}: {result['n_clips']} clips, "
        f"{result['n_captions']} captions, protocol {result['protocol']['name']}".strip()
    ]
    missing = result.get("missing", {}).get("count", 0)
    if missing or result["skipped"]["count"]:
        lines.append(f"left out: {missing} missing, {result['skipped']['count']} skipped clip(s) (unusable audio)")
    lines.append(head)
    rows = [
        ("text->audio", result.get("text_to_audio")),
        ("  chance", result.get("chance_text_to_audio")),
        ("audio->text", result.get("audio_to_text")),
        ("  chance", result.get("chance_audio_to_text")),
    ]
    rel = result.get("relevance")
    if rel:
        rows += [
            (f"2025 text->audio ({rel['n_queries']}q)", rel["text_to_audio"]),
            ("2025 audio->text", rel["audio_to_text"]),
        ]
    for name, fig in rows:
        if fig:
            lines.append(f"{name:22s}" + "".join(f"{_pct(fig.get(c)):>8s}" for c in cols))
    return "\n".join(lines)


DESCRIPTION = (
    "Evaluate audio-text retrieval of an M2D-CLAP checkpoint: text->audio and audio->text R@1/5/10 and "
    "mAP@10. --protocol clap (default) gives the CLAP-paper numbers of M2D-CLAP Table VIII (every caption "
    "is a query with one clip; audio->text counts the best-ranked of the clip's captions; mAP@10 over "
    "sorted ranks divided by the number of captions). --protocol dcase gives the DCASE multi-positive "
    "figures (R@k = fraction of the relevant items retrieved, AP divided by the number of relevant items, "
    "plus mAP@16); --relevance adds the 2025 query,audio_filenames annotations. Prints a table and writes "
    "a JSON with every figure and the protocol used."
)
EPILOG = (
    "examples:\n"
    "  python -m retrieval.evaluate --checkpoint runs/default/stage2/model --dataset synthetic\n"
    "  python -m retrieval.evaluate --checkpoint CKPT --dataset clotho --root data/clotho "
    "--split evaluation --protocol dcase --relevance metadata_eval.csv\n"
    "  python -m retrieval.evaluate --checkpoint CKPT --dataset audiocaps --root data/audiocaps "
    "--split test --audio-pattern 'Y{youtube_id}.wav'\n\n"
    "Clips missing on disk or unusable (undecodable, empty, NaN/Inf, shorter than one STFT window) are "
    "named on stderr, left out of the figures and counted in the JSON ('missing', 'skipped'): exit status 1, "
    "as when, with --strict, missing or unusable clips stop the run; no captions to retrieve is bad input (2)."
)


@dataclass(kw_only=True)
class EvaluateOptions:
    checkpoint: str = option(help="a saved model folder, an official .pth file or a pretrained name (m2dclap.load)")
    text_model: str | None = option(None, metavar="PATH", help=TEXT_MODEL_HELP)
    dataset: str = option(
        "synthetic",
        choices=[d for d in DATASETS if d != "wavcaps"],
        help="dataset layout (default: the embedded synthetic corpus)",
    )
    root: str | None = option(None, help="dataset folder, or the manifest file for --dataset manifest")
    split: str | None = option(
        None,
        help="clotho: development|validation|evaluation (default evaluation); "
        "audiocaps: train|val|test (default test); manifest/synthetic: "
        "train|val|test|all (default test)",
    )
    audio_dir: str | None = option(None, help="audio folder (default: ROOT/SPLIT and the usual alternatives)")
    audio_pattern: str | None = option(
        None,
        help="AudioCaps file name pattern over youtube_id, start_time, "
        "end_time, audiocap_id (default '{youtube_id}.wav')",
    )
    protocol: str = option("clap", choices=PROTOCOLS, help="metric convention (default clap)")
    relevance: str | None = option(
        None, help="DCASE 2025 multi-positive annotations (query,audio_filenames); needs --protocol dcase"
    )
    out: str | None = option(None, help="JSON result (default: retrieval-DATASET-SPLIT-PROTOCOL.json)")
    strict: bool = option(False, help="fail on missing or unusable clips")
    batch_size: int = option(32, minimum=1, help="clips per encoder batch (default 32)")
    cache_dir: str = option(str(default_cache_dir()), help="embedding cache")
    no_cache: bool = option(False, help="embed everything again, cache nothing")
    block_mb: int = option(DEFAULT_BLOCK_BYTES // 2**20, minimum=1, help="memory for one block of similarity rows, MiB")
    device: str = option("auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        run, EvaluateOptions, argv, prog="python -m retrieval.evaluate", description=DESCRIPTION, epilog=EPILOG
    )


def run(args: EvaluateOptions) -> int:
    if args.relevance and args.protocol != "dcase":
        raise UsageError("--relevance (DCASE 2025 multi-positive annotations) needs --protocol dcase")
    split = args.split if args.split is not None else DEFAULT_SPLITS[args.dataset]
    if split == "all" and args.dataset in ("manifest", "synthetic"):
        split = ""  # every record, whatever its split column says
    try:
        data: ReadResult = read_retrieval_dataset(
            args.dataset, args.root, split, args.strict, args.audio_dir, args.audio_pattern
        )
        relevance = read_relevance(args.relevance) if args.relevance else None
    except MissingAudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SKIPPED
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    if not data.records:
        print(f"error: {data.source}: no clip to evaluate ({len(data.missing)} listed clips missing)", file=sys.stderr)
        return EXIT_SKIPPED
    if relevance is None and not any(r.captions for r in data.records):
        raise CliError(
            f"{data.source}: no clip has a caption; nothing to retrieve "
            "(fill the captions column, or give --relevance annotations with --protocol dcase)"
        )
    model = m2dclap.load(args.checkpoint, device=resolve_device(args.device), text_name=args.text_model).eval()
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir, args.checkpoint)
    try:
        result = evaluate_records(
            model, data.records, args.protocol, relevance, cache, args.batch_size, args.block_mb * 2**20, args.strict
        )
    except MissingAudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SKIPPED
    result = {
        "checkpoint": str(args.checkpoint),
        "dataset": args.dataset,
        "root": args.root,
        "split": split,
        "relevance_file": args.relevance,
        "m2dclap_version": m2dclap.__version__,
        "missing": {"count": len(data.missing), "paths": [str(p) for p in data.missing]},
        "embedding_cache": {"dir": str(cache.dir), "hits": cache.hits, "stored": cache.stored} if cache else None,
        **result,
    }
    out = Path(args.out or f"retrieval-{args.dataset}-{split or 'all'}-{args.protocol}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(format_table(result))
    print(f"wrote {out}")
    # the figures leave the skipped clips out: exit 1 so that a script notices
    left_out = [(str(p), f"{p}: missing") for p in data.missing] + [(m, m) for m in result["skipped"]["files"]]
    return report_skipped(left_out, what="clip", stream=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
