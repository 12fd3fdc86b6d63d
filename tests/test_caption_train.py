"""Captioning training, CLIs and helpers: a tiny end-to-end run (train -> checkpoint -> caption -> evaluate),
resume, top-k retention, the data pipeline and the most-frequent-caption baseline."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("encodec", reason="the encodec package is not installed")

import m2dclap
from captioning import caption as cap_cli
from captioning import evaluate as eval_cli
from captioning import features
from captioning import train as tr
from captioning.data import (
    CachedClip,
    CaptionDataset,
    build_word_tokenizer,
    collate,
    most_frequent_caption,
    normalize_caption,
)
from m2dclap.data.synthetic import generate_corpus

from conftest import accelerate_launch, needs_launcher  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny training run on 24 clips: 3 epochs of 3 steps, stopped at step 7, keeping the top 2."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("captrain")
    torch.manual_seed(0)
    clap = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    m2dclap.save_pretrained(clap, root / "clap")
    manifest = generate_corpus(root / "corpus", n_clips=24, seed=3)
    out = root / "run"
    argv = [
        "--dataset",
        str(manifest),
        "--clap-checkpoint",
        str(root / "clap"),
        "--codec",
        "random",
        "--output-dir",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--max-steps",
        "7",
        "--top-k",
        "2",
        "--val-beams",
        "1",
        "--no-progress",
        "--lr",
        "1e-3",
        "--bart",
        "tiny",
        "--caption-sampling",
        "one",
    ]
    assert tr.main(argv) == 0
    first = json.loads((out / tr.RUN_META).read_text())
    return {"root": root, "out": out, "manifest": manifest, "argv": argv, "first": first}


def test_train_writes_checkpoints_metadata_and_keeps_top_k(run):
    meta = run["first"]
    assert meta["selection_metric"] == "cider_d" and "SPICE" in meta["selection_note"]
    assert meta["features_codec"] == "random" and meta["features_clap"] == "m2d-clap"
    hist = meta["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and [h["step"] for h in hist] == [3, 6, 7]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["cider_d"] for h in hist)
    kept = sorted(d.name for d in (run["out"] / "checkpoints").iterdir())
    ranked = sorted(hist, key=lambda h: (-h["cider_d"], h["epoch"]))[:2]
    assert kept == sorted(h["checkpoint"] for h in ranked)
    assert [t["checkpoint"] for t in meta["top_checkpoints"]] == [h["checkpoint"] for h in ranked]
    ck = run["out"] / "checkpoints" / kept[0]
    info = json.loads((ck / tr.CKPT_META).read_text())
    assert info["codec"] == "random" and info["clap"] == "m2d-clap" and Path(info["clap_checkpoint"]).exists()


def test_caption_cli_prints_one_caption_per_file(run, capsys):
    audio = sorted((run["manifest"].parent / "audio").glob("*.wav"))[:2]
    assert (
        cap_cli.main(
            [str(a) for a in audio] + ["--checkpoint", str(run["out"]), "--num-beams", "1", "--max-length", "8"]
        )
        == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2 and [line.split("\t")[0] for line in lines] == [str(a) for a in audio]
    # the on-the-fly codec tokens equal the cached ones
    c = cap_cli.Captioner(run["out"])
    from captioning.data import read_index

    clip = next(x for x in read_index(run["first"]["index"]) if x.id == audio[0].stem)
    cached_tok = torch.from_numpy(np.load(clip.tokens).astype(np.int64))
    from m2dclap import load_audio

    wave = load_audio(audio[0], sample_rate=24000)
    from captioning.codec import encode_tokens

    assert torch.equal(encode_tokens(c.codec, wave, 24000), cached_tok)


def test_evaluate_run_gives_mean_and_interval_and_json(run, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert (
        eval_cli.main(
            [
                "--checkpoint",
                str(run["out"]),
                "--split",
                "test",
                "--out",
                str(out),
                "--save-predictions",
                str(tmp_path / "preds"),
                "--no-java",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["unavailable"]["meteor"] == "--no-java"
    assert len(res["checkpoints"]) == 2 and "cider_d" in res["summary"] and "bleu_4" in res["metrics"]
    vals = [s["cider_d"] for s in res["checkpoints"].values()]
    assert res["summary"]["cider_d"]["mean"] == pytest.approx(sum(vals) / 2)
    assert "mean ± 95% CI" in capsys.readouterr().out
    # predictions/references CSV path agrees with the checkpoint path
    pred_csv = next((tmp_path / "preds").glob("*.csv"))
    refs = tmp_path / "refs.csv"
    from captioning.data import read_index

    clips = {c.id: c for c in read_index(run["first"]["index"], "test")}
    with open(refs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for cid, c in clips.items():
            w.writerow([cid] + c.captions)
    assert (
        eval_cli.main(
            ["--predictions", str(pred_csv), "--references", str(refs), "--out", str(tmp_path / "p.json"), "--no-java"]
        )
        == 0
    )
    again = json.loads((tmp_path / "p.json").read_text())
    name = pred_csv.name.split("-")[0]
    assert next(iter(again["checkpoints"].values()))["cider_d"] == pytest.approx(res["checkpoints"][name]["cider_d"])


def test_resume_continues_from_saved_state(run):
    argv = [a for a in run["argv"]]
    argv[argv.index("--epochs") + 1] = "4"
    argv[argv.index("--max-steps") + 1] = "9"
    assert tr.main(argv + ["--resume"]) == 0
    meta = json.loads((run["out"] / tr.RUN_META).read_text())
    hist = meta["history"]
    # the run stopped after the first step of epoch 3 (validated as a partial epoch 3); the resumed run
    # finishes epoch 3 from the batch it stopped at (two more steps) and validates it again
    assert [h["epoch"] for h in hist] == [1, 2, 3, 3] and [h["step"] for h in hist] == [3, 6, 7, 9]
    assert hist[2]["partial_epoch"] and "partial_epoch" not in hist[3]
    assert hist[:3] == run["first"]["history"]  # earlier epochs untouched, not retrained
    assert len(list((run["out"] / "checkpoints").iterdir())) == 2


def test_inverse_sqrt_schedule_and_no_decay_groups():
    assert tr.inverse_sqrt_lr(0, 1.0, 10) == 0.0
    assert tr.inverse_sqrt_lr(5, 1.0, 10) == pytest.approx(0.5)
    assert tr.inverse_sqrt_lr(10, 1.0, 10) == pytest.approx(1.0)
    assert tr.inverse_sqrt_lr(40, 1.0, 10) == pytest.approx(0.5)  # 1/sqrt(40/10)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    decay, no = tr.param_groups(m, 0.01)
    assert decay["weight_decay"] == 0.01 and no["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[2].weight)}
    assert len(no["params"]) == 4  # two biases, LayerNorm weight and bias


def test_most_frequent_caption_and_baseline_score():
    clips = [
        CachedClip(str(i), "train", Path("t"), Path("c"), caps)
        for i, caps in enumerate(
            [["A dog barks.", "a cat meows"], ["a dog barks", "rain falls"], ["Rain falls", "a DOG barks!"]]
        )
    ]
    assert most_frequent_caption(clips) == "a dog barks"
    assert normalize_caption("A  DOG, barks!") == "a dog barks"
    from captioning.validation import score_fast

    refs = {
        "x": ["a dog barks loudly", "a dog is barking"],
        "y": ["rain falls on a roof", "heavy rain"],
        "z": ["a dog barks", "dog barking"],
    }
    const = score_fast({k: "a dog barks" for k in refs}, refs)["cider_d"]
    exact = score_fast({"x": "a dog barks loudly", "y": "rain falls on a roof", "z": "a dog barks"}, refs)["cider_d"]
    assert 0 <= const < exact


def test_dataset_crop_caption_draw_and_collate(tmp_path):
    clips = []
    for i, T in enumerate((50, 20)):
        np.save(tmp_path / f"t{i}.npy", np.random.default_rng(i).integers(0, 1024, (16, T)).astype(np.int16))
        np.save(tmp_path / f"c{i}.npy", np.ones(8, np.float32) * i)
        clips.append(
            CachedClip(
                str(i), "train", tmp_path / f"t{i}.npy", tmp_path / f"c{i}.npy", [f"cap {i} {j}" for j in range(5)]
            )
        )
    ds = CaptionDataset(clips, training=True, max_frames=30, seed=0, captions="one")
    by_epoch = {}
    for e in range(8):
        ds.set_epoch(e)
        it = ds[0]
        assert it["tokens"].shape == (16, 30)
        by_epoch[e] = it["caption"]
    assert len(set(by_epoch.values())) > 1  # a different caption draw per epoch
    ds.set_epoch(7)
    ds[0]
    ds.set_epoch(3)
    assert ds[0]["caption"] == by_epoch[3]  # the draw depends on the epoch only
    full = np.load(tmp_path / "t0.npy")
    ev = CaptionDataset(clips, training=False, max_frames=30)
    assert torch.equal(ev[0]["tokens"], torch.from_numpy(full[:, :30].astype(np.int64)))  # truncate from start
    b = collate([ev[0], ev[1]])
    assert b["tokens"].shape == (2, 16, 30) and (b["tokens"][1, :, 20:] == 1024).all()
    assert b["token_mask"].sum(1).tolist() == [30, 20] and b["clap"].shape == (2, 8)
    tok = build_word_tokenizer(["A dog barks.", "rain falls"])
    ids = tok(["a dog barks"])["input_ids"][0]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids


def _fake_clotho(root: Path, n: dict[str, int]) -> Path:
    """A Clotho v2.1 layout (captions CSVs + one audio folder per split) with 1-s generated clips."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    words = ["a dog barks", "rain falls", "a bell rings", "a car passes"]
    for split, count in n.items():
        (root / split).mkdir(parents=True)
        with open(root / f"clotho_captions_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
            for i in range(count):
                name = f"{split}_{i}.wav"
                sf.write(root / split / name, (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
                w.writerow([name] + [f"{words[i % 4]} {j}" for j in range(5)])
    return root


def test_dataset_presets_fill_only_unset_flags():
    args = tr.build_parser().parse_args(["--dataset", "clotho", "--data-root", "x"])
    tr.apply_presets(args)
    assert (args.lr, args.warmup, args.batch_size, args.bart) == (4e-6, 1000, 64, "facebook/bart-base")
    assert args.caption_sampling == "all"
    args = tr.build_parser().parse_args(["--dataset", "audiocaps", "--lr", "1e-5", "--bart", "tiny"])
    tr.apply_presets(args)
    assert (args.lr, args.warmup, args.batch_size, args.bart) == (1e-5, 2000, 16, "tiny")
    args = tr.build_parser().parse_args([])
    tr.apply_presets(args)
    assert (args.lr, args.warmup, args.batch_size, args.bart) == (None, None, 16, "tiny")
    assert args.caption_sampling == "one"


def test_named_dataset_needs_root_and_audio(tmp_path):
    with pytest.raises(ValueError, match="--data-root"):
        features.read_named_dataset("clotho", None)
    root = _fake_clotho(tmp_path / "clotho", {"development": 2, "validation": 1, "evaluation": 1})
    recs = features.read_named_dataset("clotho", str(root))
    assert [r.split for r in recs] == ["train", "train", "val", "test"] and len(recs[0].captions) == 5
    for wav in (root / "validation").glob("*.wav"):
        wav.unlink()
    with pytest.raises(FileNotFoundError, match="validation.*none of the 1 listed clips"):
        features.read_named_dataset("clotho", str(root))


def test_train_on_clotho_layout(run, tmp_path):
    root = _fake_clotho(tmp_path / "clotho", {"development": 6, "validation": 2, "evaluation": 2})
    out = tmp_path / "run"
    assert (
        tr.main(
            [
                "--dataset",
                "clotho",
                "--data-root",
                str(root),
                "--bart",
                "tiny",
                "--clap-checkpoint",
                str(run["root"] / "clap"),
                "--codec",
                "random",
                "--output-dir",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "3",
                "--val-beams",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((out / tr.RUN_META).read_text())
    assert meta["dataset"] == ["clotho"] and meta["lr"] == 4e-6 and meta["warmup"] == 1000
    # every (clip, caption) pair once per epoch, as EnCLAP: 6 clips x 5 captions, batch 3
    assert (meta["n_train"], meta["n_train_clips"], meta["n_val"], meta["steps_done"]) == (30, 6, 2, 10)
    assert meta["caption_sampling"] == "all"


def test_selection_metric_falls_back_to_cider_without_spice(monkeypatch):
    from captioning import metrics as M

    monkeypatch.setattr(M, "available_metrics", lambda fense=True: (["bleu", "cider_d"], {"spider": "no jars"}, None))
    metric, note = tr.choose_selection_metric("auto")
    assert metric == "cider_d" and "no jars" in note and "SPIDEr" in note
    with pytest.raises(M.MetricUnavailableError, match="no jars"):
        tr.choose_selection_metric("spider")
    monkeypatch.setattr(M, "available_metrics", lambda fense=True: (["cider_d", "spice", "spider"], {}, None))
    assert tr.choose_selection_metric("auto")[0] == "spider"
    assert tr.choose_selection_metric("cider_d")[0] == "cider_d"


@pytest.mark.slow
@needs_launcher
def test_train_under_accelerate_launch_with_two_processes(run, tmp_path):
    """Two CPU processes on the run's feature cache: the batch is the global batch (split_batches), the main
    process alone validates and writes checkpoints."""
    out = tmp_path / "ddp"
    index = run["first"]["index"]
    n_train = run["first"]["n_train"]
    cmd = accelerate_launch(
        "-m",
        "captioning.train",
        "--dataset",
        index,
        "--bart",
        "tiny",
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--val-beams",
        "1",
        "--no-progress",
        "--lr",
        "1e-3",
        "--caption-sampling",
        "one",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / tr.RUN_META).read_text())
    assert meta["steps_done"] == -(-n_train // 8) and len(meta["history"]) == 1
    assert proc.stderr.count("epoch 1: step") == 1  # logged by the main process only
    assert [d.name for d in (out / "checkpoints").iterdir()] == ["epoch_001"]


def test_evaluate_on_clotho_layout(run, tmp_path):
    root = _fake_clotho(tmp_path / "clotho", {"evaluation": 3})
    ck = next((run["out"] / "checkpoints").iterdir())
    out = tmp_path / "res.json"
    assert (
        eval_cli.main(
            [
                "--checkpoint",
                str(ck),
                "--dataset",
                "clotho",
                "--data-root",
                str(root),
                "--split",
                "evaluation",
                "--out",
                str(out),
                "--no-java",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n_clips"] == 3 and "cider_d" in res["checkpoints"][ck.name]
    assert eval_cli.main(["--checkpoint", str(ck), "--dataset", "clotho", "--split", "test", "--no-java"]) == 2


def test_every_caption_once_per_epoch(tmp_path):
    clips = []
    for i, (T, n) in enumerate(((50, 3), (20, 2))):
        np.save(tmp_path / f"t{i}.npy", np.random.default_rng(i).integers(0, 1024, (16, T)).astype(np.int16))
        np.save(tmp_path / f"c{i}.npy", np.ones(8, np.float32))
        clips.append(
            CachedClip(
                str(i), "train", tmp_path / f"t{i}.npy", tmp_path / f"c{i}.npy", [f"cap {i} {j}" for j in range(n)]
            )
        )
    ds = CaptionDataset(clips, training=True, max_frames=30, seed=0)
    assert len(ds) == 5
    starts = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        items = [ds[i] for i in range(len(ds))]
        assert sorted(it["caption"] for it in items) == sorted(c for clip in clips for c in clip.captions)
        starts.add(tuple(it["tokens"][0, 0].item() for it in items[:3]))
    assert len(starts) > 1  # the long clip's crop changes with the epoch
    with pytest.raises(ValueError, match="captions must be one of"):
        CaptionDataset(clips, training=True, captions="some")


def test_bf16_training_steps_on_cpu(run, tmp_path):
    from accelerate.state import AcceleratorState

    out = tmp_path / "bf16"
    AcceleratorState._reset_state()  # the earlier in-process runs fixed the precision of accelerate's singleton
    try:
        assert (
            tr.main(
                [
                    "--dataset",
                    run["first"]["index"],
                    "--bart",
                    "tiny",
                    "--output-dir",
                    str(out),
                    "--epochs",
                    "1",
                    "--max-steps",
                    "2",
                    "--batch-size",
                    "4",
                    "--val-beams",
                    "1",
                    "--max-val",
                    "4",
                    "--no-progress",
                    "--mixed-precision",
                    "bf16",
                    "--caption-sampling",
                    "one",
                ]
            )
            == 0
        )
    finally:
        AcceleratorState._reset_state()
    meta = json.loads((out / tr.RUN_META).read_text())
    assert meta["mixed_precision"] == "bf16" and meta["steps_done"] == 2
    assert np.isfinite(meta["history"][0]["train_loss"])


def test_caption_cli_skips_bad_files_and_writes_csv(run, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    for a in sorted((run["manifest"].parent / "audio").glob("*.wav"))[:2]:
        shutil.copy(a, folder / a.name)
    (folder / "broken.wav").write_bytes(b"RIFF but not audio")
    out = tmp_path / "preds.csv"
    rc = cap_cli.main(
        [str(folder), "--checkpoint", str(run["out"]), "--num-beams", "1", "--max-length", "8", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert rc == 1 and "skipped" in captured.err and "broken.wav" in captured.err
    assert len([line for line in captured.out.splitlines() if line.strip()]) == 2
    from captioning.metrics import read_predictions_csv

    assert sorted(read_predictions_csv(out)) == sorted(p.name for p in folder.glob("*.wav") if p.name != "broken.wav")
