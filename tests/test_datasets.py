"""AudioCaptionDataset and collate on a tiny synthetic corpus: crops, padding, captions, embeddings, bad clips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from m2dclap.audio import AudioError, LogMelSpectrogram, load_audio
from m2dclap.config import FrontendCfg
from m2dclap.data import AudioCaptionDataset, collate, generate_corpus, read_manifest

CFG = FrontendCfg()
CROP = 100  # 1.0 s; every clip (1.5-3.0 s) is longer


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return read_manifest(generate_corpus(tmp_path_factory.mktemp("synth"), n_clips=40, seed=1))


def _reference_lms(path):
    return LogMelSpectrogram(CFG)(load_audio(path, CFG.sample_rate))  # (n_mels, T)


def test_item_contents_and_eval_crop(records):
    ds = AudioCaptionDataset(records[:4], CFG, CROP, training=False)
    item = ds[2]
    assert set(item) == {"lms", "caption", "index", "id"}
    assert item["lms"].shape == (1, CFG.n_mels, CROP) and item["lms"].dtype == torch.float32
    assert item["index"] == 2 and item["id"] == records[2].id and item["caption"] == records[2].captions[0]
    # un-normalised log-mel, the first CROP frames when not training
    torch.testing.assert_close(item["lms"][0], _reference_lms(records[2].audio)[:, :CROP])
    assert torch.equal(ds[2]["lms"], item["lms"])


def test_training_crops_are_random_but_reproducible(records):
    rec = records[:6]
    a = AudioCaptionDataset(rec, CFG, CROP, training=True, seed=7)
    b = AudioCaptionDataset(rec, CFG, CROP, training=True, seed=7)
    full = _reference_lms(rec[0].audio)
    starts = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        x, y = a[0], b[0]
        assert torch.equal(x["lms"], y["lms"]) and x["caption"] == y["caption"]  # same (seed, epoch, index)
        assert x["caption"] in rec[0].captions
        # the crop is a window of the full spectrogram; find where it starts
        windows = full.unfold(1, CROP, 1)  # (n_mels, T - CROP + 1, CROP)
        err = (windows - x["lms"][0].unsqueeze(1)).abs().amax(dim=(0, 2))  # (T - CROP + 1,)
        assert err.min() < 1e-4
        starts.add(int(err.argmin()))
    assert len(starts) > 1  # epochs see different crops
    captions = set()
    for epoch in range(12):
        a.set_epoch(epoch)
        captions.add(a[1]["caption"])
    assert len(captions) > 1  # and different captions
    c = AudioCaptionDataset(rec, CFG, CROP, training=True, seed=8)
    assert any(not torch.equal(c[i]["lms"], a[i]["lms"]) for i in range(len(rec)))  # the seed matters


def test_short_clip_is_zero_padded_in_log_domain(records, tmp_path):
    ds = AudioCaptionDataset(records[:1], CFG, crop_frames=400, training=True)
    full = _reference_lms(records[0].audio)
    lms = ds[0]["lms"][0]
    n = full.shape[1]
    assert n < 400
    torch.testing.assert_close(lms[:, :n], full)
    assert torch.count_nonzero(lms[:, n:]) == 0  # zeros in the raw log domain (the official padding)


def test_precomputed_lms_npy(records, tmp_path):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((1, CFG.n_mels, 150)) - 7).astype(np.float32)  # official shape [1, n_mels, T]
    np.save(tmp_path / "clip.npy", arr)
    rec = dataclasses.replace(records[0], id="npy", audio=tmp_path / "clip.npy")
    item = AudioCaptionDataset([rec], CFG, CROP, training=False)[0]
    np.testing.assert_array_equal(item["lms"].numpy(), arr[:, :, :CROP])
    np.save(tmp_path / "wrong.npy", arr[:, :40])
    bad = dataclasses.replace(rec, audio=tmp_path / "wrong.npy")
    with pytest.raises(AudioError, match=r"wrong.npy: expected a float log-mel of shape \[1, 80, T\]"):
        AudioCaptionDataset([bad], CFG, CROP, on_bad_audio="fail")[0]
    assert AudioCaptionDataset([bad], CFG, CROP)[0] == {"bad": str(tmp_path / "wrong.npy"), "index": 0}


def test_bad_audio_skip_and_fail(records, tmp_path, caplog):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    bad = [
        dataclasses.replace(records[0], id="corrupt", audio=corrupt),
        dataclasses.replace(records[0], id="missing", audio=tmp_path / "missing.wav"),
    ]
    good = records[:3]
    ds = AudioCaptionDataset([good[0], bad[0], good[1], bad[1], good[2]], CFG, CROP)
    with caplog.at_level("WARNING"):
        items = [ds[i] for i in range(len(ds))]
    assert items[1] == {"bad": str(corrupt), "index": 1} and items[3]["bad"] == str(tmp_path / "missing.wav")
    assert "corrupt.wav" in caplog.text and "missing.wav" in caplog.text

    batch = collate(items)
    assert batch["size"] == 3 and batch["lms"].shape == (3, 1, CFG.n_mels, CROP)
    assert batch["index"].tolist() == [0, 2, 4] and batch["id"] == [r.id for r in good]
    assert batch["skipped"] == [str(corrupt), str(tmp_path / "missing.wav")]
    assert len(batch["caption"]) == 3

    empty = collate([items[1], items[3]])  # an all-bad batch: size 0, no lms, skipped listed
    assert empty["size"] == 0 and empty["lms"] is None and len(empty["skipped"]) == 2

    failing = AudioCaptionDataset(bad, CFG, CROP, on_bad_audio="fail")
    with pytest.raises(AudioError, match="corrupt.wav"):
        failing[0]
    with pytest.raises(AudioError, match="missing.wav"):
        failing[1]
    with pytest.raises(ValueError, match="on_bad_audio"):
        AudioCaptionDataset(bad, CFG, CROP, on_bad_audio="ignore")


def test_caption_embeddings(records):
    rec = records[:4]
    rng = np.random.default_rng(0)
    emb = {r.id: rng.standard_normal((5, 16)).astype(np.float16) for r in rec}
    emb[rec[0].id] = emb[rec[0].id][0]  # one [D] entry among [n, D] ones
    ds = AudioCaptionDataset(rec, CFG, CROP, training=True, caption_embeddings=emb, seed=3)
    item = ds[1]
    assert item["caption_emb"].dtype == torch.float32 and item["caption_emb"].shape == (16,)
    rows = {tuple(item["caption_emb"].tolist())}
    for epoch in range(1, 10):
        ds.set_epoch(epoch)
        e = ds[1]["caption_emb"]
        assert any(torch.equal(e, torch.from_numpy(row.astype(np.float32))) for row in emb[rec[1].id])
        rows.add(tuple(e.tolist()))
    assert len(rows) > 1  # one of the n captions' embeddings, drawn per access
    torch.testing.assert_close(ds[0]["caption_emb"], torch.from_numpy(emb[rec[0].id].astype(np.float32)))
    ev = AudioCaptionDataset(rec, CFG, CROP, training=False, caption_embeddings=emb)
    torch.testing.assert_close(ev[2]["caption_emb"], torch.from_numpy(emb[rec[2].id][0].astype(np.float32)))
    assert collate([ds[i] for i in range(4)])["caption_emb"].shape == (4, 16)

    partial = {k: v for k, v in emb.items() if k != rec[2].id}
    with pytest.raises(KeyError, match=rec[2].id):
        AudioCaptionDataset(rec, CFG, CROP, caption_embeddings=partial)
    del emb[rec[3].id]  # removed after construction: the item names the id
    with pytest.raises(KeyError, match=f"no caption embedding for clip id '{rec[3].id}'"):
        ds[3]


def test_mixed_caption_presence_is_an_error(records):
    no_caps = dataclasses.replace(records[1], captions=[])
    ds = AudioCaptionDataset([records[0], no_caps], CFG, CROP)
    assert "caption" not in ds[1]
    with pytest.raises(ValueError, match="some items have 'caption'"):
        collate([ds[0], ds[1]])
    assert "caption" not in collate([ds[1]])


def test_dataloader_workers_see_the_same_data(records):
    ds = AudioCaptionDataset(records[:8], CFG, CROP, training=True, seed=5)
    ds.set_epoch(3)
    kw = dict(batch_size=4, shuffle=False, collate_fn=collate)
    serial = list(DataLoader(ds, num_workers=0, **kw))
    parallel = list(DataLoader(ds, num_workers=2, **kw))
    assert len(serial) == len(parallel) == 2
    for s, p in zip(serial, parallel):
        assert s["caption"] == p["caption"] and s["skipped"] == p["skipped"] == []
        # Same crops in the same order; the values only to float tolerance: a worker computes with one
        # thread, the main process with two, and the frontend's matmul promises no bit-equality across
        # thread counts (a different crop is off by whole units of log-mel).
        torch.testing.assert_close(s["lms"], p["lms"], atol=1e-5, rtol=0)
