"""Bad inputs to the data side (issue 10, "never destroy what the user has" and CSV errors): every case checks
the exit status, that the message names the file, folder or line, and that what existed is byte-identical."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import m2dclap
from m2dclap.data.manifest import read_manifest
from m2dclap.data.synthetic import generate_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with its content hash (folders: "dir")."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def write_wav(path: Path, seconds: float = 1.0, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(int(seconds * sr)) * 0.05)).astype(np.float32), sr)
    return path


# ------------------------------------------------------------------------ the synthetic corpus never overwrites

def _foreign_manifest(folder: Path) -> str:
    write_wav(folder / "clips" / "mine.wav")
    (folder / "manifest.csv").write_text("audio,caption\nclips/mine.wav,my own recording\n")
    return "manifest.csv"


def _other_files(folder: Path) -> str:
    (folder / "notes.txt").write_text("field notes\n")
    write_wav(folder / "audio" / "take1.wav")
    return "notes.txt"


def _corpus_of_another_size(folder: Path) -> str:
    generate_corpus(folder, n_clips=6, seed=0)
    return "6 clips"


FOLDERS = {"foreign-manifest": _foreign_manifest, "other-files": _other_files, "another-size": _corpus_of_another_size}


@pytest.mark.parametrize("kind", FOLDERS)
def test_datasets_synthetic_refuses_a_folder_that_is_not_the_corpus(kind, tmp_path, capsys):
    from retrieval.datasets import main

    folder = tmp_path / "user"
    folder.mkdir()
    shown = FOLDERS[kind](folder)
    before = snapshot(folder)
    with pytest.raises(SystemExit) as info:
        main(["synthetic", "--root", str(folder), "--out", str(tmp_path / "out.csv")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(folder) in err and shown in err and "Traceback" not in err
    assert snapshot(folder) == before and not (tmp_path / "out.csv").exists()


@pytest.fixture(scope="module")
def retrieval_ckpt(tmp_path_factory, minilm):
    torch.manual_seed(0)
    return m2dclap.create_model("tiny").save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.parametrize("kind", FOLDERS)
def test_retrieval_finetune_refuses_a_synthetic_root_that_is_not_the_corpus(kind, retrieval_ckpt, tmp_path, capsys):
    from retrieval.finetune import main

    folder = tmp_path / "user"
    folder.mkdir()
    shown = FOLDERS[kind](folder)
    before = snapshot(folder)
    rc = main(["--checkpoint", str(retrieval_ckpt), "--synthetic-root", str(folder),
               "--output-dir", str(tmp_path / "run"), "--epochs", "1", "--tracker", "none"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(folder) in err and shown in err and "Traceback" not in err
    assert snapshot(folder) == before


def test_synthetic_cli_force_never_writes_into_a_foreign_folder(tmp_path, capsys):
    from m2dclap.data.synthetic import main

    _foreign_manifest(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path), "--n-clips", "3", "--force"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "manifest.csv" in err
    assert snapshot(tmp_path) == before


def test_interrupted_build_of_ours_is_resumed_and_an_empty_folder_built_into(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_manifest(generate_corpus(empty, n_clips=4, seed=0))[0].id == "syn_00000"
    (empty / ".complete").unlink()  # killed before the marker: corpus.json, written first, says it is ours
    (empty / "manifest.csv").unlink()
    (empty / "audio" / "syn_00003.wav").write_bytes(b"half")
    assert len(read_manifest(generate_corpus(empty, n_clips=4, seed=0))) == 4
    assert sf.info(str(empty / "audio" / "syn_00003.wav")).frames > 0


# ------------------------------------------------------------------------------------- stage 1.1 and saving

@pytest.fixture(scope="module")
def stage11(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    manifest = generate_corpus(root / "synthetic", n_clips=40, seed=2)
    torch.manual_seed(0)
    init = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"})).save_pretrained(root / "init")
    return manifest, init


def test_finetune_resume_of_a_finished_run_is_a_no_op(stage11, tmp_path, capsys, caplog):
    from m2dclap.train.finetune import main

    manifest, init = stage11
    args = ["--init", str(init), "--data", str(manifest), "--output-dir", str(tmp_path), "--input-size", "80x208",
            "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "--log-every", "1", "--tracker", "none"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["val_history"] and summary["final_losses"]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert "already finished at step 2" in caplog.text and str(tmp_path) in caplog.text
    assert json.loads(capsys.readouterr().out)["already_finished"] is True
    after = snapshot(tmp_path)
    assert after["summary.json"] == before["summary.json"]
    assert {k: v for k, v in after.items() if k.startswith(("model", "best"))} == \
        {k: v for k, v in before.items() if k.startswith(("model", "best"))}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_model_folders_respect_the_umask(mask, tmp_path):
    from m2dclap.fileio import atomic_write_text
    from m2dclap.train.finetune import AudioTagger, save_finetuned

    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    old = os.umask(mask)
    try:
        folder = model.save_pretrained(tmp_path / "model")
        tagged = save_finetuned(model, AudioTagger(model.encoder, 3), ["a", "b", "c"], tmp_path / "stage1.1")
        atomic_write_text(tmp_path / "note.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(folder) == mode(tagged) == 0o777 & ~mask
    for name in ("model.safetensors", "config.json"):
        assert mode(folder / name) == 0o666 & ~mask, name
    assert mode(tagged / "head.safetensors") == mode(tagged / "head.json") == 0o666 & ~mask
    assert mode(tmp_path / "note.json") == 0o666 & ~mask


# --------------------------------------------------------------------------------------------- CSV readers

def test_clotho_id_ending_in_a_space_survives_a_manifest_round_trip(tmp_path, capsys):
    from retrieval.datasets import main

    root = tmp_path / "clotho"
    write_wav(root / "evaluation" / "Heat duct .wav")
    write_wav(root / "evaluation" / "rain.wav")
    cols = ",".join(f"caption_{i}" for i in range(1, 6))
    (root / "clotho_captions_evaluation.csv").write_text(
        f"file_name,{cols}\nHeat duct .wav,{','.join(['air hums in a duct'] * 5)}\n"
        f"rain.wav,{','.join(['rain falls'] * 5)}\n")
    out = tmp_path / "clotho.csv"
    assert main(["clotho", "--root", str(root), "--out", str(out)]) == 0
    records = {r.id: r for r in read_manifest(out)}
    assert set(records) == {"Heat duct ", "rain"}
    assert records["Heat duct "].audio.is_file()


def test_non_utf8_manifest_names_the_file_and_the_line(tmp_path, capsys):
    from retrieval.datasets import main

    write_wav(tmp_path / "a.wav")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"audio,caption\na.wav,fine\na.wav,caf\xe9 noise\n")
    out = tmp_path / "out.csv"
    out.write_text("kept\n")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["manifest", "--root", str(bad), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3" in err and "UTF-8" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_clotho_csv_neither_utf8_nor_cp1252_names_the_file_and_the_line(tmp_path, capsys):
    from retrieval.datasets import main

    root = tmp_path / "clotho"
    csv_path = root / "clotho_captions_evaluation.csv"
    root.mkdir()
    csv_path.write_bytes(b"file_name,caption_1\nx.wav,ok\ny.wav,bad \x81 byte\n")  # 0x81: undefined in cp1252
    with pytest.raises(SystemExit) as info:
        main(["clotho", "--root", str(root), "--out", str(tmp_path / "o.csv")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{csv_path}, line 3" in err and "cp1252" in err
    assert not (tmp_path / "o.csv").exists()


def test_unbalanced_quote_in_references_csv_names_the_file_and_the_line(tmp_path, capsys):
    from captioning.metrics import main

    preds, refs, out = tmp_path / "p.csv", tmp_path / "r.csv", tmp_path / "scores.json"
    preds.write_text("file_name,caption\na.wav,a dog barks\nb.wav,rain falls\nc.wav,a car passes\n")
    refs.write_text('file_name,caption_1,caption_2\na.wav,"a dog barks,a dog\nb.wav,rain,rain falls\n'
                    'c.wav,a car,a car passes\n')
    out.write_text("{}")
    before = snapshot(tmp_path)
    assert main(["--predictions", str(preds), "--references", str(refs), "--metrics", "bleu",
                 "--no-tokenize", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{refs}, line 2" in err and "quote" in err and "no references" not in err
    assert snapshot(tmp_path) == before


def test_submit_captions_folder_is_a_usage_error_not_a_traceback(tmp_path, capsys):
    from retrieval.submit import main

    audio = tmp_path / "audio"
    for i in range(3):
        write_wav(audio / f"clip{i}.wav")
    out = tmp_path / "sub"
    out.mkdir()
    (out / "x.output.csv").write_text("kept\n")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["--captions", str(audio), "--audio-dir", str(audio), "--out", str(out / "x.output.csv"),
              "--checkpoint", "unused"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{audio}: is a folder" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before
