"""m2dclap.embed_files: the shared reader of audio-file lists (a DataLoader over ``load_clip``) and ``embed_files``.

Order, skipping and results are the same whether files are read in the calling process, in worker processes or
in threads; a transform (a closure) runs in the workers; workers run one intra-op thread.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import m2dclap
import m2dclap.embed_files as ef
from m2dclap.embed_files import AudioBatches, default_workers, embed_files, load_clip, min_samples_of

from conftest import tone

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
MIN = 201  # the tiny preset's shortest input at 16 kHz


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """Seven files, bad ones among good ones at 16 and 22.05 kHz: good, short, good, corrupt, good, empty, good."""
    root = tmp_path_factory.mktemp("embed_files")
    out = []
    for n, kind in enumerate(["good", "short", "good", "corrupt", "good", "empty", "good"]):
        p = root / f"{n}_{kind}.wav"
        if kind == "good":
            sr = 22050 if n % 4 else SR  # some resampled in the reader
            sf.write(p, tone(0.3 + 0.1 * n, sr, 200.0 * (n + 1), seed=n).numpy(), sr)
        elif kind == "short":
            sf.write(p, np.full(50, 0.1, np.float32), SR)
        elif kind == "empty":
            sf.write(p, np.zeros(0, np.float32), SR)
        else:
            p.write_bytes(b"RIFF\x00\x00\x00\x00not a wave file")
        out.append(p)
    return out


GOOD = [0, 2, 4, 6]


def read_all(batches: AudioBatches):
    seen = list(batches)
    return seen, [i for b in seen for i in b.indices], [w for b in seen for w in b.waves]


@pytest.mark.parametrize("backend,workers", [("processes", 0), ("processes", 2), ("threads", 2)])
def test_order_skips_and_waves_match_load_clip(files, backend, workers, caplog):
    batches = AudioBatches(files, SR, MIN, batch_size=2, workers=workers, backend=backend)
    with caplog.at_level(logging.WARNING, logger="m2dclap.embed_files"):
        seen, indices, waves = read_all(batches)
    assert [(b.indices, [i for i, _ in b.skipped]) for b in seen] == [([0], [1]), ([2], [3]), ([4], [5]), ([6], [])]
    assert indices == GOOD
    for i, w in zip(indices, waves):
        assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
        torch.testing.assert_close(w, load_clip(files[i], SR, MIN), rtol=0, atol=0)
    assert [Path(p).name for p, _ in batches.skipped] == ["1_short.wav", "3_corrupt.wav", "5_empty.wav"]
    for (path, reason), why in zip(batches.skipped, ["too short", "cannot decode", "zero samples"]):
        assert path in reason and why in reason
        assert reason in caplog.text  # logged by the calling process, also when a worker read the file
    assert list(batches)[0].indices == [0] and len(batches.skipped) == 3  # iterating again starts afresh


def test_reading_order_is_input_order_for_many_batches(tmp_path):
    """More batches than workers, files of very different lengths: slow batches never overtake fast ones."""
    paths = []
    for n in range(12):
        paths.append(tmp_path / f"{n:02d}.wav")
        sf.write(paths[-1], tone(0.05 + 0.4 * (n % 3 == 0), 44100, 100.0 + n, seed=n).numpy(), 44100)
    _, indices, waves = read_all(AudioBatches(paths, SR, MIN, batch_size=1, workers=2, backend="processes"))
    assert indices == list(range(12))
    assert [len(w) for w in waves] == [len(load_clip(p, SR, MIN)) for p in paths]


def reader_facts(i: int, wave: torch.Tensor) -> torch.Tensor:
    """Append the reading process's id and intra-op thread count to the wave (a transform)."""
    return torch.cat([wave, torch.tensor([float(os.getpid()), float(torch.get_num_threads())])])


def test_workers_are_processes_with_one_thread_and_run_a_closure_transform(files):
    marker = 7.0
    closure = lambda i, w: reader_facts(i, torch.nn.functional.pad(w, (0, 1), value=marker))  # noqa: E731
    _, indices, waves = read_all(
        AudioBatches(files, SR, MIN, batch_size=2, workers=2, transform=closure, backend="processes")
    )
    assert indices == GOOD
    assert {int(w[-2]) for w in waves} - {os.getpid()} == {int(w[-2]) for w in waves}  # read in other processes
    assert {int(w[-1]) for w in waves} == {1}
    assert all(w[-3] == marker for w in waves)
    _, _, waves = read_all(AudioBatches(files, SR, MIN, batch_size=2, workers=0, transform=closure))
    assert {int(w[-2]) for w in waves} == {os.getpid()}


def test_one_batch_is_read_in_the_calling_process(files):
    """Workers read whole batches ahead of the caller: with one batch there is nothing to read ahead."""
    _, indices, waves = read_all(
        AudioBatches(files, SR, MIN, batch_size=len(files), workers=2, transform=reader_facts, backend="processes")
    )
    assert indices == GOOD and {int(w[-2]) for w in waves} == {os.getpid()}


def test_unpicklable_transform_falls_back_to_threads_without_fork(files, monkeypatch):
    monkeypatch.setattr(ef, "_forks", lambda: False)  # as under spawn (macOS, Windows)
    closure = lambda i, w: reader_facts(i, w)  # noqa: E731
    assert not ef._picklable(closure) and ef._picklable(reader_facts)
    _, indices, waves = read_all(
        AudioBatches(files, SR, MIN, batch_size=2, workers=2, transform=closure, backend="processes")
    )
    assert indices == GOOD and {int(w[-2]) for w in waves} == {os.getpid()}  # threads of this process


def test_a_bug_in_the_transform_is_raised_not_skipped(files):
    def broken(i, w):
        raise RuntimeError("bug in a transform")

    with pytest.raises(RuntimeError, match="bug in a transform"):
        list(AudioBatches(files, SR, MIN, batch_size=2, workers=2, transform=broken, backend="processes"))


def test_default_workers_leave_a_core_to_the_model(monkeypatch):
    for cores, expected in [(1, 0), (2, 1), (3, 2), (8, 4), (64, 4)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_workers() == expected
    assert AudioBatches([], SR, workers=None).workers == default_workers()


def test_default_backend_is_processes_only_with_cores_to_spare(monkeypatch):
    for cores, expected in [(1, "threads"), (2, "threads"), (3, "processes"), (16, "processes")]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert ef.default_backend() == expected and AudioBatches([], SR).backend == expected


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="batch size"):
        AudioBatches([], SR, batch_size=0)
    with pytest.raises(ValueError, match="backend"):
        AudioBatches([], SR, backend="gpu")
    assert list(AudioBatches([], SR, workers=2)) == []


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"})).eval()


@pytest.mark.parametrize("workers", [0, 2])
def test_embed_files_rows_match_the_model_and_skipped_rows_are_nan(model, files, workers):
    seen = []
    emb, skipped = embed_files(
        model, files, batch_size=2, workers=workers, on_batch=lambda idx, e: seen.append((list(idx), e.clone()))
    )
    assert emb.shape == (len(files), model.cfg.encoder.embed_dim) and emb.dtype == torch.float32
    assert [i for i, _ in skipped] == [1, 3, 5] and all(files[i].name in r for i, r in skipped)
    assert torch.isnan(emb[[1, 3, 5]]).all() and torch.isfinite(emb[GOOD]).all()
    with torch.no_grad():
        expected = model.encode_audio(
            [load_clip(files[i], model.sample_rate, min_samples_of(model)) for i in GOOD], model.sample_rate
        )
    torch.testing.assert_close(emb[GOOD], expected, rtol=1e-4, atol=1e-5)
    assert [idx for idx, _ in seen] == [[0], [2], [4], [6]]
    torch.testing.assert_close(torch.cat([e for _, e in seen]), emb[GOOD])
    unit, _ = embed_files(model, files, batch_size=2, workers=workers, normalize=True)
    torch.testing.assert_close(unit[GOOD].norm(dim=-1), torch.ones(len(GOOD)))


def test_embed_files_of_no_usable_file(model, files):
    emb, skipped = embed_files(model, [files[1], files[3]])
    assert emb.shape == (2, model.cfg.encoder.embed_dim) and torch.isnan(emb).all() and len(skipped) == 2
    assert embed_files(model, [])[0].shape == (0, model.cfg.encoder.embed_dim)
