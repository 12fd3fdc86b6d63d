"""Bad model inputs: each case gets exit code 2 from the CLI, a one-line message naming the file and the field
or the problem, and leaves what was in the output folder untouched. Official-checkpoint cases use tiny fake
files in the official layout, with a text model that is in no cache (HF_HUB_OFFLINE=1 from conftest)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import m2dclap
from m2dclap.checkpoint import CheckpointError
from m2dclap.extract import main as extract_main

from conftest import tone

pytestmark = pytest.mark.usefixtures("one_thread")

BERT = "google-bert/bert-base-uncased"  # what the 'B' in an official 2025 folder name asks for


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def tiny(**overrides) -> m2dclap.M2DCLAP:
    torch.manual_seed(0)
    return m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none", **overrides})).eval()


@pytest.fixture
def wav(tmp_path) -> Path:
    path = tmp_path / "clip.wav"
    sf.write(path, tone(1.5).numpy(), 16000)
    return path


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An output folder holding a previous run's files, which a failed run must leave as they were."""
    out = tmp_path / "feats"
    (out / "clip").mkdir(parents=True)
    np.save(out / "clip" / "old.npy", np.arange(6, dtype=np.float32))
    (out / "meta.json").write_text(json.dumps({"model": "tiny", "features": ["clip"]}))
    return out


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def extract_fails(checkpoint: Path, wav: Path, out_dir: Path, capsys) -> str:
    """Run m2dclap.extract on a bad checkpoint; check exit code 2, one line, untouched outputs."""
    before = digest(out_dir)
    rc = extract_main([str(wav), "--checkpoint", str(checkpoint), "--out", str(out_dir), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert digest(out_dir) == before
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def saved_folder_with(tmp_path: Path, section: str, field: str, value) -> Path:
    folder = tiny().save_pretrained(tmp_path / "model")
    meta = json.loads((folder / "config.json").read_text())
    meta["model"][section][field] = value
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def official_2025(tmp_path: Path) -> tuple[Path, m2dclap.M2DCLAP]:
    """A tiny fake of the released 2025 file: ``backbone.*`` + ``text_encoder.*`` keys in a folder whose
    name asks for BERT ('B') with its weights inside ('TI'). The official loader infers 64-dim heads."""
    src = tiny(**{"encoder.num_heads": 1, "projector.kind": "transformer"})
    with torch.no_grad():
        src.norm_stats.copy_(torch.tensor([-7.26, 4.35]))
        for p in src.audio_proj.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {"backbone." + k: v for k, v in src.encoder.state_dict().items()}
    sd.update({"backbone.audio_proj." + k: v for k, v in src.audio_proj.state_dict().items()})
    sd["backbone.norm_stats"] = src.norm_stats.clone()
    sd["text_encoder.text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(30522, 768)
    path = tmp_path / "m2d_clap_vit_base-80x128p16x16p16kpBpTI-2025" / "checkpoint-30.pth"
    path.parent.mkdir(parents=True)
    torch.save({"model": sd, "epoch": 30}, path)
    return path, src


@pytest.fixture
def no_text_model_calls(monkeypatch):
    """Any attempt to look up a text model (tokenizer, config, weights, sentence model) fails the test."""
    import sentence_transformers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a text model was looked up: {args[:2]}")

    for name in ("AutoTokenizer", "AutoConfig", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", refuse)


def bert_is_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(BERT, "config.json"), str)


# ---------------------------------------------------------------------------------------------------
# config.json of a saved folder
# ---------------------------------------------------------------------------------------------------
def test_config_embed_dim_not_an_integer(tmp_path, wav, out_dir, capsys):
    folder = saved_folder_with(tmp_path, "encoder", "embed_dim", "big")
    err = extract_fails(folder, wav, out_dir, capsys)
    assert "config.json: encoder.embed_dim='big' is not an integer" in err


def test_config_num_heads_not_dividing_embed_dim(tmp_path, wav, out_dir, capsys):
    folder = saved_folder_with(tmp_path, "encoder", "num_heads", 3)
    err = extract_fails(folder, wav, out_dir, capsys)
    assert "config.json: encoder.num_heads=3 does not divide embed_dim=64" in err


def test_config_negative_depth(tmp_path, wav, out_dir, capsys):
    folder = saved_folder_with(tmp_path, "encoder", "depth", -2)
    err = extract_fails(folder, wav, out_dir, capsys)
    assert "config.json: encoder.depth=-2 must be at least 1" in err


@pytest.mark.parametrize("value", [[80], [80, 128, 3], "80x128", [80, "128"]])
def test_config_input_size_wrong_shape(tmp_path, wav, out_dir, capsys, value):
    folder = saved_folder_with(tmp_path, "encoder", "input_size", value)
    err = extract_fails(folder, wav, out_dir, capsys)
    assert "config.json: encoder.input_size" in err
    assert "must be a list of 2 integers" in err or "[1]='128' is not an integer" in err


def test_config_unknown_field_and_bad_section(tmp_path, wav, out_dir, capsys):
    folder = saved_folder_with(tmp_path, "projector", "heads", 2)
    assert "config.json: unknown field(s) projector.heads" in extract_fails(folder, wav, out_dir, capsys)
    meta = json.loads((folder / "config.json").read_text())
    del meta["model"]["projector"]["heads"]
    meta["model"]["text"] = "bert"
    (folder / "config.json").write_text(json.dumps(meta))
    assert "config.json: text must be a mapping" in extract_fails(folder, wav, out_dir, capsys)


def test_config_overrides_are_checked_too():
    with pytest.raises(m2dclap.config.ConfigError, match="encoder.num_heads=5 does not divide embed_dim=64"):
        m2dclap.get_model_config("tiny", **{"encoder.num_heads": 5})
    with pytest.raises(m2dclap.config.ConfigError, match="projector.kind='attention'"):
        m2dclap.get_model_config("tiny", **{"projector.kind": "attention"})


# ---------------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------------
def test_random_bytes_pth(tmp_path, wav, out_dir, capsys):
    path = tmp_path / "m2d_vit_base-80x608p16x16-221006" / "checkpoint-300.pth"
    path.parent.mkdir()
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = extract_fails(path, wav, out_dir, capsys)
    assert f"{path}: not a PyTorch checkpoint" in err and "refused" not in err


def test_damaged_pickle_is_not_called_tampered(tmp_path):
    path = tmp_path / "damaged.pth"
    path.write_bytes(b"\x80\x02" + bytes(range(200, 256)) * 20)  # a pickle header, then garbage
    with pytest.raises(CheckpointError, match="damaged.pth: not a (readable )?PyTorch checkpoint") as info:
        m2dclap.load(path)
    assert "refused" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["optimizer", "no-encoder-keys", "tensor", "non-tensors"])
def test_pth_of_the_wrong_kind(tmp_path, wav, out_dir, capsys, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "optimizer":
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
        opt.step()
        obj, expected = opt.state_dict(), "not an M2D checkpoint: it is an optimizer state"
    elif kind == "no-encoder-keys":
        obj, expected = {"model": {"conv1.weight": torch.zeros(3)}}, "not an M2D checkpoint: no 'patch_embed"
    elif kind == "tensor":
        obj, expected = torch.zeros(4), "not an M2D checkpoint: it holds a Tensor"
    else:
        obj, expected = {"model": {"lr": 0.1, "patch_embed.proj.weight": torch.zeros(1)}}, "non-tensor entries"
    torch.save(obj, path)
    err = extract_fails(path, wav, out_dir, capsys)
    assert f"{path}: " in err and expected in err


def test_pth_with_broken_encoder_tensors(tmp_path):
    sd = {k: v for k, v in tiny().encoder.state_dict().items() if not k.startswith("blocks.")}
    path = tmp_path / "m2d_vit_base-80x128p16x16-221006" / "checkpoint-1.pth"
    path.parent.mkdir()
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="no transformer blocks"):
        m2dclap.load(path)
    sd = dict(tiny().encoder.state_dict(), pos_embed=torch.zeros(5))
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(5,\)"):
        m2dclap.load(path)


def test_truncated_safetensors(tmp_path, wav, out_dir, capsys):
    folder = tiny().save_pretrained(tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = extract_fails(folder, wav, out_dir, capsys)
    assert f"{weights}: not a readable safetensors file" in err


def test_safetensors_given_as_official_checkpoint(tmp_path):
    folder = tiny().save_pretrained(tmp_path / "model")
    renamed = tmp_path / "weights.pth"
    renamed.write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="weights.pth: a safetensors file, not a PyTorch checkpoint"):
        m2dclap.load(renamed)


def test_bad_load_arguments(tmp_path):
    folder = tiny().save_pretrained(tmp_path / "model")
    with pytest.raises(CheckpointError, match="input_size=.80,.: expected"):
        m2dclap.load(folder, input_size=(80,))
    with pytest.raises(CheckpointError, match="text_name=''"):
        m2dclap.load(folder, text_name="")


# ---------------------------------------------------------------------------------------------------
# Official checkpoints whose text model is in no cache
# ---------------------------------------------------------------------------------------------------
def test_official_clap_audio_only_never_touches_the_text_model(tmp_path, wav, no_text_model_calls, capsys):
    path, src = official_2025(tmp_path)
    model = m2dclap.load(path, audio_only=True, text_name="no-such-org/no-such-model")
    assert model.text_encoder is None and model.cfg.text.kind == "none"
    audio = [tone(2.0, freq=330), tone(3.1, freq=880, seed=2)]
    assert torch.equal(model.encode_audio(audio), src.encode_audio(audio))
    out = tmp_path / "feats"
    rc = extract_main([str(wav), "--checkpoint", str(path), "--out", str(out), "--features", "clip,clap", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "clap").is_dir() and any((out / "clip").iterdir())


def test_our_folder_audio_only_never_touches_the_text_model(tmp_path, minilm, monkeypatch):
    src = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.name": minilm})).eval()
    folder = src.save_pretrained(tmp_path / "default-run")
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower was loaded")

    for name in ("AutoTokenizer", "AutoConfig", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    model = m2dclap.load(folder, audio_only=True)
    assert model.text_encoder is None
    assert torch.equal(model.encode_audio(tone(1.0)), src.encode_audio(tone(1.0)))


def test_official_clap_with_text_names_the_model_and_the_option(tmp_path):
    if bert_is_cached():
        pytest.skip(f"{BERT} is in the local Hugging Face cache, so it is not unreachable here")
    path, _ = official_2025(tmp_path)
    with pytest.raises(CheckpointError) as info:
        m2dclap.load(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: cannot load the text model '{BERT}'")
    assert "text_name=PATH" in msg and "audio_only=True" in msg
    assert info.value.text_model == BERT  # for CLIs that offer an option for a local copy
    with pytest.raises(CheckpointError, match="cannot load the text model 'no-such-org/no-such-model'"):
        m2dclap.load(path, text_name="no-such-org/no-such-model")


def test_zeroshot_cli_reports_the_unreachable_text_model(tmp_path, wav, capsys):
    if bert_is_cached():
        pytest.skip(f"{BERT} is in the local Hugging Face cache, so it is not unreachable here")
    from zeroshot.classify import main as classify_main

    path, _ = official_2025(tmp_path)
    rc = classify_main([str(wav), "--checkpoint", str(path), "--labels", "dog,rain", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and f"'{BERT}'" in err and "--text-model PATH" in err  # the command's own option
    missing = tmp_path / "no-bert-here"
    rc = classify_main([str(wav), "--checkpoint", str(path), "--labels", "dog,rain", "--quiet",
                        "--text-model", str(missing)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(missing) in err  # the option reached the loader


def test_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch):
    """Downloads allowed but no network: one connection attempt decides, the hub client never retries."""
    import transformers

    import m2dclap.clap as clap

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(clap, "_hub_offline", lambda: False)

    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(clap.socket, "create_connection", no_network)
    for name in ("AutoTokenizer", "AutoConfig", "AutoModel"):
        klass = getattr(transformers, name)

        def local_only(source, *args, _orig=klass.from_pretrained, **kwargs):
            assert kwargs.get("local_files_only"), "the hub was asked although it is unreachable"
            return _orig(source, *args, **kwargs)

        monkeypatch.setattr(klass, "from_pretrained", local_only)
    path, _ = official_2025(tmp_path)
    with pytest.raises(CheckpointError, match="cannot load the text model 'no-such-org/no-such-model': not a local "
                                              "folder, not in the Hugging Face cache, and .* is not reachable"):
        m2dclap.load(path, text_name="no-such-org/no-such-model")


def test_text_name_folder_that_does_not_exist(tmp_path):
    path, _ = official_2025(tmp_path)
    with pytest.raises(CheckpointError, match="text model '/no/such/bert': no such folder. Give the folder"):
        m2dclap.load(path, text_name="/no/such/bert")


def test_pretrained_name_that_cannot_be_fetched(tmp_path, monkeypatch, wav, out_dir, capsys):
    import zipfile

    import m2dclap.pretrained as pretrained

    def damaged(url, dest):
        raise zipfile.BadZipFile("File is not a zip file")

    monkeypatch.setenv("M2DCLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "_download_and_unzip", damaged)
    name = "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025"
    err = extract_fails(name, wav, out_dir, capsys)
    assert "could not download and unpack" in err and f"folder name {name}" in err
