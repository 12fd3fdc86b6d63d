"""Reading speed of ``m2dclap.embed_files.AudioBatches``: worker processes (a DataLoader) vs threads.

    python bench/embed_files.py                     # 200 files x 10 s at 44.1 kHz -> 16 kHz, workers 0 1 2
    python bench/embed_files.py --files 50 --workers 0 2 4 --repeats 3
    python bench/embed_files.py --model tiny        # and encode each batch with the tiny preset meanwhile

The files are generated once into ``--dir`` (default: a temporary folder): harmonic tones with noise,
16-bit PCM mono WAV at 44.1 kHz, as on real corpora, so every read decodes and resamples to 16 kHz, which
is where the time goes. Each backend reads them all as batches of ``--batch-size`` files for each worker
count, in turns (threads, processes, threads, ...) so both see the same load on a shared machine; the
figure is files/s of the best of ``--repeats`` runs, with the median in brackets. The files are read once
before timing, so every run finds them in the page cache. With ``--model tiny`` the calling process also
encodes every batch with a tiny CLAP (random weights), as the embedding commands do, so reading ahead
overlaps with the model. ``threads`` with 0 workers still reads ahead in one thread (the reader before the
DataLoader); ``processes`` with 0 workers reads in the calling process. Worker processes run one intra-op
thread each; the calling process keeps torch's default. Figures only, no asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_files(folder: Path, n: int, seconds: float, sr: int) -> list[Path]:
    """``n`` WAVs of ``seconds`` at ``sr``; files already there (from an earlier run) are kept."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    paths = []
    for i in range(n):
        p = folder / f"clip{i:04d}_{sr}.wav"
        if not p.is_file() or sf.info(str(p)).frames != len(t):
            rng = np.random.default_rng(i)
            f0 = 110.0 * 2 ** (i % 24 / 12)
            wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5)) * 0.2
            sf.write(p, (wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32), sr, subtype="PCM_16")
        paths.append(p)
    return paths


def read_all(paths: list[Path], backend: str, workers: int, batch_size: int, sample_rate: int, model) -> float:
    """Seconds to read (and with ``model``, encode) every file once."""
    from m2dclap.embed_files import AudioBatches

    t0 = time.perf_counter()
    n = 0
    for batch in AudioBatches(paths, sample_rate, 1, batch_size, workers=workers, backend=backend):
        n += len(batch.waves)
        if model is not None and batch.waves:
            model.encode_audio(batch.waves, sample_rate)
    seconds = time.perf_counter() - t0
    assert n == len(paths), f"only {n} of {len(paths)} files were read"  # a broken reader, not a figure
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200, help="number of generated files")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each file")
    p.add_argument("--file-rate", type=int, default=44100, help="sample rate of the files")
    p.add_argument("--sample-rate", type=int, default=16000, help="rate they are resampled to")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--model",
        choices=["none", "tiny"],
        default="none",
        help="encode each batch with a tiny CLAP in the calling process meanwhile",
    )
    p.add_argument("--dir", type=Path, default=None, help="keep the generated files here (default: a temp folder)")
    args = p.parse_args(argv)

    import torch

    model = None
    if args.model == "tiny":
        import m2dclap

        torch.manual_seed(0)
        model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"})).eval()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        t0 = time.perf_counter()
        paths = make_files(folder, args.files, args.seconds, args.file_rate)
        print(
            f"{len(paths)} files x {args.seconds:g} s at {args.file_rate} Hz -> {args.sample_rate} Hz, batches "
            f"of {args.batch_size}, model: {args.model}; {cores} core(s), torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op thread(s); files ready in {time.perf_counter() - t0:.1f} s"
        )
        for path in paths:
            path.read_bytes()  # into the page cache: every timed run reads from memory
        times: dict[tuple[str, int], list[float]] = {}
        with torch.no_grad():
            for _ in range(args.repeats):
                for w in args.workers:
                    for backend in ("threads", "processes"):
                        times.setdefault((backend, w), []).append(
                            read_all(paths, backend, w, args.batch_size, args.sample_rate, model)
                        )
    print(f"{'workers':>7}  {'threads (files/s)':>20}  {'DataLoader (files/s)':>22}  {'ratio':>5}")
    for w in args.workers:
        rate = {
            b: (len(paths) / min(times[b, w]), len(paths) / statistics.median(times[b, w]))
            for b in ("threads", "processes")
        }
        cells = [f"{rate[b][0]:8.1f} ({rate[b][1]:.1f})" for b in ("threads", "processes")]
        print(f"{w:>7}  {cells[0]:>20}  {cells[1]:>22}  {rate['processes'][0] / rate['threads'][0]:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
