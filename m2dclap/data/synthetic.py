"""The embedded corpus: procedurally synthesised sound events with captions made from the same parameters.

Every clip is drawn from a small parameter space (DESIGN.md "The embedded corpus"): one to three events of
12 classes (:data:`CLASS_NAMES`), each with a pitch (low/mid/high), a loudness (quiet/loud) and a number of
repetitions (once/twice/three times), played in order ("then") or at the same time ("while", "over"), on
silence, a faint hiss or a mains hum. The captions are composed from those parameters, so the text describes
the audio, and each clip gets several paraphrases. Clips are 1.5-3.0 s long, written as 16-bit wav files with
a ``manifest.csv`` in the suite's manifest format, and split 80/10/10 into train/val/test, stratified by the
primary class (the class of the first event, or of the foreground event of an overlap).

    python -m m2dclap.data.synthetic --out /tmp/synth --n-clips 2000 --seed 0
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
from filelock import FileLock

from ..cli import UsageError, option, run_cli
from .manifest import Record, atomic_write_text, write_manifest
from .synth_clips import N_CAPTIONS, make_captions, render_clip

# the clip model: PITCHES, SOUND_CLASSES, ClipSpec and Event re-exported, as tests import them from here
from .synth_specs import CLASS_NAMES, PITCHES, SOUND_CLASSES, ClipSpec, Event, sample_clip  # noqa: F401

log = logging.getLogger(__name__)

GENERATOR = "m2dclap.data.synthetic"  # recorded in corpus.json: marks a folder as a corpus of ours
GENERATOR_VERSION = 1  # bump when the sounds or captions change, so cached corpora are regenerated
MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "corpus.json"
MARKER_NAME = ".complete"  # written last: a folder without it holds a half-written corpus
AUDIO_DIR = "audio"


# ----------------------------------------------------------------------------------------------- the corpus


def default_corpus_dir() -> Path:
    """``$M2DCLAP_DATA`` if set, else ``~/.cache/m2dclap/synthetic-v1``."""
    env = os.environ.get("M2DCLAP_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "m2dclap" / f"synthetic-v{GENERATOR_VERSION}"


def _assign_primaries(n_clips: int, rng: np.random.Generator) -> list[str]:
    """Balanced primary classes (each class n_clips/12 times, +-1), in a seeded order."""
    idx = rng.permutation(np.resize(np.arange(len(CLASS_NAMES)), n_clips))
    return [CLASS_NAMES[i] for i in idx]


def assign_splits(primaries: Sequence[str], rng: np.random.Generator) -> list[str]:
    """80/10/10 train/val/test, stratified by primary class.

    The clips are listed class by class (shuffled within a class) and every tenth position of that list goes
    to val and to test, so each class and the whole corpus get the same proportions, to within one clip.
    """
    order: list[int] = []
    for name in CLASS_NAMES:
        members = [i for i, p in enumerate(primaries) if p == name]
        order.extend(int(i) for i in rng.permutation(members))
    splits = ["train"] * len(primaries)
    for pos, i in enumerate(order):
        splits[i] = {3: "val", 8: "test"}.get(pos % 10, "train")
    return splits


def _params(n_clips: int, seed: int, sample_rate: int) -> dict:
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "n_clips": n_clips,
        "seed": seed,
        "sample_rate": sample_rate,
        "n_captions": N_CAPTIONS,
    }


def _clip_id(i: int) -> str:
    return f"syn_{i:05d}"


class CorpusFolderError(ValueError):
    """A folder that holds something other than a synthetic corpus of the requested parameters (nothing in it
    is touched); the message names the folder and what it holds."""


LOCK_NAME = ".lock"
_OWN_NAMES = {MANIFEST_NAME, PARAMS_NAME, MARKER_NAME, LOCK_NAME, AUDIO_DIR}
# hidden temporaries that an interrupted atomic write of ours (m2dclap.fileio) leaves behind
_OWN_TMP = re.compile(r"^\.(manifest\.csv|corpus\.json|\.complete)\..+\.tmp$")
_OWN_WAV = re.compile(r"^syn_\d{5,}\.wav$")


def is_complete(out_dir: str | Path, n_clips: int = 2000, seed: int = 0, sample_rate: int = 16000) -> bool:
    """Whether ``out_dir`` holds a finished corpus made with these parameters."""
    out_dir = Path(out_dir)
    if not ((out_dir / MARKER_NAME).is_file() and (out_dir / MANIFEST_NAME).is_file()):
        return False
    if _recorded_params(out_dir) != _params(n_clips, seed, sample_rate):
        return False
    audio = out_dir / AUDIO_DIR
    return all((audio / f"{_clip_id(i)}.wav").is_file() for i in range(n_clips))


def _recorded_params(out_dir: Path) -> dict | None:
    """The parameters a build of ours wrote first into ``corpus.json``; None if there is no such file of ours."""
    try:
        params = json.loads((out_dir / PARAMS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) and params.get("generator") == GENERATOR else None


def _foreign_entries(out_dir: Path) -> list[str]:
    """What ``out_dir`` holds that a corpus build does not write ("name", "name/" for a folder)."""
    found = []
    for p in sorted(out_dir.iterdir()):
        ours = p.name in _OWN_NAMES and p.is_dir() == (p.name == AUDIO_DIR)
        if not (ours or (p.is_file() and _OWN_TMP.match(p.name))):
            found.append(p.name + ("/" if p.is_dir() else ""))
    audio = out_dir / AUDIO_DIR
    if audio.is_dir():
        found += [
            f"{AUDIO_DIR}/{p.name}" for p in sorted(audio.iterdir()) if not (p.is_file() and _OWN_WAV.match(p.name))
        ]
    return found


def _shown(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _describe(params: dict) -> str:
    return (
        f"{params.get('n_clips')} clips, seed {params.get('seed')}, {params.get('sample_rate')} Hz, "
        f"generator version {params.get('version')}"
    )


def check_corpus_folder(
    out_dir: str | Path, n_clips: int = 2000, seed: int = 0, sample_rate: int = 16000, force: bool = False
) -> bool:
    """Whether ``out_dir`` may be used for the corpus of these parameters: True if it holds that corpus,
    finished (reuse it, unless ``force``); False if a build may write into it (missing or empty folder, or an
    interrupted build of ours with these parameters, or with ``force`` any corpus of ours). Anything else -- a
    folder holding other files, a corpus of other parameters without ``force`` -- raises
    :class:`CorpusFolderError`: a user's folder is never overwritten.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise CorpusFolderError(f"{out_dir}: not a folder; give a new or empty folder for the synthetic corpus")
    wanted = _params(n_clips, seed, sample_rate)
    if not force and is_complete(out_dir, n_clips, seed, sample_rate):
        return True
    recorded, foreign = _recorded_params(out_dir), _foreign_entries(out_dir)
    if recorded is None:  # corpus.json is written first: without it nothing here is ours (but a lock)
        held = foreign + sorted(n + "/" * (n == AUDIO_DIR) for n in _OWN_NAMES - {LOCK_NAME} if (out_dir / n).exists())
        if held:
            raise CorpusFolderError(
                f"{out_dir}: refusing to write the synthetic corpus into a folder that is not "
                f"one: it holds {_shown(held)}; give a new or empty folder (a corpus left "
                f"unfinished by an older version of the suite has to be removed by hand)"
            )
        return False
    if foreign:
        raise CorpusFolderError(
            f"{out_dir}: holds a synthetic corpus and other files ({_shown(foreign)}); "
            f"refusing to rebuild it; move them away or give another folder"
        )
    if recorded != wanted and not force:
        state = "finished" if (out_dir / MARKER_NAME).is_file() else "unfinished"
        raise CorpusFolderError(
            f"{out_dir}: holds a {state} synthetic corpus of {_describe(recorded)}, not the "
            f"requested {_describe(wanted)}; give another folder, or replace it with "
            f"python -m m2dclap.data.synthetic --out {out_dir} --n-clips {n_clips} --seed {seed} "
            f"--force"
        )
    return False


def generate_corpus(
    out_dir: str | Path | None = None, n_clips: int = 2000, seed: int = 0, sample_rate: int = 16000, force: bool = False
) -> Path:
    """Write the corpus (``audio/*.wav`` + ``manifest.csv``) into ``out_dir``; return the manifest path.

    A folder that holds the finished corpus of these parameters is returned as is (unless ``force``); a
    missing or empty folder, or an interrupted build of these parameters, is built into. ``corpus.json`` (the
    parameters) is written first and the ``.complete`` marker last, so an interrupted build is recognised as
    ours and redone. Any other folder content raises :class:`CorpusFolderError` before anything is written
    (see :func:`check_corpus_folder`); ``force`` rebuilds a corpus of ours made with other parameters.
    """
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if sample_rate < 16000:
        raise ValueError(f"sample_rate must be >= 16000 Hz (the sounds reach 6.5 kHz), got {sample_rate}")
    out_dir = Path(out_dir) if out_dir is not None else default_corpus_dir()
    manifest = out_dir / MANIFEST_NAME
    check_corpus_folder(out_dir, n_clips, seed, sample_rate, force)  # before the lock file is created
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir / LOCK_NAME):  # several processes of one run generate the corpus once
        # again under the lock: another process may have finished (or begun) the corpus meanwhile
        if check_corpus_folder(out_dir, n_clips, seed, sample_rate, force):
            log.info("using the cached synthetic corpus in %s", out_dir)
            return manifest
        (out_dir / MARKER_NAME).unlink(missing_ok=True)
        atomic_write_text(out_dir / PARAMS_NAME, json.dumps(_params(n_clips, seed, sample_rate), indent=1))
        t0 = time.perf_counter()
        records = _write_clips(out_dir, n_clips, seed, sample_rate)
        write_manifest(records, manifest)
        atomic_write_text(out_dir / MARKER_NAME, "complete\n")
        log.info("wrote %d synthetic clips to %s in %.1f s", n_clips, out_dir, time.perf_counter() - t0)
    return manifest


def _write_clips(out_dir: Path, n_clips: int, seed: int, sample_rate: int) -> list[Record]:
    audio_dir = out_dir / AUDIO_DIR
    audio_dir.mkdir(exist_ok=True)
    wanted = {f"{_clip_id(i)}.wav" for i in range(n_clips)}
    for old in audio_dir.glob("syn_*.wav"):
        if old.name not in wanted:
            old.unlink()
    rng = np.random.default_rng([seed, 0xC0])
    primaries = _assign_primaries(n_clips, rng)
    splits = assign_splits(primaries, rng)
    records = []
    for i in _progress(range(n_clips), "synthesising clips"):
        clip_rng = np.random.default_rng([seed, 1, i])
        spec = sample_clip(clip_rng, primaries[i])
        wave = render_clip(spec, sample_rate, clip_rng)
        path = audio_dir / f"{_clip_id(i)}.wav"
        _write_wav(path, wave, sample_rate)
        records.append(
            Record(
                id=_clip_id(i), audio=path, captions=make_captions(spec, clip_rng), labels=spec.labels, split=splits[i]
            )
        )
    return records


def _write_wav(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    # Encoded in memory, then written: libsndfile fsyncs files it writes itself, which made disk syncs
    # half of the generation time. The completion marker, not each file, guards against interruptions.
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="WAV", subtype="PCM_16")
    path.write_bytes(buf.getvalue())


def _progress(it: range, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, disable=None, leave=False)  # disable=None: silent when not on a terminal


# ----------------------------------------------------------------------------------------------- CLI


@dataclass(kw_only=True)
class SyntheticOptions:
    out: Path | None = option(None, help=f"output folder (default: $M2DCLAP_DATA or {default_corpus_dir()})")
    n_clips: int = option(2000, help="number of clips (default: 2000)")
    seed: int = option(0, help="random seed; same seed, same corpus (default: 0)")
    sample_rate: int = option(16000, help="sample rate in Hz (default: 16000)")
    force: bool = option(
        False,
        help="regenerate a corpus of ours even if it is finished or was made with other "
        "parameters (a folder holding anything else is never written into)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        run,
        SyntheticOptions,
        argv,
        prog="python -m m2dclap.data.synthetic",
        description="Generate the embedded synthetic sound-and-caption corpus: 16-bit wav clips of "
        "1.5-3.0 s with 5 captions each, split 80/10/10 into train/val/test, and a "
        "manifest.csv. A folder that already holds the same corpus is left as it is; a folder "
        "holding anything else (other files, a corpus of other parameters) is refused with "
        "exit status 2.",
    )


def run(opts: SyntheticOptions) -> int:
    try:
        manifest = generate_corpus(
            opts.out, n_clips=opts.n_clips, seed=opts.seed, sample_rate=opts.sample_rate, force=opts.force
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
