"""DCASE language-based audio retrieval submission: rank the evaluation clips for every caption.

    python -m retrieval.submit --checkpoint CKPT --captions retrieval_captions.csv --audio-dir retrieval_audio \
        --out submission/Name_Inst_task6_1.output.csv [--scores]

Writes
* ``OUT``: ``caption,file_name_1,...,file_name_10``, one row per caption of ``retrieval_captions.csv`` in its
  order, the ten best clips by cosine similarity (ties kept in file-name order);
* with ``--scores``: ``<OUT>.scores.csv``, the full caption x audio score matrix (the 2025 baseline's form: one
  row per caption, one column per audio file name; first header cell ``caption``);
* ``<OUT>.meta.yaml``: a system meta-information template to complete (the official field list of each year
  must be checked on the task page);
and validates them (every caption exactly once, ten distinct existing file names per row, a complete score
matrix) before reporting success. ``--validate-only`` checks existing files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

import m2dclap
from m2dclap.cli import EXIT_SKIPPED, TEXT_MODEL_HELP, UsageError, option, resolve_device, run_cli
from m2dclap.data.manifest import atomic_write_text
from m2dclap.fileio import undecodable_line

from .cache import EmbeddingCache, default_cache_dir, embed_audio_files, embed_texts
from .datasets import MissingAudioError, read_dcase_eval
from .metrics import DEFAULT_BLOCK_BYTES

log = logging.getLogger(__name__)

TOP_K = 10
HEADER = ["caption"] + [f"file_name_{i}" for i in range(1, TOP_K + 1)]


def system_label(out: Path) -> str:
    """``Doe_Inst_task6_1.output.csv`` -> ``Doe_Inst_task6_1``."""
    return out.name[: -len(".output.csv")] if out.name.endswith(".output.csv") else out.stem


def companion(out: Path, kind: str) -> Path:
    """``x.output.csv`` -> ``x.scores.csv`` / ``x.meta.yaml`` (``x.csv`` -> ``x.scores.csv`` ...)."""
    return out.with_name(f"{system_label(out)}.{kind}")


def rank(
    text: torch.Tensor, audio: torch.Tensor, k: int = TOP_K, block_bytes: int = DEFAULT_BLOCK_BYTES, on_block=None
) -> torch.Tensor:
    """Indices (C, k) of the k best clips per caption by cosine similarity, in blocks of captions; ties keep
    the clips' order. ``on_block(start, scores)`` sees every block of the score matrix (for writing it)."""
    t, a = F.normalize(text.float(), dim=-1), F.normalize(audio.float(), dim=-1)
    rows = max(1, block_bytes // max(1, a.shape[0] * 12))
    out = []
    for s in range(0, t.shape[0], rows):
        sim = t[s : s + rows] @ a.T  # (b, N)
        if on_block is not None:
            on_block(s, sim)
        out.append(torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def write_ranking(path: Path, captions: Sequence[str], names: Sequence[str], top: torch.Tensor) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for cap, row in zip(captions, top.tolist()):
        w.writerow([cap] + [names[j] for j in row])
    atomic_write_text(path, buf.getvalue())


class ScoreWriter:
    """Streams blocks of the score matrix into a CSV (written to a temporary name, renamed at the end)."""

    def __init__(self, path: Path, captions: Sequence[str], names: Sequence[str]):
        self.path, self.captions = path, captions
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.f = open(self.tmp, "w", newline="", encoding="utf-8")
        self.w = csv.writer(self.f, lineterminator="\n")
        self.w.writerow(["caption", *names])

    def __call__(self, start: int, sim: torch.Tensor) -> None:
        for i, row in enumerate(sim.tolist()):
            self.w.writerow([self.captions[start + i]] + [f"{v:.6f}" for v in row])

    def close(self) -> None:
        self.f.close()
        self.tmp.replace(self.path)


def meta_template(model, checkpoint: str, system_name: str, dev_results: dict[str, Any] | None) -> str:
    """A DCASE-style system meta-information YAML with what the suite knows filled in."""
    q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
    n_params = sum(p.numel() for p in model.parameters())
    t2a = (dev_results or {}).get("text_to_audio", {})
    fig = {k: (round(100 * t2a[k], 2) if k in t2a else "TODO") for k in ("mAP@10", "R@1", "R@5", "R@10")}
    text_name = getattr(getattr(model, "cfg", None), "text", None)
    text_name = getattr(text_name, "name", "unknown")
    sr = model.sample_rate
    rate = f"{sr // 1000} kHz" if sr % 1000 == 0 else f"{sr} Hz"
    return f"""# DCASE language-based audio retrieval: system meta information (TEMPLATE).
# Fill in every TODO and check the field names against the task's official example for this year.
submission:
  label: {q(system_name)}  # TODO: Lastname_Institute_taskN_index, as the task page prescribes
  name: {q("M2D-CLAP retrieval system")}
  abbreviation: {q("M2D-CLAP")}
  authors:
    - lastname: "TODO"
      firstname: "TODO"
      email: "TODO"
      corresponding: true
      affiliation:
        institution: "TODO"
        location: "TODO"
system:
  description:
    input_sampling_rate: {q(rate)}
    acoustic_features: "log-mel energies"
    audio_encoder: "M2D ViT (masked modeling duo) with a transformer audio projector"
    text_encoder: {q(str(text_name))}
    similarity: "cosine similarity of CLAP embeddings"
    checkpoint: {q(str(checkpoint))}
    training_data: "TODO (e.g. Clotho development, AudioCaps, WavCaps; apply the excluded Freesound ids)"
    data_augmentation: "TODO"
    ensemble_method: "none"
  complexity:
    total_parameters: {n_params}
  source_code: "TODO"
results:
  development_evaluation:  # text->audio from --dev-results (DCASE: the Clotho evaluation split)
    mAP@10: {q(fig["mAP@10"]) if fig["mAP@10"] == "TODO" else fig["mAP@10"]}
    R@1: {q(fig["R@1"]) if fig["R@1"] == "TODO" else fig["R@1"]}
    R@5: {q(fig["R@5"]) if fig["R@5"] == "TODO" else fig["R@5"]}
    R@10: {q(fig["R@10"]) if fig["R@10"] == "TODO" else fig["R@10"]}
"""


# ------------------------------------------------------------------------------------------- validation
def validate_submission(
    out: Path, captions: Sequence[str], audio_dir: Path, scores: Path | None = None, meta: Path | None = None
) -> list[str]:
    """Problems found in a written submission (empty = valid)."""
    errors: list[str] = []
    try:
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        return [f"{out}: cannot read ({e})"]
    except (UnicodeDecodeError, csv.Error) as e:
        return [_unreadable(out, e)]
    if not rows or rows[0] != HEADER:
        errors.append(f"{out}: header must be {','.join(HEADER)}, got {','.join(rows[0]) if rows else 'nothing'}")
        return errors
    body = rows[1:]
    got, want = Counter(r[0] for r in body if r), Counter(captions)
    for cap in want:
        if got[cap] != want[cap]:
            errors.append(f"caption present {got[cap]} time(s), expected {want[cap]}: {cap!r}")
    for cap in got:
        if cap not in want:
            errors.append(f"caption not in the captions file: {cap!r}")
    existing: dict[str, bool] = {}
    for line, row in enumerate(body, start=2):
        names = row[1:]
        if len(names) != TOP_K:
            errors.append(f"{out}, line {line}: {len(names)} file names, expected {TOP_K}")
        if len(set(names)) != len(names):
            errors.append(f"{out}, line {line}: repeated file names")
        for n in names:
            if n not in existing:
                existing[n] = bool(n) and (audio_dir / n).is_file()
            if not existing[n]:
                errors.append(f"{out}, line {line}: no audio file {n!r} in {audio_dir}")
    if scores is not None:
        errors += _validate_scores(scores, captions, audio_dir)
    if meta is not None:
        errors += _validate_meta(meta)
    return errors[:200]


def _unreadable(path: Path, e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return undecodable_line(path, "utf-8") or f"{path}: not UTF-8 text"
    return f"{path}: malformed CSV ({e})"


def _validate_scores(path: Path, captions: Sequence[str], audio_dir: Path) -> list[str]:
    try:
        return _check_scores(path, captions, audio_dir)
    except OSError as e:
        return [f"{path}: cannot read ({e})"]
    except (UnicodeDecodeError, csv.Error) as e:
        return [_unreadable(path, e)]


def _check_scores(path: Path, captions: Sequence[str], audio_dir: Path) -> list[str]:
    errors = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        names = header[1:]
        if not header or header[0] != "caption" or len(set(names)) != len(names):
            return [f"{path}: header must be caption followed by distinct audio file names"]
        missing = [n for n in names if not (audio_dir / n).is_file()]
        if missing:
            errors.append(f"{path}: {len(missing)} column(s) name no audio file in {audio_dir}, e.g. {missing[0]!r}")
        seen = []
        for row in reader:
            line = reader.line_num
            if not row:
                continue  # a blank line
            seen.append(row[0])
            if len(row) != len(header):
                errors.append(f"{path}, line {line}: {len(row)} cells, expected {len(header)}")
                continue
            try:
                if not all(math.isfinite(float(v)) for v in row[1:]):
                    errors.append(f"{path}, line {line}: non-finite score")
            except ValueError:
                errors.append(f"{path}, line {line}: a score is not a number")
    if Counter(seen) != Counter(captions):
        errors.append(f"{path}: rows do not match the captions ({len(seen)} rows, {len(captions)} captions)")
    return errors


def _validate_meta(path: Path) -> list[str]:
    try:
        import yaml
    except ImportError:
        return [] if path.is_file() else [f"{path}: missing"]
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: not valid YAML ({e})"]
    return (
        []
        if isinstance(doc, dict) and {"submission", "system"} <= set(doc)
        else [f"{path}: expected 'submission' and 'system' sections"]
    )


# -------------------------------------------------------------------------------------------------- CLI
@dataclass(kw_only=True)
class SubmitOptions:
    checkpoint: str | None = option(
        None, help="model folder, official .pth file or pretrained name (required unless --validate-only)"
    )
    text_model: str | None = option(None, metavar="PATH", help=TEXT_MODEL_HELP)
    captions: str = option(help="retrieval_captions.csv (column 'caption')")
    audio_dir: str = option(help="folder of the evaluation audio files")
    metadata: str | None = option(
        None,
        help="retrieval_audio_metadata.csv (column file_name): rank exactly these "
        "files (default: every audio file in --audio-dir)",
    )
    out: str = option(help="ranking CSV to write, e.g. Name_Inst_task6_1.output.csv")
    scores: bool = option(False, help="also write the full score matrix <OUT>.scores.csv")
    system_name: str = option("", help="label written into the meta YAML (default: OUT's stem)")
    dev_results: str | None = option(None, help="JSON of python -m retrieval.evaluate to copy into the meta YAML")
    validate_only: bool = option(False, help="check existing output files, write nothing")
    batch_size: int = option(32, minimum=1, help="clips per encoder batch (default 32)")
    cache_dir: str = option(str(default_cache_dir()), help="embedding cache")
    no_cache: bool = option(False, help="do not use the embedding cache")
    device: str = option("auto", help="cpu, cuda, ... (default: cuda if available)")


DESCRIPTION = (
    "Write a DCASE language-based audio retrieval submission: for every caption of "
    "retrieval_captions.csv the ten best audio files (caption,file_name_1..file_name_10), optionally "
    "the full caption x audio score matrix (--scores, the 2025 form), and a system meta YAML template; "
    "the files are validated (each caption once, ten distinct existing file names per row) before "
    "success is reported."
)
EPILOG = (
    "example:\n  python -m retrieval.submit --checkpoint runs/ft/best --captions retrieval_captions.csv "
    "--audio-dir retrieval_audio --out sub/Doe_Inst_task6_1.output.csv --scores\n\n"
    "Exit status 1 also when the evaluation audio cannot all be ranked (an unreadable file, fewer than ten) "
    "or the written submission does not validate."
)


def _read_dev_results(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        dev = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UsageError(f"--dev-results {path}: not a readable JSON file ({e})") from None
    if not isinstance(dev, dict):
        raise UsageError(f"--dev-results {path}: expected the JSON object written by python -m retrieval.evaluate")
    return dev


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, SubmitOptions, argv, prog="python -m retrieval.submit", description=DESCRIPTION, epilog=EPILOG)


def run(args: SubmitOptions) -> int:
    out, audio_dir = Path(args.out), Path(args.audio_dir)
    scores_path = companion(out, "scores.csv") if args.scores else None
    meta_path = companion(out, "meta.yaml")
    try:
        data = read_dcase_eval(args.captions, audio_dir, args.metadata, strict=True)
    except MissingAudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SKIPPED
    except (ValueError, OSError) as e:  # a folder given as a file, bad bytes or rows: named by the message
        raise UsageError(str(e)) from None
    dev = _read_dev_results(args.dev_results)  # before the model: a bad file costs no encoding
    dupes = [c for c, n in Counter(data.captions).items() if n > 1]
    if dupes:
        log.warning("%d caption(s) occur more than once in %s, e.g. %r", len(dupes), args.captions, dupes[0])
    if not args.validate_only:
        if not args.checkpoint:
            raise UsageError("--checkpoint is required unless --validate-only")
        if len(data.audio.records) < TOP_K:
            print(
                f"error: {len(data.audio.records)} audio files in {audio_dir}; a submission ranks {TOP_K}",
                file=sys.stderr,
            )
            return 1
        model = m2dclap.load(args.checkpoint, device=resolve_device(args.device), text_name=args.text_model).eval()
        cache = None if args.no_cache else EmbeddingCache(args.cache_dir, args.checkpoint)
        paths = [r.audio for r in data.audio.records]
        audio, bad = embed_audio_files(model, paths, cache, args.batch_size)
        if bad:
            print(
                "error: unreadable evaluation audio (every file must be ranked):\n  "
                + "\n  ".join(msg for _, msg in bad),
                file=sys.stderr,
            )
            return 1
        text = embed_texts(model, data.captions, cache)
        names = [Path(p).name for p in paths]
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = ScoreWriter(scores_path, data.captions, names) if scores_path else None
        top = rank(text, audio, on_block=writer)
        if writer:
            writer.close()
        write_ranking(out, data.captions, names, top)
        atomic_write_text(meta_path, meta_template(model, args.checkpoint, args.system_name or system_label(out), dev))
    errors = validate_submission(out, data.captions, audio_dir, scores_path, meta_path)
    if errors:
        print(f"error: the submission in {out} is not valid:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    written = [out] + ([scores_path] if scores_path else []) + [meta_path]
    print(
        f"valid submission: {len(data.captions)} captions x {len(data.audio.records)} audio files; "
        + ", ".join(str(p) for p in written)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
