"""Score captions: a trained checkpoint (or a training run's top checkpoints) on a split, or CSV files.

    python -m captioning.evaluate --checkpoint C [--dataset audiocaps|clotho --data-root DIR | --dataset MANIFEST|INDEX]
        [--split test] [--out RESULT.json]
    python -m captioning.evaluate --predictions P.csv --references R.csv [--out RESULT.json]

Every available metric is computed: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (PTB tokenisation; Java needed),
plus SPICE and SPIDEr when the Stanford CoreNLP 3.6.0 jars are installed, and SBERT-sim, FER, FENSE and
SPIDEr-FL when the FENSE models are on this machine (otherwise they are listed as unavailable, never
estimated). ``C`` may be an epoch checkpoint or a training run folder; for a run, each of its top checkpoints
(by the validation selection metric, 5 by default as in EnCLAP) is scored and the table gives the mean and the
95% interval (Student t) over them, as in the paper's Table IX.

``--dataset`` is a preprocess ``index.csv`` (or its folder), whose cached tokens and CLAP embeddings are used;
a manifest, or ``audiocaps`` / ``clotho`` under ``--data-root``, whose audio is encoded on the fly with the
codec and CLAP recorded in the checkpoint. For a run folder without ``--dataset`` the run's own cache is used.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from m2dclap.cli import CliError, UsageError, option, resolve_device, run_cli

from .metrics import (
    FenseOptions,
    MetricUnavailableError,
    available_metrics,
    fense_options,
    unavailable_lines,
    write_predictions,
)
from .train import RUN_META

METRIC_ORDER = (
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "meteor",
    "rouge_l",
    "cider_d",
    "spice",
    "spider",
    "sbert_sim",
    "fer",
    "fense",
    "spider_fl",
)


def score(preds: dict, refs: dict, java: bool = True, available: tuple | None = None) -> tuple[dict, dict]:
    """Every available metric; ``java=False``: BLEU, ROUGE-L, CIDEr-D (and the FENSE family when its models
    are here) on normalised text, no Java. ``available``: :func:`captioning.metrics.available_metrics`'s
    answer, when the caller scores several prediction sets (it loads the FENSE models once)."""
    from .metrics import evaluate_captions

    metrics, why, scorer = available or available_metrics()
    metrics, why = list(metrics), dict(why)
    if not java:
        for m in ("meteor", "spice", "spider", "spider_fl"):
            why[m] = "--no-java"
        metrics = [m for m in metrics if m not in why]
    tokenize = "meteor" in metrics  # Java present: the standard PTB tokenisation
    if not tokenize:
        from .data import normalize_caption

        preds = {k: normalize_caption(v) for k, v in preds.items()}
        refs = {k: [normalize_caption(r) for r in v] for k, v in refs.items()}
        why["ptb_tokenization"] = "normalised text instead of the PTB tokenizer (no Java)"
    return evaluate_captions(preds, refs, metrics=metrics, tokenize=tokenize, fense=scorer), why


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% Student-t interval (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def is_index(data: str | Path) -> bool:
    """Whether ``data`` is a preprocess index (``index.csv`` or a folder holding one), not a manifest."""
    from .preprocess import INDEX_NAME

    path = Path(data)
    return (path / INDEX_NAME).is_file() if path.is_dir() else path.name == INDEX_NAME and path.is_file()


def cache_features(
    ckpt: Path,
    data: str | Path,
    split: str | None,
    out: Path,
    device: str = "cpu",
    max_clips: int | None = None,
    data_root: str | None = None,
    audio_pattern: str | None = None,
) -> Path:
    """Codec tokens and CLAP embeddings of the captioned clips of ``split`` of a manifest or of ``audiocaps`` /
    ``clotho`` (under ``data_root``), computed once into the preprocess cache ``out`` with the codec and CLAP
    recorded in ``ckpt`` (every checkpoint of a run records the same); returns its index. An unusable clip
    is an error: a scored split must not silently shrink."""
    from m2dclap.data.manifest import read_manifest

    from . import preprocess as pp
    from .caption import feature_settings
    from .clap_backends import get_backend
    from .codec import DEFAULT_BANDWIDTH, LazyCodec
    from .features import DATASET_PRESETS, read_named_split

    if str(data) in DATASET_PRESETS:
        records = read_named_split(str(data), data_root, split or "test", audio_pattern).records
    else:
        records = read_manifest(data, split=split)
    records = [r for r in records if r.captions][:max_clips]
    settings = feature_settings(ckpt)
    codec_src = settings.get("codec") or "pretrained"
    bandwidth = float(settings.get("bandwidth") or DEFAULT_BANDWIDTH)
    cc = settings.get("clap_checkpoint")
    clap = get_backend(settings.get("clap") or "m2d-clap", **({"checkpoint": cc} if cc else {}), device=device)
    stats = pp.preprocess(
        records,
        out,
        LazyCodec(codec_src, bandwidth, device),
        clap,
        codec_source=codec_src,
        bandwidth=bandwidth,
        progress=False,
    )
    if stats["errors"]:
        shown = "; ".join(
            e["error"] if e["audio"] in e["error"] else f"{e['audio']}: {e['error']}" for e in stats["errors"][:5]
        )
        raise ValueError(f"{data}: {len(stats['errors'])} clip(s) of split {split!r} cannot be used: {shown}")
    return out / pp.INDEX_NAME


@torch.no_grad()
def predict_checkpoint(
    ckpt: Path,
    index: str | Path,
    split: str | None,
    device: str = "cpu",
    batch_size: int = 16,
    max_clips: int | None = None,
) -> tuple[dict, dict]:
    """Predictions and references for the captioned clips of ``split`` of a preprocess ``index``."""
    from torch.utils.data import DataLoader

    from .data import CaptionDataset, make_collate, read_index
    from .model import EnClapCaptioner
    from .validation import predict

    model = EnClapCaptioner.from_pretrained(ckpt).to(device).eval()
    clips = [c for c in read_index(index, split) if c.captions][:max_clips]
    loader = DataLoader(
        CaptionDataset(clips, training=False, max_frames=model.max_frames),
        batch_size=batch_size,
        collate_fn=make_collate(None),
    )
    return predict(model, loader, device)


def format_table(rows: list[tuple[str, dict]], columns: Sequence[str]) -> str:
    head = f"{'':<16}" + "".join(f"{c:>16}" for c in columns)
    lines = [head]
    for name, vals in rows:
        cells = []
        for c in columns:
            v = vals.get(c)
            cells.append(
                f"{'n/a':>16}"
                if v is None
                else (f"{v[0]:>9.4f}±{v[1]:<6.4f}" if isinstance(v, tuple) else f"{v:>16.4f}")
            )
        lines.append(f"{name:<16}" + "".join(cells))
    return "\n".join(lines)


def evaluate_run_or_checkpoint(
    checkpoint: str | Path,
    data=None,
    split: str = "test",
    device: str = "cpu",
    max_clips: int | None = None,
    save_predictions: Path | None = None,
    java: bool = True,
    fense_options: dict | None = None,
    data_root: str | None = None,
    audio_pattern: str | None = None,
) -> dict:
    """Scores per checkpoint and, for a run, the mean and 95% interval over its top checkpoints."""
    path = Path(checkpoint)
    run_meta = json.loads((path / RUN_META).read_text()) if (path / RUN_META).is_file() else None
    if run_meta is not None:
        ckpts = [path / "checkpoints" / t["checkpoint"] for t in run_meta.get("top_checkpoints", [])]
        ckpts = [c for c in ckpts if c.is_dir()]
        if not ckpts:
            raise FileNotFoundError(f"{path}: the run has no kept checkpoints")
        data = data or run_meta.get("index")
    else:
        from .caption import resolve_checkpoint

        ckpts = [resolve_checkpoint(path)]
    if data is None:
        raise ValueError("--data is needed for a single checkpoint")
    result = {
        "checkpoints": {},
        "split": split,
        "data": str(data),
        "selection_metric": run_meta.get("selection_metric") if run_meta else None,
    }
    available = available_metrics(fense_options)
    result["fense_models"] = available[2].models if available[2] is not None else None
    with tempfile.TemporaryDirectory(prefix="caption-eval-") as tmp:
        if is_index(data):
            index, index_split = data, split
        else:  # a cache of just this split's clips
            index = cache_features(ckpts[0], data, split, Path(tmp), device, max_clips, data_root, audio_pattern)
            index_split = None
        for ck in ckpts:  # the features are shared; each checkpoint only decodes
            preds, refs = predict_checkpoint(ck, index, index_split, device, max_clips=max_clips)
            if not preds:
                raise ValueError(f"{data}: no captioned clips in split {split!r}")
            scores, why = score(preds, refs, java, available)
            result["checkpoints"][ck.name] = scores
            result["unavailable"] = why
            result["n_clips"] = len(preds)
            if save_predictions is not None:
                save_predictions.mkdir(parents=True, exist_ok=True)
                write_predictions(save_predictions / f"{ck.name}-{split}.csv", preds)
    names = sorted(
        {m for s in result["checkpoints"].values() for m in s},
        key=lambda m: METRIC_ORDER.index(m) if m in METRIC_ORDER else 99,
    )
    result["metrics"] = names
    if len(ckpts) > 1 or run_meta is not None:
        result["summary"] = {
            m: dict(zip(("mean", "ci95"), t_interval([s[m] for s in result["checkpoints"].values()]))) for m in names
        }
    return result


@dataclass(kw_only=True)
class EvaluateOptions(FenseOptions):  # the FENSE model options: --sbert, --echecker, --echecker-bert
    checkpoint: str | None = option(
        None, metavar="C", help="epoch checkpoint or training run folder (or --predictions)"
    )
    predictions: str | None = option(None, metavar="P.csv", help="file_name,caption (or --checkpoint)")
    references: str | None = option(None, metavar="R.csv", help="file_name,caption_1..caption_N (with --predictions)")
    data: str | None = option(
        None,
        aliases="--dataset",
        metavar="audiocaps|clotho|MANIFEST|INDEX",
        help="audiocaps or clotho (with --data-root), a manifest, or a preprocess index.csv / "
        "cache folder (default for a run: its own cache)",
    )
    data_root: str | None = option(
        None, metavar="DIR", help="the AudioCaps or Clotho v2.1 folder (CSV files and audio)"
    )
    audio_pattern: str | None = option(
        None, metavar="PATTERN", help="AudioCaps audio file names (default '{youtube_id}.wav')"
    )
    split: str = option("test", help="the split to score")
    max_clips: int | None = option(None, minimum=1, help="score only the first N clips")
    out: str | None = option(None, metavar="RESULT.json", help="write the scores as JSON here")
    save_predictions: str | None = option(None, metavar="DIR", help="write each checkpoint's captions as CSV here")
    no_java: bool = option(
        False,
        help="no Java: BLEU, ROUGE-L, CIDEr-D (and SBERT-sim, FER, FENSE when their "
        "models are here) on normalised text instead of the PTB tokenizer; no METEOR, "
        "SPICE, SPIDEr, SPIDEr-FL",
    )
    device: str | None = option(None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        run,
        EvaluateOptions,
        argv,
        prog="python -m captioning.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
    )


def run(opts: EvaluateOptions) -> int:
    if (opts.checkpoint is None) == (opts.predictions is None):
        raise UsageError("give one of --checkpoint or --predictions")
    if opts.predictions and not opts.references:
        raise UsageError("--predictions needs --references")
    device = resolve_device(opts.device)
    fense = fense_options(opts, device)  # reads sbert, echecker, echecker_bert
    try:
        if opts.predictions:
            from .metrics import read_predictions_csv, read_references_csv

            available = available_metrics(fense)
            scores, why = score(
                read_predictions_csv(opts.predictions),
                read_references_csv(opts.references),
                not opts.no_java,
                available,
            )
            result = {
                "checkpoints": {Path(opts.predictions).name: scores},
                "unavailable": why,
                "fense_models": available[2].models if available[2] is not None else None,
                "metrics": [m for m in METRIC_ORDER if m in scores],
            }
        else:
            result = evaluate_run_or_checkpoint(
                opts.checkpoint,
                opts.data,
                opts.split,
                device,
                opts.max_clips,
                Path(opts.save_predictions) if opts.save_predictions else None,
                not opts.no_java,
                fense,
                opts.data_root,
                opts.audio_pattern,
            )
    except (FileNotFoundError, ValueError, MetricUnavailableError) as e:
        raise CliError(str(e)) from None
    rows = [(n, s) for n, s in result["checkpoints"].items()]
    if "summary" in result:
        rows.append(("mean ± 95% CI", {m: (v["mean"], v["ci95"]) for m, v in result["summary"].items()}))
    print(format_table(rows, result["metrics"]))
    for line in unavailable_lines(result.get("unavailable", {})):
        print(line)
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
