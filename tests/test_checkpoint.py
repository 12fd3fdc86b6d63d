"""Loading official checkpoint layouts (written here from tiny models) and this suite's format.

Each writer model is saved in an official key layout in a folder named as the official releases are;
the loaded model must reproduce the writer's outputs exactly.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

import m2dclap
from m2dclap.checkpoint import CheckpointError, official_layout, parse_official_name
from m2dclap.m2d import M2DCLAPPretrainer

from conftest import tone

WAVES = [tone(2.0, freq=330), tone(3.1, freq=880, seed=2)]


def writer(minilm: str, projector: str, text: str = "none", pooling: str = "cls", depth: int = 1):
    """A small model with 64-dim heads (the official loader infers heads = width // 64)."""
    cfg = m2dclap.get_model_config(
        "tiny",
        **{
            "encoder.embed_dim": 384,
            "encoder.num_heads": 6,
            "encoder.depth": depth,
            "encoder.input_size": (80, 128),
            "projector.kind": projector,
            "text.kind": text,
            "text.name": minilm,
            "text.pooling": pooling,
            "text.width": 384,
        },
    )
    torch.manual_seed(0)
    model = m2dclap.M2DCLAP(cfg).eval()
    with torch.no_grad():  # make every parameter non-trivial so a missed key would show
        for p in model.audio_proj.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(3.3)
    return model


def encoder_sd(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


def save_official(path: Path, sd: dict, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": sd,
            "epoch": 3,
            "args": argparse.Namespace(model="m2d_vit_base", blr=3e-4, output_dir=Path("/tmp/x")),
            **extra,
        },
        path,
    )
    return path


def same_audio(a, b):
    for w in WAVES:
        assert torch.equal(a.audio_features(w)["clip"], b.audio_features(w)["clip"])
    if a.cfg.projector.kind != "none":
        assert torch.equal(a.encode_audio(WAVES), b.encode_audio(WAVES))


def test_name_parsing():
    p = parse_official_name("m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025")
    assert p == {
        "model": "m2d_clap_vit_base",
        "input_size": (80, 1001),
        "patch_size": (16, 16),
        "sr": "16k",
        "extra": ["B", "TI"],
    }
    assert parse_official_name("m2d_as_vit_base-80x608p16x16p32k-240413_enconly")["sr"] == "32k"
    assert parse_official_name("checkpoint-300") is None


def test_official_2025_layout(tmp_path, minilm):
    src = writer(minilm, "transformer", text="hf", pooling="cls")
    sd = {"backbone." + k: v for k, v in encoder_sd(src).items()}
    sd.update({"backbone.audio_proj." + k: v for k, v in src.audio_proj.state_dict().items()})
    sd["backbone.norm_stats"] = torch.tensor([-7.261779308319092, 4.3511505126953125])
    sd.update({"text_encoder." + k: v for k, v in src.text_encoder.state_dict().items()})
    assert len([k for k in sd if k.startswith("backbone.audio_proj.")]) == 15  # as in the released file
    with torch.no_grad():
        src.norm_stats.copy_(sd["backbone.norm_stats"])
    path = save_official(tmp_path / "m2d_clap_vit_base-80x128p16x16p16kpBpTI-2025" / "checkpoint-30.pth", sd)
    model = m2dclap.load(path, text_name=minilm)
    assert official_layout(torch.load(path, weights_only=False)["model"]) == "2025"
    assert model.cfg.text.pooling == "cls" and model.cfg.projector.depth == 1
    assert model.norm_stats.tolist() == pytest.approx([-7.26178, 4.35115], abs=1e-5)
    same_audio(src, model)
    texts = ["a dog barks twice", "rain on a window"]
    assert torch.equal(model.encode_text(texts), src.encode_text(texts))
    # The folder also works as the argument.
    assert torch.equal(m2dclap.load(path.parent, text_name=minilm).encode_audio(WAVES[0]), model.encode_audio(WAVES[0]))


def test_official_2024_clap_layout_with_training_keys(tmp_path, minilm):
    src = writer(minilm, "mlp", text="hf", pooling="mean")
    trainer = M2DCLAPPretrainer(src, lambda_m2d=1.0)
    sd = encoder_sd(src)
    sd.update({"target_" + k[len("target_") :]: v for k, v in trainer.target.state_dict().items()})
    sd.update({k: v for k, v in trainer.predictor.state_dict().items()})
    sd.update({"audio_proj." + k: v for k, v in src.audio_proj.state_dict().items()})
    sd["logit_scale"] = src.logit_scale.detach().clone()
    assert {
        "audio_proj.0.weight",
        "audio_proj.2.bias",
        "decoder_embed.weight",
        "mask_token",
        "target_blocks.0.attn.qkv.weight",
    } <= set(sd)
    path = save_official(tmp_path / "m2d_clap_vit_base-80x128p16x16-240128" / "checkpoint-300.pth", sd)
    model = m2dclap.load(path, text_name=minilm)  # 'A' = GTE: mean pooling; our stand-in is MiniLM
    assert model.cfg.projector.kind == "mlp" and model.cfg.text.pooling == "mean"
    assert model.norm_stats.tolist() == pytest.approx([-7.1, 4.2])  # default when the file has none
    with torch.no_grad():
        src.norm_stats.copy_(torch.tensor([-7.1, 4.2]))
    same_audio(src, model)
    assert model.logit_scale.item() == pytest.approx(3.3)


def test_encoder_only_and_evar_layouts(tmp_path, minilm):
    src = writer(minilm, "none")
    sd = encoder_sd(src)
    sd["norm_stats"] = torch.tensor([-7.0, 4.0])
    with torch.no_grad():
        src.norm_stats.copy_(sd["norm_stats"])
    p1 = save_official(tmp_path / "m2d_vit_base-80x128p16x16-221006-mr7_enconly" / "weights.pth", sd)
    enc_only = m2dclap.load(p1)
    assert enc_only.text_encoder is None and enc_only.cfg.projector.kind == "none"
    same_audio(src, enc_only)
    evar = {"module.ar.runtime.backbone." + k: v for k, v in sd.items()}
    evar["module.head.mlp.mlp.0.weight"] = torch.zeros(527, 384 * 5)
    evar["module.ar.runtime.to_spec.mel_basis"] = torch.zeros(80, 201)
    p2 = save_official(tmp_path / "m2d_vit_base-80x128p16x16-221006-mr7_as_46ab246d" / "weights_ep69.pth", evar)
    same_audio(src, m2dclap.load(p2))


def test_renamed_folder_infers_input_size(tmp_path, minilm, caplog):
    src = writer(minilm, "none")
    path = save_official(tmp_path / "my_model" / "ckpt.pth", encoder_sd(src))
    model = m2dclap.load(path)
    assert model.cfg.encoder.input_size == (80, 128)
    assert "inferred input size" in caplog.text
    same_audio(src, model)


def test_tampered_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "m2d_vit_base-80x608p16x16-221006" / "checkpoint-300.pth"
    path.parent.mkdir()
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "args": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load.*(system|posix)"):
        m2dclap.load(path)
    assert not marker.exists()


def test_wrong_kind_of_file(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(3)}}, other)
    with pytest.raises(CheckpointError, match="not an M2D checkpoint"):
        m2dclap.load(other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a PyTorch checkpoint"):
        m2dclap.load(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        m2dclap.load(tmp_path / "missing.pth")


def test_our_format_errors(tmp_path):
    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    folder = model.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    bigger = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none", "encoder.depth": 3}))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected.*encoder.blocks.2"):
        m2dclap.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        m2dclap.load(folder)


def test_save_is_atomic_over_existing(tmp_path):
    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    folder = model.save_pretrained(tmp_path / "ours")
    model.save_pretrained(folder)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]
    assert torch.equal(m2dclap.load(folder).encode_audio(WAVES[0]), model.encode_audio(WAVES[0]))


def test_pretrained_name_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M2DCLAP_CACHE", str(tmp_path))
    name = "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025"
    assert name in m2dclap.list_pretrained()
    with pytest.raises(CheckpointError, match="releases/download/v0.5.0"):
        m2dclap.load(name, download=False)
    with pytest.raises(CheckpointError, match="not a registered pretrained name"):
        m2dclap.load("no-such-model")


def test_pretrained_name_downloads_and_unpacks_the_release_zip(tmp_path, monkeypatch):
    """The download path on a file:// release mirror: zip fetched, unpacked under its folder name, nothing left
    over; a zip with a path escaping the cache is refused."""
    import zipfile

    from m2dclap import pretrained

    name = "m2d_vit_base-80x608p16x16-221006-mr7_enconly"
    release = tmp_path / "releases" / "v0.1.0"
    release.mkdir(parents=True)
    with zipfile.ZipFile(release / f"{name}.zip", "w") as zf:
        zf.writestr(f"{name}/checkpoint-300000.pth", b"weights")
    monkeypatch.setattr(pretrained, "RELEASES", (tmp_path / "releases").as_uri())
    monkeypatch.setenv("M2DCLAP_CACHE", str(tmp_path / "cache"))
    path = pretrained.resolve(name)
    assert path == tmp_path / "cache" / name / "checkpoint-300000.pth" and path.read_bytes() == b"weights"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [name]  # no zip or temporary folder left

    evil = "m2d_as_vit_base-80x608p16x16-240213"
    with zipfile.ZipFile(release / f"{evil}.zip", "w") as zf:
        zf.writestr(f"../{evil}/checkpoint-1.pth", b"x")
    with pytest.raises(FileNotFoundError, match="unsafe path"):
        pretrained.resolve(evil)
    assert not (tmp_path / evil).exists()


def test_input_size_change_resamples_pos_embed():
    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    model.encoder.set_input_size((80, 256))
    assert model.encoder.pos_embed.shape == (1, 1 + 5 * 16, 64)
    assert model.audio_features(tone(3.0))["frame"].shape[1] == 19


def test_audio_only_loading_skips_the_text_tower(tmp_path, minilm):
    src = writer(minilm, "transformer", text="hf", pooling="cls")
    folder = src.save_pretrained(tmp_path / "ours")
    model = m2dclap.load(folder, audio_only=True)
    assert model.text_encoder is None
    assert torch.equal(model.encode_audio(WAVES), src.encode_audio(WAVES))
    with pytest.raises(RuntimeError, match="no text encoder"):
        model.encode_text(["a beep"])
