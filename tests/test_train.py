"""Pretraining loop on a tiny corpus: steps, checkpoints, resume after kill -9, stage 2 freezing,
bad clips, caption embedding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import m2dclap
from m2dclap.data.capemb import load_caption_embeddings, save_caption_embeddings
from m2dclap.data.manifest import read_manifest, write_manifest
from m2dclap.data.synthetic import generate_corpus
from m2dclap.train import stage_config
from m2dclap.train.engine import latest_checkpoint
from m2dclap.train.pretrain import train

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(
    batch_size=8,
    epochs=50,
    warmup_epochs=1,
    lr=1e-3,
    crop_seconds=0.64,
    checkpoint_every=2,
    log_every=1,
    norm_stats_clips=16,
    tracker="none",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest = generate_corpus(root / "synthetic", n_clips=40, seed=3)
    rng = np.random.default_rng(0)
    emb = {r.id: rng.standard_normal((len(r.captions), 24)).astype(np.float16) for r in read_manifest(manifest)}
    save_caption_embeddings(emb, root / "capemb.npy")
    return manifest, root / "capemb.npy"


def stage1(corpus, out: Path, **kw):
    manifest, capemb = corpus
    return stage_config("1", **{**FAST, "captions": str(capemb), "output_dir": str(out), **kw})


def test_stage1_runs_saves_and_resumes(corpus, tmp_path, caplog):
    summary = train(stage1(corpus, tmp_path, max_steps=3), corpus[0])
    assert summary["steps"] == 3 and summary["skipped_clips"] == 0
    assert np.isfinite(summary["final_losses"]["m2d_loss"]) and np.isfinite(summary["final_losses"]["clap_loss"])
    model = m2dclap.load(tmp_path / "model")
    assert model.cfg.text.kind == "sentence" and model.text_proj.in_features == 24
    assert model.norm_stats[1] > 0 and model.norm_stats.tolist() != [-7.1, 4.2]  # computed from the data
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["step"] == 3
    with caplog.at_level("INFO", logger="m2dclap.train.engine"):
        resumed = train(stage1(corpus, tmp_path, max_steps=5), corpus[0], resume=True)
    assert resumed["steps"] == 5 and "at step 3" in caplog.text  # continued, not restarted
    assert json.loads((tmp_path / "train_config.json").read_text())["max_steps"] == 5


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "ckpt-00000004").mkdir(parents=True)
    (root / "ckpt-00000004" / "state.json").write_text(json.dumps({"step": 4}))
    (root / "ckpt-00000009").mkdir()  # killed before its marker was written
    (root / ".tmp-ckpt-00000010").mkdir()
    assert latest_checkpoint(tmp_path).name == "ckpt-00000004"


def _pretrain_cmd(out: Path, corpus) -> list[str]:
    manifest, capemb = corpus
    args = [
        sys.executable,
        str(ROOT / "scripts" / "pretrain.py"),
        "--stage",
        "1",
        "--data",
        str(manifest),
        "--captions",
        str(capemb),
        "--output-dir",
        str(out),
        "--max-steps",
        "10",
        "-v",
    ]
    for k, v in {**FAST, "checkpoint_every": 3}.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def _stage11_cmd(out: Path, corpus, init: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "m2dclap.train.finetune",
        "--init",
        str(init),
        "--data",
        str(corpus[0]),
        "--output-dir",
        str(out),
        "--input-size",
        "80x208",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--max-steps",
        "10",
        "--warmup-epochs",
        "0.5",
        "--checkpoint-every",
        "3",
        "--tracker",
        "none",
        "-v",
    ]


def _retrieval_cmd(out: Path, corpus, ckpt: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "retrieval.finetune",
        "--checkpoint",
        str(ckpt),
        "--train",
        str(corpus[0]),
        "--val",
        str(corpus[0]),
        "--output-dir",
        str(out),
        "--batch-size",
        "8",
        "--epochs",
        "3",
        "--lr",
        "5e-4",
        "--crop-seconds",
        "1.0",
        "--sample",
        "clips",
        "--checkpoint-every",
        "3",
        "--tracker",
        "none",
    ]


def _captioning_cmd(out: Path, index: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "captioning.train",
        "--dataset",
        index,
        "--bart",
        "tiny",
        "--output-dir",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--caption-sampling",
        "one",
        "--val-beams",
        "1",
        "--max-val",
        "2",
        "--top-k",
        "10",
        "--checkpoint-every",
        "3",
        "--grad-accum",
        "1",
        "--no-progress",
    ]


def _final_weights(task: str, out: Path) -> dict[str, torch.Tensor]:
    if task == "stage1.1":
        from m2dclap.tagging import load_finetuned

        model, tagger = load_finetuned(out / "model")
        return {**model.state_dict(), **{"head." + k: v for k, v in tagger.head.state_dict().items()}}
    if task == "captioning":
        from captioning.model import EnClapCaptioner

        last = json.loads((out / "run.json").read_text())["history"][-1]
        return EnClapCaptioner.from_pretrained(out / "checkpoints" / last["checkpoint"]).state_dict()
    return m2dclap.load(out / "model").state_dict()


@pytest.fixture(scope="module")
def task_setup(corpus, tmp_path_factory):
    """Builders of each task's command line (output folder -> argv), its checkpoint folder and batches per epoch."""
    root = tmp_path_factory.mktemp("tasks")

    def stage11():
        torch.manual_seed(0)
        init = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"})).save_pretrained(root / "init")
        return lambda out: _stage11_cmd(out, corpus, init), "checkpoints", 8

    def retrieval():
        torch.manual_seed(0)
        ckpt = m2dclap.create_model("tiny").save_pretrained(root / "clap")
        return lambda out: _retrieval_cmd(out, corpus, ckpt), "checkpoints", 4

    def captioning():
        pytest.importorskip("encodec", reason="the encodec package is not installed")
        from captioning import train as tr

        torch.manual_seed(0)
        clap = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"})).save_pretrained(root / "c")
        cache = root / "captioning"  # one in-process step makes the feature cache the runs share
        assert (
            tr.main(
                [
                    "--dataset",
                    str(corpus[0]),
                    "--clap-checkpoint",
                    str(clap),
                    "--codec",
                    "random",
                    "--bart",
                    "tiny",
                    "--output-dir",
                    str(cache),
                    "--epochs",
                    "1",
                    "--max-steps",
                    "1",
                    "--max-val",
                    "2",
                    "--val-beams",
                    "1",
                    "--no-progress",
                    "--caption-sampling",
                    "one",
                ]
            )
            == 0
        )
        index = json.loads((cache / "run.json").read_text())["index"]
        return lambda out: _captioning_cmd(out, index), "state", 4

    builders = {
        "pretraining": lambda: ((lambda out: _pretrain_cmd(out, corpus)), "checkpoints", 4),
        "stage1.1": stage11,
        "retrieval": retrieval,
        "captioning": captioning,
    }
    return lambda task: builders[task]()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretraining", "stage1.1", "retrieval", "captioning"])
def test_kill_9_then_resume_equals_uninterrupted(task, task_setup, tmp_path):
    """Every task on the engine: SIGKILL after a mid-epoch checkpoint, resume, same weights as a straight run."""
    cmd, ckpt_dir, per_epoch = task_setup(task)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    straight = subprocess.run(cmd(tmp_path / "a"), capture_output=True, text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(cmd(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while latest_checkpoint(tmp_path / "b", ckpt_dir) is None:
        assert proc.poll() is None, "run ended before it could be killed"
        if time.time() > deadline:  # a hang guard, not a speed requirement
            proc.kill()
            pytest.fail("the run wrote no checkpoint within 300 s")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads((latest_checkpoint(tmp_path / "b", ckpt_dir) / "state.json").read_text())
    assert 0 < killed["batch_in_epoch"] < per_epoch, killed  # the resume starts inside an epoch
    assert not (tmp_path / "b" / "model").exists()
    again = subprocess.run(cmd(tmp_path / "b") + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {killed['step']}" in again.stderr  # resumed from the checkpoint, not restarted
    a, b = _final_weights(task, tmp_path / "a"), _final_weights(task, tmp_path / "b")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-6, worst


def test_stage2_freezes_the_audio_encoder(corpus, tmp_path, minilm):
    train(stage1(corpus, tmp_path / "s1", max_steps=1), corpus[0])
    s1 = m2dclap.load(tmp_path / "s1" / "model")
    cfg = stage_config(
        "2",
        **{
            **FAST,
            "init": str(tmp_path / "s1" / "model"),
            "output_dir": str(tmp_path / "s2"),
            "max_steps": 2,
            "text_model": minilm,
            "crop_seconds": 1.5,
        },
    )
    summary = train(cfg, corpus[0])
    assert summary["steps"] == 2
    s2 = m2dclap.load(tmp_path / "s2" / "model")
    assert s2.cfg.text.kind == "hf" and s2.cfg.encoder.input_size == (80, 150)
    for k, v in s1.encoder.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, s2.encoder.state_dict()[k]), k
    # The grid the frozen encoder was trained on (5 x 8 patches) keeps its positions; new columns extend it.
    grid1 = s1.encoder.pos_embed[0, 1:].reshape(5, 8, -1)
    grid2 = s2.encoder.pos_embed[0, 1:].reshape(5, -1, grid1.shape[-1])
    assert grid2.shape[1] > 8 and torch.allclose(grid2[:, :8], grid1, atol=1e-6)
    assert not torch.equal(s1.audio_proj.sem_token, s2.audio_proj.sem_token)
    assert s2.encode_text(["a beep"]).shape == (1, 64)


def test_bad_clip_skip_and_fail(corpus, tmp_path):
    manifest, capemb = corpus
    records = read_manifest(manifest)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEjunk")
    victim = next(r for r in records if r.split == "train")
    victim.audio = broken
    write_manifest(records, tmp_path / "bad.csv")
    summary = train(stage1(corpus, tmp_path / "skip", max_steps=5), tmp_path / "bad.csv")
    assert summary["skipped_clips"] >= 1 and summary["skipped_files"] == [str(broken)]
    with pytest.raises(m2dclap.AudioError, match="broken.wav"):
        train(stage1(corpus, tmp_path / "fail", max_steps=5, on_bad_audio="fail"), tmp_path / "bad.csv")


def test_embed_captions_official_form_and_resume(corpus, tmp_path, minilm):
    from m2dclap.embed import embed_captions

    manifest = corpus[0]
    out = embed_captions(manifest, tmp_path / "cap.npy", minilm, batch_size=16, progress=False)
    emb = load_caption_embeddings(out)
    records = read_manifest(manifest)
    assert set(emb) == {r.id for r in records}
    first = records[0]
    assert emb[first.id].dtype == np.float16 and emb[first.id].shape == (len(first.captions), 384)
    model = m2dclap.M2DCLAP(
        m2dclap.get_model_config("tiny", **{"text.kind": "sentence", "text.name": minilm, "text.width": 384})
    )
    direct = model.text_encoder(first.captions[:1]).numpy()
    assert np.allclose(emb[first.id][0].astype(np.float32), direct[0], atol=2e-3)


def test_unknown_stage_and_missing_captions(corpus, tmp_path):
    with pytest.raises(KeyError, match=r"unknown stage '1\.1'"):
        stage_config("1.1")
    with pytest.raises(ValueError, match="--captions"):
        train(stage_config("1", **{**FAST, "output_dir": str(tmp_path)}), corpus[0])


def test_split_records_never_trains_on_other_splits():
    from m2dclap.data.manifest import Record, split_records

    rows = [Record("a", "a.wav", split="val"), Record("b", "b.wav", split="test"), Record("c", "c.wav")]
    train_rows, val_rows = split_records(rows)
    assert [r.id for r in train_rows] == ["c"] and [r.id for r in val_rows] == ["a"]
    train_rows, _ = split_records(rows + [Record("d", "d.wav", split="train")])
    assert [r.id for r in train_rows] == ["d"]


def test_cli_exits_1_and_names_a_skipped_clip(corpus, tmp_path, capsys):
    pretrain = _pretrain_script()
    records = read_manifest(corpus[0])
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEjunk")
    next(r for r in records if r.split == "train").audio = broken
    write_manifest(records, tmp_path / "bad.csv")
    args = [
        "--stage",
        "1",
        "--data",
        str(tmp_path / "bad.csv"),
        "--captions",
        str(corpus[1]),
        "--output-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "4",
    ]
    for k, v in FAST.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    assert pretrain.main(args) == 1
    assert "broken.wav" in capsys.readouterr().err


def _pretrain_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    import pretrain

    return pretrain


def test_default_run_refuses_stage_only_options(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import pretrain

    assert pretrain.main(["--data", "m.csv", "--init", "x"]) == 2
    assert "--data, --init need --stage" in capsys.readouterr().err
