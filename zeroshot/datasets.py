"""Readers for the public layouts of the zero-shot tasks (paper Table VII) and for the suite's manifests.

Every reader returns a :class:`ZeroShotDataset`: clips (audio path, labels, fold or split), the class list in
sorted order (EVAR's), whether the task is multi-label, the prompt rule of :mod:`zeroshot.templates` and the
display names of the labels where the raw labels are codes (AudioSet MIDs, CREMA-D emotion codes).

    ESC-50        meta/esc50.csv (filename,fold,target,category,...), audio/<filename>; all 5 folds
    UrbanSound8K  metadata/UrbanSound8K.csv (slice_file_name,...,fold,classID,class), audio/fold<N>/<file>
    GTZAN         genres/<genre>/*.wav or genres_original/<genre>/*.wav; test_filtered.txt or a split file of
                  relative paths
    NSynth        examples.json (note_str -> {instrument_family_str, ...}), audio/<note_str>.wav
    CREMA-D       AudioWAV/<actor>_<sentence>_<EMO>_<level>.wav; EVAR's test speakers or a split CSV
    FSD50K        FSD50K.ground_truth/eval.csv (fname,labels,mids), FSD50K.eval_audio/<fname>.wav
    AudioSet      segments CSV (YTID, start_seconds, end_seconds, positive_labels; '#' comment lines),
                  class_labels_indices.csv, audio file names from a pattern ("audio/{ytid}.wav")
    manifest      the suite's CSV/JSONL manifest with a label column

Every class list is sorted, as EVAR sorts its labels (ESC-50/US8K by name, not by target id; FSD50K not in
vocabulary.csv order; AudioSet by MID), so per-class tables and confusion matrices read as EVAR's.
As EVAR does, the folds of ESC-50 and US8K are pooled (every clip is a test clip once); the tasks with an
official split use their test/eval split: GTZAN EVAR's fault-filtered ``test_filtered.txt`` (read from the
dataset root, or given as ``split_file``), CREMA-D EVAR's test speakers; ``split="all"`` takes every clip.
Audio files that do not exist are listed in ``missing`` and logged; with ``strict=True`` they are an error.
Malformed metadata raises :class:`DatasetError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from m2dclap.audio import AUDIO_EXTENSIONS
from m2dclap.data.manifest import parse_labels, raw_columns, read_manifest

# the metadata checks the readers share; DatasetError is importable from here as before
from .metadata import (
    CREMAD_TEST_SPEAKERS,
    GTZAN_SPLIT_SOURCE,
    DatasetError,
    cremad_label,
    int_field,
    metadata_rows,
    need_file,
    ordered_classes,
    record_target,
)
from .templates import CREMAD_NAMES, CREMAD_SENTENCES, read_class_labels_indices

log = logging.getLogger(__name__)

NSYNTH_FAMILIES = (
    "bass",
    "brass",
    "flute",
    "guitar",
    "keyboard",
    "mallet",
    "organ",
    "reed",
    "string",
    "synth_lead",
    "vocal",
)  # instrument_family 0..10; the test split lacks synth_lead
DATASETS = ("esc50", "us8k", "gtzan", "nsynth", "cremad", "fsd50k", "audioset", "manifest")


@dataclass
class Clip:
    """One evaluation clip."""

    path: Path  # the audio file
    labels: list[str]  # raw labels (category names, MIDs, emotion codes); one for single-label tasks
    fold: str | None = None  # the fold ("1".."10") or split ("test", "eval") the clip belongs to


@dataclass
class ZeroShotDataset:
    """Clips with labels and the class list of one task."""

    name: str  # dataset name ("esc50", ...)
    clips: list[Clip]  # clips whose audio file exists
    classes: list[str]  # raw labels, sorted (EVAR's class order: per-class tables read the same)
    multi_label: bool  # several labels per clip (mAP) or one (accuracy)
    rule: str = "default"  # the prompt rule of zeroshot.templates for this task
    label_names: dict[str, str] | None = None  # raw label -> display text (AudioSet MIDs, CREMA-D codes)
    missing: list[Path] = field(default_factory=list)  # listed audio files that do not exist

    def targets(self) -> np.ndarray:
        """(N,) class indices for single-label tasks, (N, C) 0/1 for multi-label ones."""
        return self.targets_of(self.clips)

    def targets_of(self, clips: Sequence[Clip]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        if not self.multi_label:
            return np.array([index[c.labels[0]] for c in clips], dtype=np.int64)
        y = np.zeros((len(clips), len(self.classes)), dtype=np.int64)
        for n, clip in enumerate(clips):
            y[n, [index[lab] for lab in clip.labels]] = 1
        return y


# ----------------------------------------------------------------------------------------------- helpers


def _split_missing(name: str, clips: list[Clip], strict: bool) -> tuple[list[Clip], list[Path]]:
    """Clips whose file exists, and the paths of the others (logged; an error when ``strict``)."""
    present = [c for c in clips if c.path.is_file()]
    missing = [c.path for c in clips if not c.path.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        msg = f"{name}: {len(missing)} of {len(clips)} audio file(s) missing: {shown}"
        if strict:
            raise DatasetError(msg + " (strict mode)")
        log.warning("%s", msg)
    return present, missing


def _keep_folds(clips: list[Clip], folds: Sequence[Any] | None) -> list[Clip]:
    if not folds:
        return clips
    wanted = {str(f).strip() for f in folds}
    return [c for c in clips if c.fold in wanted]


# ----------------------------------------------------------------------------------------------- readers


def read_esc50(root: str | Path, folds: Sequence[Any] | None = None, strict: bool = False) -> ZeroShotDataset:
    """ESC-50: ``meta/esc50.csv`` and ``audio/``; 50 classes sorted by name; folds kept as ``fold``."""
    root = Path(root)
    meta = need_file(root / "meta" / "esc50.csv", "ESC-50 metadata; --root is the ESC-50-master folder")
    clips, classes = [], {}
    for line, row in metadata_rows(meta, ("filename", "fold", "target", "category")):
        fold = int_field(row["fold"], meta, line, "fold")
        record_target(classes, int_field(row["target"], meta, line, "target"), row["category"], meta, line)
        clips.append(Clip(root / "audio" / row["filename"], [row["category"]], str(fold)))
    present, missing = _split_missing("esc50", _keep_folds(clips, folds), strict)
    return ZeroShotDataset("esc50", present, sorted(ordered_classes(classes)), False, "esc50", missing=missing)


def read_us8k(root: str | Path, folds: Sequence[Any] | None = None, strict: bool = False) -> ZeroShotDataset:
    """UrbanSound8K: ``metadata/UrbanSound8K.csv`` and ``audio/fold<N>/``; 10 classes sorted by name."""
    root = Path(root)
    meta = need_file(root / "metadata" / "UrbanSound8K.csv", "UrbanSound8K metadata; --root is the UrbanSound8K folder")
    clips, classes = [], {}
    for line, row in metadata_rows(meta, ("slice_file_name", "fold", "classID", "class")):
        fold = int_field(row["fold"], meta, line, "fold")
        record_target(classes, int_field(row["classID"], meta, line, "classID"), row["class"], meta, line)
        clips.append(Clip(root / "audio" / f"fold{fold}" / row["slice_file_name"], [row["class"]], str(fold)))
    present, missing = _split_missing("us8k", _keep_folds(clips, folds), strict)
    return ZeroShotDataset("us8k", present, sorted(ordered_classes(classes)), False, "us8k", missing=missing)


def _gtzan_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (GTZAN)")
    for name in ("genres", "genres_original", "Data/genres_original"):
        if (root / name).is_dir():
            return root / name
    if any(p.is_dir() for p in root.iterdir()):
        return root  # the genre folders themselves
    raise DatasetError(f"{root}: no GTZAN genre folders (expected genres/<genre>/*.wav or genres_original/)")


def _gtzan_split_file(root: Path, split: str) -> Path:
    name = f"{split}_filtered.txt"
    for path in (root / name, root / "GTZAN_split" / name):
        if path.is_file():
            return path
    raise DatasetError(
        f"{root}: GTZAN's {split} split needs {name} from {GTZAN_SPLIT_SOURCE}: put it in {root} or pass it "
        "with --split-file FILE; --split all evaluates every clip instead (departs from EVAR)"
    )


def read_gtzan(
    root: str | Path, split_file: str | Path | None = None, split: str = "test", strict: bool = False
) -> ZeroShotDataset:
    """GTZAN: the label is the genre folder. ``split_file`` lists the clips to use, one relative path a line
    (``blues/blues.00012.wav``; a bare ``blues.00012.wav`` takes the genre from the name; a listed ``.au`` is
    read as the ``.wav`` of the same name if only that exists). Without it, ``<split>_filtered.txt`` in
    ``root`` (EVAR's fault-filtered split) is read, an error if absent; ``split="all"``: every clip."""
    root = Path(root)
    genres_dir = _gtzan_dir(root)
    if split_file is None and split != "all":
        split_file = _gtzan_split_file(root, split)
    genres = sorted(p.name for p in genres_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    clips: list[Clip] = []
    if split_file is None:
        for genre in genres:
            for f in sorted((genres_dir / genre).iterdir()):
                if f.suffix.lower() in AUDIO_EXTENSIONS:
                    clips.append(Clip(f, [genre], None))
    else:
        split_file = need_file(Path(split_file), "GTZAN split file")
        with open(split_file, encoding="utf-8-sig") as fh:
            for line, text in enumerate(fh, start=1):
                rel = text.strip()
                if not rel or rel.startswith("#"):
                    continue
                rel_path = Path(rel.replace("\\", "/"))
                genre = rel_path.parts[0] if len(rel_path.parts) > 1 else rel_path.name.split(".")[0]
                if not genre:
                    raise DatasetError(f"{split_file}, line {line}: cannot tell the genre of {rel!r}")
                path = genres_dir / (rel_path if len(rel_path.parts) > 1 else Path(genre) / rel_path)
                if not path.exists() and path.with_suffix(".wav").exists():
                    path = path.with_suffix(".wav")
                clips.append(Clip(path, [genre], split_file.stem))
        genres = sorted(set(genres) | {c.labels[0] for c in clips})
    if not clips:
        raise DatasetError(f"{genres_dir}: no audio files found in the genre folders")
    present, missing = _split_missing("gtzan", clips, strict)
    return ZeroShotDataset("gtzan", present, genres, False, "gtzan", missing=missing)


def read_nsynth(root: str | Path, split: str = "test", strict: bool = False) -> ZeroShotDataset:
    """NSynth: ``examples.json`` (in ``root`` or ``root/nsynth-<split>``) labels each ``audio/<note_str>.wav``
    with its ``instrument_family_str``. The classes are the 11 families (EVAR takes them from the train split;
    the test split has no ``synth_lead``)."""
    root = Path(root)
    base = root if (root / "examples.json").is_file() else root / f"nsynth-{split}"
    meta = need_file(base / "examples.json", f"NSynth metadata; --root is the nsynth-{split} folder")
    try:
        with open(meta, encoding="utf-8") as f:
            examples = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta}, line {e.lineno}: bad JSON ({e.msg})") from None
    if not isinstance(examples, dict):
        raise DatasetError(f"{meta}: expected an object keyed by note_str, got {type(examples).__name__}")
    clips = []
    for note, info in examples.items():
        family = info.get("instrument_family_str") if isinstance(info, dict) else None
        if not isinstance(family, str) or not family:
            raise DatasetError(f"{meta}: example {note!r} has no instrument_family_str")
        clips.append(Clip(base / "audio" / f"{note}.wav", [family], split))
    classes = sorted(set(NSYNTH_FAMILIES) | {c.labels[0] for c in clips})
    present, missing = _split_missing("nsynth", clips, strict)
    return ZeroShotDataset("nsynth", present, classes, False, "nsynth", missing=missing)


def read_cremad(
    root: str | Path, split_file: str | Path | None = None, split: str = "test", strict: bool = False
) -> ZeroShotDataset:
    """CREMA-D: labels from the file names in ``AudioWAV/`` (or ``root``). ``split_file`` (a CSV with
    ``file_name`` and ``split`` columns, as EVAR's ``cremad.csv``) keeps the clips of ``split``; without it
    ``split="test"`` is EVAR's test split (the clips of its 19 test speakers) and ``"all"`` every clip."""
    root = Path(root)
    audio_dir = root / "AudioWAV" if (root / "AudioWAV").is_dir() else root
    if not audio_dir.is_dir():
        raise DatasetError(f"{root}: no such folder (CREMA-D; expected AudioWAV/*.wav)")
    if split_file is None:
        files = sorted(p for p in audio_dir.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise DatasetError(f"{audio_dir}: no audio files")
        if split not in ("test", "all"):
            raise DatasetError(f"CREMA-D split {split!r} needs --split-file (EVAR's cremad.csv); else test or all")
        clips = [Clip(p, [cremad_label(p)], None if split == "all" else split) for p in files]
        clips = [c for c in clips if split == "all" or c.path.name.split("_")[0] in CREMAD_TEST_SPEAKERS]
        if not clips:
            raise DatasetError(f"{audio_dir}: no clip of EVAR's CREMA-D test speakers; --split all takes every clip")
    else:
        split_file = need_file(Path(split_file), "CREMA-D split file")
        clips = []
        for line, row in metadata_rows(split_file, ("file_name", "split")):
            if split != "all" and row["split"] != split:
                continue
            name = Path(row["file_name"].replace("\\", "/")).name
            try:
                label = cremad_label(name)
            except DatasetError as e:
                raise DatasetError(f"{split_file}, line {line}: {e}") from None
            clips.append(Clip(audio_dir / name, [label], split))
        if not clips:
            raise DatasetError(f"{split_file}: no rows with split {split!r}")
    present, missing = _split_missing("cremad", clips, strict)
    return ZeroShotDataset("cremad", present, sorted(CREMAD_SENTENCES), False, "cremad", dict(CREMAD_NAMES), missing)


def read_fsd50k(root: str | Path, split: str = "eval", strict: bool = False) -> ZeroShotDataset:
    """FSD50K: ``FSD50K.ground_truth/<split>.csv`` (fname,labels,mids) and ``FSD50K.<split>_audio/``; the 200
    classes of ``vocabulary.csv`` when it exists, else the labels found; sorted, as EVAR."""
    root = Path(root)
    gt = root / "FSD50K.ground_truth"
    meta = need_file(gt / f"{split}.csv", "FSD50K ground truth; --root holds FSD50K.ground_truth/")
    vocab_file = gt / "vocabulary.csv"
    vocab: list[str] = []
    if vocab_file.is_file():
        rows = metadata_rows(vocab_file, (), header=("index", "label", "mid"))
        vocab = [
            row["label"] for _, row in sorted(rows, key=lambda r: int_field(r[1]["index"], vocab_file, r[0], "index"))
        ]
    known = set(vocab)
    clips = []
    for line, row in metadata_rows(meta, ("fname", "labels")):
        labels = [lab.strip() for lab in row["labels"].split(",") if lab.strip()]
        if not labels:
            raise DatasetError(f"{meta}, line {line}: clip {row['fname']!r} has no labels")
        unknown = [lab for lab in labels if vocab and lab not in known]
        if unknown:
            raise DatasetError(f"{meta}, line {line}: label(s) {', '.join(unknown)} not in {vocab_file}")
        clips.append(Clip(root / f"FSD50K.{split}_audio" / f"{row['fname']}.wav", labels, row.get("split") or split))
    classes = sorted(vocab or {lab for c in clips for lab in c.labels})
    present, missing = _split_missing("fsd50k", clips, strict)
    return ZeroShotDataset("fsd50k", present, classes, True, "fsd50k", missing=missing)


def _audioset_name(pattern: str, ytid: str, start: str, end: str, where: str) -> str:
    try:
        s, e = float(start), float(end)
    except ValueError:
        raise DatasetError(f"{where}: start/end seconds {start!r}, {end!r} are not numbers") from None
    try:
        return pattern.format(
            ytid=ytid,
            start=start,
            end=end,
            start_ms=round(s * 1000),
            end_ms=round(e * 1000),
            start_s=int(s),
            end_s=int(e),
        )
    except (KeyError, IndexError) as e:
        raise DatasetError(
            f"audio pattern {pattern!r}: unknown field {e}; use {{ytid}}, {{start}}, {{end}}, "
            "{start_ms}, {end_ms}, {start_s} or {end_s}"
        ) from None


def read_audioset(
    root: str | Path,
    segments: str | Path = "eval_segments.csv",
    class_index: str | Path = "class_labels_indices.csv",
    audio_pattern: str = "audio/{ytid}.wav",
    strict: bool = False,
) -> ZeroShotDataset:
    """AudioSet: a segments CSV (``YTID, start_seconds, end_seconds, positive_labels`` after ``#`` comment
    lines), ``class_labels_indices.csv`` (527 MIDs and display names) and audio files found by
    ``audio_pattern`` relative to ``root`` (fields ``{ytid}``, ``{start}``/``{end}`` as written in the CSV,
    ``{start_ms}``/``{end_ms}``, ``{start_s}``/``{end_s}``). Relative CSV paths are under ``root``."""
    root = Path(root)
    seg_file = need_file(root / segments, "AudioSet segments CSV, e.g. eval_segments.csv")
    index_file = root / class_index
    try:
        pairs = read_class_labels_indices(index_file)
    except FileNotFoundError as e:
        raise DatasetError(str(e)) from None
    except ValueError as e:
        raise DatasetError(str(e)) from None
    classes, names = [m for m, _ in pairs], dict(pairs)
    clips = []
    columns = ("YTID", "start_seconds", "end_seconds", "positive_labels")
    for line, row in metadata_rows(seg_file, (), header=columns, comment="#", skipinitialspace=True):
        where = f"{seg_file}, line {line}"
        labels = [m.strip() for m in row["positive_labels"].split(",") if m.strip()]
        unknown = [m for m in labels if m not in names]
        if unknown or not labels:
            raise DatasetError(
                f"{where}: " + (f"MID(s) {', '.join(unknown)} not in {index_file}" if unknown else "no positive labels")
            )
        rel = _audioset_name(audio_pattern, row["YTID"], row["start_seconds"], row["end_seconds"], where)
        clips.append(Clip(root / rel, labels, Path(segments).stem))
    present, missing = _split_missing("audioset", clips, strict)
    return ZeroShotDataset("audioset", present, sorted(classes), True, "audioset", names, missing)


def read_manifest_dataset(
    manifest: str | Path,
    label_column: str = "labels",
    split: str | None = "test",
    task: str = "auto",
    strict: bool = False,
) -> ZeroShotDataset:
    """A suite manifest: labels from ``label_column`` (``;``-separated), clips of ``split`` (None or ``"all"``:
    every clip).

    ``task``: ``single`` (each clip's first label is its class), ``multi`` (all labels) or ``auto`` (multi if
    any clip of the manifest has several labels). The classes are the sorted labels of the whole manifest
    (all splits), so a class missing from the test split still competes, as in EVAR.
    """
    if task not in ("auto", "single", "multi"):
        raise DatasetError(f"task must be auto, single or multi, got {task!r}")
    manifest = Path(manifest)
    try:
        records = read_manifest(manifest)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    if label_column != "labels":
        cells, _ = raw_columns(manifest, (label_column,))
        if cells[label_column] is None:
            raise DatasetError(f"{manifest}: no column {label_column!r}")
        labels_of = {r.id: parse_labels(c) for r, c in zip(records, cells[label_column])}
    else:
        labels_of = {r.id: list(r.labels) for r in records}
    multi = task == "multi" or (task == "auto" and any(len(v) > 1 for v in labels_of.values()))
    if not multi:
        labels_of = {k: v[:1] for k, v in labels_of.items()}
    classes = sorted({lab for v in labels_of.values() for lab in v})
    if not classes:
        raise DatasetError(f"{manifest}: no labels in column {label_column!r}")
    split = None if split in (None, "all") else split
    chosen = [r for r in records if split is None or r.split == split]
    unlabelled = [r.id for r in chosen if not labels_of[r.id]]
    if unlabelled:
        log.warning(
            "%s: %d clip(s) of split %s have no label and are left out (e.g. %s)",
            manifest,
            len(unlabelled),
            split or "all",
            unlabelled[0],
        )
    clips = [Clip(Path(r.audio), labels_of[r.id], r.split) for r in chosen if labels_of[r.id]]
    if not clips:
        raise DatasetError(f"{manifest}: no labelled clips in split {split!r}")
    present, missing = _split_missing("manifest", clips, strict)
    return ZeroShotDataset("manifest", present, classes, multi, "default", missing=missing)


READERS: dict[str, Callable[..., ZeroShotDataset]] = {
    "esc50": read_esc50,
    "us8k": read_us8k,
    "gtzan": read_gtzan,
    "nsynth": read_nsynth,
    "cremad": read_cremad,
    "fsd50k": read_fsd50k,
    "audioset": read_audioset,
    "manifest": read_manifest_dataset,
}


def read_zeroshot_dataset(name: str, *args: Any, **kwargs: Any) -> ZeroShotDataset:
    """``READERS[name](*args, **kwargs)``; options given as None take the reader's default."""
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(READERS)}")
    return READERS[name](*args, **{k: v for k, v in kwargs.items() if v is not None})
