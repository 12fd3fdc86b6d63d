"""Retrieval tools end to end on a tiny saved model and a small embedded corpus: evaluation (figures equal a
direct computation, cache, missing clips, DCASE 2025 relevance), submission (written, validated, rejected
when broken) and fine-tuning (improves a weak start, resumes, keeps the best model)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import m2dclap
import m2dclap.metrics as shared
from m2dclap.clap import ContrastiveLoss
from m2dclap.data.manifest import Record, read_manifest, write_manifest
from m2dclap.data.synthetic import generate_corpus
from retrieval import evaluate, finetune, submit
from retrieval.cache import EmbeddingCache

from conftest import accelerate_launch, needs_launcher

N_TRAIN, N_VAL = 48, 24  # of 100 clips; the other 28 are the test split


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm):
    root = tmp_path_factory.mktemp("retrieval")
    records = read_manifest(generate_corpus(root / "corpus", n_clips=100, seed=1))
    for i, r in enumerate(records):
        r.split = "train" if i < N_TRAIN else "val" if i < N_TRAIN + N_VAL else "test"
    manifest = write_manifest(records, root / "corpus" / "split.csv")
    torch.manual_seed(0)
    model = m2dclap.create_model("tiny").eval()  # random audio side: a deliberately weak start
    ckpt = model.save_pretrained(root / "tiny")
    return {"root": root, "manifest": manifest, "records": records, "model": model, "ckpt": ckpt}


def direct_figures(model, records):
    """Reference: embed with the public API, score with m2dclap.metrics (the CLAP convention)."""
    audio = model.encode_audio([m2dclap.load_audio(r.audio, model.sample_rate) for r in records], model.sample_rate)
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    text = model.encode_text([c for r in records for c in r.captions])
    a, t = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    return shared.text_to_audio(t, a, owner), shared.audio_to_text(a, t, owner)


def test_evaluate_equals_direct_computation_and_caches(setup, tmp_path, capsys):
    test = [r for r in setup["records"] if r.split == "test"]
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    args = [
        "--checkpoint",
        str(setup["ckpt"]),
        "--dataset",
        "manifest",
        "--root",
        str(setup["manifest"]),
        "--split",
        "test",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    assert evaluate.main(args) == 0
    table = capsys.readouterr().out
    assert "text->audio" in table and "audio->text" in table and "chance" in table
    result = json.loads(out.read_text())
    assert result["n_clips"] == len(test) == 28 and result["n_captions"] == 5 * 28
    assert result["protocol"]["name"] == "clap" and "best-ranked" in result["protocol"]["description"]
    t2a, a2t = direct_figures(setup["model"], test)
    for k in ("R@1", "R@5", "R@10", "mAP@10"):
        assert result["text_to_audio"][k] == pytest.approx(t2a[k], abs=1e-6)
        assert result["audio_to_text"][k] == pytest.approx(a2t[k], abs=1e-6)
    assert result["embedding_cache"]["stored"] == 28 + 1  # one entry per clip, one for the caption list
    entries = list(cache.rglob("*"))
    assert len([p for p in entries if p.suffix == ".npy"]) == 29
    assert not [p for p in entries if p.name.endswith(".tmp")]  # atomic writes leave nothing behind
    # again (library call, same checkpoint fingerprint): everything from the cache, same figures
    cached = EmbeddingCache(cache, setup["ckpt"])
    again = evaluate.evaluate_records(setup["model"], test, cache=cached, progress=False)
    assert (cached.hits, cached.stored) == (29, 0) and again["text_to_audio"] == result["text_to_audio"]
    # a re-written file is embedded again
    st = os.stat(test[0].audio)
    os.utime(test[0].audio, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached = EmbeddingCache(cache, setup["ckpt"])
    evaluate.evaluate_records(setup["model"], test, cache=cached, progress=False)
    assert (cached.hits, cached.stored) == (28, 1)


def test_evaluate_missing_clips_strict_and_2025_relevance(setup, tmp_path, capsys):
    test = [r for r in setup["records"] if r.split == "test"][:12]
    gone = Record(id="gone", audio=tmp_path / "gone.wav", captions=["nothing"], split="test")
    manifest = write_manifest(test + [gone], tmp_path / "m.csv")
    names = [Path(r.audio).name for r in test]
    with open(tmp_path / "rel.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "audio_filenames"])
        w.writerow([test[0].captions[0], str([names[0], names[3]])])
        w.writerow([test[5].captions[1], str([names[5]])])
        w.writerow(["a sound nobody recorded", str([names[7], names[8], "unknown.wav"])])
    base = [
        "--checkpoint",
        str(setup["ckpt"]),
        "--dataset",
        "manifest",
        "--root",
        str(manifest),
        "--split",
        "test",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert evaluate.main(base + ["--out", str(tmp_path / "clap.json")]) == 1  # a clip was left out
    assert (
        evaluate.main(
            base
            + ["--out", str(tmp_path / "dcase.json"), "--protocol", "dcase", "--relevance", str(tmp_path / "rel.csv")]
        )
        == 1
    )
    clap, dcase = (json.loads((tmp_path / f"{p}.json").read_text()) for p in ("clap", "dcase"))
    assert clap["missing"] == {"count": 1, "paths": [str(tmp_path / "gone.wav")]}
    assert "left out: 1 missing" in capsys.readouterr().out
    for k in ("R@1", "R@5", "R@10", "mAP@10"):  # one relevant clip per caption: the conventions agree
        assert dcase["text_to_audio"][k] == pytest.approx(clap["text_to_audio"][k], abs=1e-7)
    assert dcase["audio_to_text"]["R@1"] <= 0.2 + 1e-6  # DCASE recall: 1 of 5 captions at best
    assert clap["audio_to_text"]["mAP@10"] == pytest.approx(dcase["audio_to_text"]["mAP@10"], abs=1e-7)
    rel = dcase["relevance"]
    assert rel["n_queries"] == 3 and rel["unmatched_filenames"] == {"count": 1, "names": ["unknown.wav"]}
    assert {"R@1", "R@10", "mAP@10", "mAP@16"} <= set(rel["text_to_audio"])
    assert rel["audio_to_text"]["n_queries"] == 5  # clips named by at least one query
    assert dcase["protocol"]["name"] == "dcase" and "mAP@K" in dcase["protocol"]["description"]
    assert evaluate.main(base + ["--out", str(tmp_path / "s.json"), "--strict"]) == 1
    assert "gone.wav" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(base + ["--relevance", str(tmp_path / "rel.csv")])  # needs --protocol dcase


def test_submit_writes_validates_and_rejects(setup, tmp_path, capsys):
    test = [r for r in setup["records"] if r.split == "test"][:12]
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    for r in test:
        shutil.copy(r.audio, audio_dir / Path(r.audio).name)
    captions = [test[0].captions[0], 'a "quoted", comma caption', test[4].captions[2], "silence"]
    with open(tmp_path / "retrieval_captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["caption"]] + [[c] for c in captions])
    out = tmp_path / "sub" / "Doe_Inst_task6_1.output.csv"
    args = [
        "--checkpoint",
        str(setup["ckpt"]),
        "--captions",
        str(tmp_path / "retrieval_captions.csv"),
        "--audio-dir",
        str(audio_dir),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert submit.main(args + ["--scores"]) == 0
    assert "valid submission: 4 captions x 12 audio files" in capsys.readouterr().out
    rows = list(csv.reader(open(out, newline="")))
    assert rows[0] == ["caption"] + [f"file_name_{i}" for i in range(1, 11)]
    assert [r[0] for r in rows[1:]] == captions and all(len(set(r[1:])) == 10 for r in rows[1:])
    model, names = setup["model"], sorted(Path(r.audio).name for r in test)
    audio = model.encode_audio([m2dclap.load_audio(audio_dir / n, model.sample_rate) for n in names], model.sample_rate)
    sim = F.normalize(model.encode_text(captions), dim=-1) @ F.normalize(audio, dim=-1).T
    assert [r[1] for r in rows[1:]] == [names[j] for j in sim.argmax(1).tolist()]
    scores = list(csv.reader(open(out.with_name("Doe_Inst_task6_1.scores.csv"), newline="")))
    assert scores[0] == ["caption"] + names and len(scores) == 5
    assert torch.allclose(torch.tensor([[float(v) for v in r[1:]] for r in scores[1:]]), sim, atol=1e-5)
    meta = yaml.safe_load(out.with_name("Doe_Inst_task6_1.meta.yaml").read_text())
    assert meta["submission"]["label"] == "Doe_Inst_task6_1" and meta["system"]["complexity"]["total_parameters"] > 0
    # a broken file is caught
    rows[2][3] = rows[2][4]
    with open(out, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    assert submit.main(args + ["--validate-only"]) == 1
    assert "repeated file names" in capsys.readouterr().err
    for n in names[5:]:
        (audio_dir / n).unlink()
    assert submit.main(args) == 1
    assert "a submission ranks 10" in capsys.readouterr().err


def test_training_items_group_duplicates_of_a_clip(setup, tmp_path):
    a, b = setup["records"][:2]
    twin = Record(id="twin", audio=a.audio, captions=["the same file listed by another dataset"])
    ds = finetune.CaptionedClips([a, b, twin], 16000, crop_seconds=1.0, sample="captions")
    assert len(ds) == len(a.captions) + len(b.captions) + 1
    items = [ds[i] for i in range(len(ds))]
    groups = [it["group"] for it in items]
    assert groups == [0] * len(a.captions) + [1] * len(b.captions) + [0]  # the twin is a positive of a
    assert all(it["wave"].shape[0] == 16000 for it in items)
    broken = Record(id="bad", audio=tmp_path / "bad.wav", captions=["x"])
    (tmp_path / "bad.wav").write_bytes(b"RIFF????")
    bad_ds = finetune.CaptionedClips([a, broken], 16000, 1.0, sample="clips")
    batch = finetune.collate([bad_ds[0], bad_ds[1]])
    assert len(batch["waves"]) == 1 and batch["skipped"] == [str(tmp_path / "bad.wav")]
    from m2dclap.train.engine import repeat_rows

    full = repeat_rows(batch, 3, len(batch["waves"]))  # the engine's bad-batch refill
    assert full["groups"].tolist() == [0, 0, 0] and len(full["captions"]) == 3  # repeats are positives
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["wave"], items[0]["wave"])  # a new epoch, a new random crop


def test_batch_loss_treats_duplicates_of_a_clip_as_positives(setup):
    a, b = setup["records"][:2]
    ds = finetune.CaptionedClips([a, b], 16000, crop_seconds=1.0, sample="captions")
    batch = finetune.collate([ds[0], ds[1], ds[len(a.captions)]])  # two captions of a, one of b
    assert batch["groups"].tolist() == [0, 0, 1]
    model, loss_fn = setup["model"], ContrastiveLoss()
    with torch.no_grad():
        got = finetune.batch_loss(model, batch, loss_fn, 16000)
        out = model(audio=batch["waves"], texts=batch["captions"])
        as_negatives = loss_fn(out["audio_features"], out["text_features"], out["logit_scale"])["contrastive_loss"]
        as_positives = loss_fn(
            out["audio_features"], out["text_features"], out["logit_scale"], positive_groups=torch.tensor([0, 0, 1])
        )["contrastive_loss"]
    assert got == pytest.approx(as_positives.item(), rel=1e-6)
    assert abs(as_positives.item() - as_negatives.item()) > 1e-4


def test_finetune_improves_a_weak_start_resumes_and_keeps_the_best(setup, tmp_path, capsys):
    out = tmp_path / "ft"
    args = [
        "--checkpoint",
        str(setup["ckpt"]),
        "--train",
        str(setup["manifest"]),
        "--val",
        str(setup["manifest"]),
        "--output-dir",
        str(out),
        "--batch-size",
        "16",
        "--lr",
        "5e-4",
        "--min-lr",
        "5e-4",
        "--warmup-epochs",
        "0",
        "--weight-decay",
        "0",
        "--crop-seconds",
        "1.0",
        "--sample",
        "clips",
        "--tracker",
        "none",
    ]
    assert finetune.main(args + ["--epochs", "1"]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["steps"] == N_TRAIN // 16 and [h["epoch"] for h in first["history"]] == [0, 1]
    assert finetune.main(args + ["--epochs", "2", "--resume"]) == 0  # continues at epoch 1, step 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * (N_TRAIN // 16) and [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert summary["history"][:2] == first["history"]
    start, best = summary["initial_score"], summary["best_score"]
    chance = shared.chance_text_to_audio(N_VAL)["mAP@10"]
    print(
        f"\nvalidation T2A mAP@10 ({N_VAL} clips, chance {100 * chance:.2f}): start {100 * start:.2f} -> "
        + " -> ".join(f"{100 * h['score']:.2f}" for h in summary["history"][1:])
        + f", best {100 * best:.2f}"
    )
    assert best > start + 0.04 and best > chance + 0.04
    assert summary["history"][-1]["train_loss"] < summary["history"][1]["train_loss"]
    # the kept model is the best one: evaluating it gives the recorded validation figure
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(out / "best"),
                "--dataset",
                "manifest",
                "--root",
                str(setup["manifest"]),
                "--split",
                "val",
                "--out",
                str(tmp_path / "best.json"),
                "--no-cache",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "best.json").read_text())["text_to_audio"]["mAP@10"] == pytest.approx(best, abs=1e-5)
    assert (out / "model" / "config.json").is_file()
    with capsys.disabled():
        print(f"fine-tuning figures: start {100 * start:.2f}, best {100 * best:.2f} at epoch {summary['best_epoch']}")


@pytest.mark.slow
@needs_launcher
def test_finetune_under_accelerate_launch_with_two_processes(setup, tmp_path):
    train = [dataclasses.replace(r, split="train") for r in setup["records"][:32]]
    val = [dataclasses.replace(r, split="val") for r in setup["records"][N_TRAIN : N_TRAIN + 11]]  # odd: uneven shards
    manifest = write_manifest(train + val, tmp_path / "m.csv")
    out = tmp_path / "ft"
    cmd = accelerate_launch(
        "-m",
        "retrieval.finetune",
        "--checkpoint",
        str(setup["ckpt"]),
        "--train",
        str(manifest),
        "--val",
        str(manifest),
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "5e-4",
        "--crop-seconds",
        "1.0",
        "--sample",
        "clips",
        "--tracker",
        "none",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["effective_batch"] == 16 and summary["steps"] == 32 // 16
    assert proc.stdout.count("validation T2A mAP@10: start") == 1  # reported by the main process only
    # validation sharded over the processes and gathered equals one process on the whole set
    alone = evaluate.evaluate_records(setup["model"], val, progress=False)["text_to_audio"]["mAP@10"]
    assert summary["initial_score"] == pytest.approx(alone, abs=1e-6)


def test_read_sets_never_trains_on_val_or_test_rows(tmp_path):
    from m2dclap.data.manifest import Record, write_manifest
    from retrieval.finetune import RetrievalFinetuneCfg, read_sets

    audio = tmp_path / "x.wav"
    audio.write_bytes(b"")
    rows = [
        Record("v", audio, captions=["a"], split="val"),
        Record("t", audio, captions=["b"], split="test"),
        Record("n", audio, captions=["c"]),
    ]
    manifest = write_manifest(rows, tmp_path / "m.csv")
    sets = read_sets(RetrievalFinetuneCfg(), str(manifest), {"manifest": "train"})
    assert [r.id for r in sets[0][1]] == ["n"]
