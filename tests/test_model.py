"""Model contract tests: shapes, no NaN, gradients, layout of the official position embedding and
features, chunking arithmetic, determinism, bf16, and the losses against their equations."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import m2dclap
from m2dclap.clap import AudioProjector, ContrastiveLoss, MLPProjector
from m2dclap.config import ProjectorCfg
from m2dclap.encoder import AudioEncoder, frame_features
from m2dclap.layers import Attention, resample_pos_embed, sincos_2d_pos_embed
from m2dclap.m2d import M2DCLAPPretrainer, ema_momentum, m2d_loss, random_masking

from conftest import tone


@pytest.fixture(scope="module")
def tiny():
    return m2dclap.create_model("tiny").eval()


def audio_only(preset: str, **overrides) -> m2dclap.M2DCLAP:
    return m2dclap.M2DCLAP(m2dclap.get_model_config(preset, **{"text.kind": "none", **overrides})).eval()


def test_presets_listed():
    assert {"base", "base-1001", "tiny"} <= set(m2dclap.list_models())
    base = m2dclap.get_model_config("base")
    assert base.encoder.grid_size == (5, 38) and base.encoder.embed_dim == 768 and base.encoder.norm_eps == 1e-6
    assert (base.predictor.embed_dim, base.predictor.depth, base.predictor.num_heads) == (512, 8, 16)
    assert (base.projector.depth, base.projector.num_heads, base.projector.mlp_ratio) == (1, 1, 1.0)
    assert m2dclap.get_model_config("base-1001").encoder.grid_size == (5, 62)
    with pytest.raises(KeyError, match="encoder.dept"):
        m2dclap.get_model_config("tiny", **{"encoder.dept": 3})


def test_sincos_layout_first_half_time_second_half_freq():
    pe = sincos_2d_pos_embed(16, (3, 4))[0]  # (1 + 12, 16)
    assert torch.all(pe[0] == 0)  # CLS row
    grid = pe[1:].reshape(3, 4, 16)
    # First half depends only on the time index, second half only on the frequency index.
    assert torch.allclose(grid[0, :, :8], grid[2, :, :8]) and not torch.allclose(grid[:, 0, :8], grid[:, 1, :8])
    assert torch.allclose(grid[:, 0, 8:], grid[:, 3, 8:]) and not torch.allclose(grid[0, :, 8:], grid[1, :, 8:])
    # time index 1: sin(1 * w_0) with w_0 = 1 in channel 0, cos in channel 4
    assert grid[0, 1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert grid[0, 1, 4].item() == pytest.approx(math.cos(1.0), abs=1e-6)


def test_resample_pos_embed_identity_and_shape():
    pe = sincos_2d_pos_embed(32, (5, 38))
    assert torch.equal(resample_pos_embed(pe, (5, 38), (5, 38)), pe)
    out = resample_pos_embed(pe, (5, 38), (5, 62))
    assert out.shape == (1, 1 + 5 * 62, 32) and torch.equal(out[:, 0], pe[:, 0])
    with pytest.raises(ValueError, match="5x40"):
        resample_pos_embed(pe, (5, 40), (5, 62))


def test_sdpa_attention_matches_manual():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = ((q @ k.transpose(-2, -1)) / math.sqrt(8)).softmax(-1) @ v
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(attn(x), ref, atol=1e-5)


@pytest.mark.parametrize(
    "frames,unit,expected", [(1001, 608, 63), (1001, 1001, 62), (608, 608, 38), (300, 608, 19), (5, 608, 1)]
)
def test_chunking_matches_official_rule(frames, unit, expected):
    enc = AudioEncoder(m2dclap.EncoderCfg(input_size=(80, unit), embed_dim=32, depth=1, num_heads=2)).eval()
    with torch.no_grad():
        z = enc.encode_lms(torch.randn(2, 1, 80, frames))
    assert z.shape == (2, 5, expected, 32)


def test_chunked_equals_per_chunk_loop():
    """Batching all chunks in one forward gives what the official one-chunk-at-a-time loop gives."""
    torch.manual_seed(0)
    enc = AudioEncoder(m2dclap.EncoderCfg(input_size=(80, 64), embed_dim=32, depth=2, num_heads=2)).eval()
    x = torch.randn(2, 1, 80, 150)
    with torch.no_grad():
        z = enc.encode_lms(x)
        x_pad = F.pad(x, (0, (16 - 150 % 64 % 16) % 16))
        loop = [enc.forward_features(x_pad[..., i : i + 64])[:, 1:] for i in range(0, x_pad.shape[-1], 64)]
        loop = torch.cat([c.reshape(2, 5, -1, 32) for c in loop], dim=2)
    assert torch.allclose(z, loop, atol=1e-5)


def test_frame_features_eq2_layout():
    z = torch.arange(2 * 5 * 3 * 4, dtype=torch.float32).reshape(2, 5, 3, 4)  # (B, F', T', D)
    f = frame_features(z)
    assert f.shape == (2, 3, 20)
    assert torch.equal(f[1, 2, 4:8], z[1, 1, 2])  # second frequency patch comes second


def test_tiny_features_shapes_and_determinism(tiny):
    waves = torch.stack([tone(3.0, freq=300), tone(3.0, freq=900, seed=1)])
    feats = tiny.audio_features(waves)
    # 301 log-mel frames -> chunks of 128: 128 + 128 + 48 -> 8 + 8 + 3 patches
    assert tiny.log_mel(waves).shape[-1] == 301
    assert feats["frame"].shape == (2, 19, 5 * 64) and feats["clip"].shape == (2, 320)
    assert feats["patches"].shape == (2, 5, 19, 64)
    assert torch.isfinite(feats["clip"]).all()
    again = tiny.audio_features([waves[1], waves[0]])
    assert torch.allclose(again["clip"][0], feats["clip"][1], atol=1e-5)
    emb = tiny.encode_audio(waves)
    single = tiny.encode_audio(waves[1])
    assert emb.shape == (2, 64) and torch.allclose(emb[1], single[0], atol=1e-5)


def test_variable_lengths_and_resampling(tiny):
    long, short = tone(2.5), tone(1.1, freq=700)
    emb = tiny.encode_audio([long, short])
    assert torch.allclose(emb[1], tiny.encode_audio(short)[0], atol=1e-5)
    feats = tiny.audio_features([long, short])
    assert isinstance(feats["frame"], list) and feats["frame"][1].shape[0] < feats["frame"][0].shape[0]
    t32, t16 = torch.arange(64000) / 32000, torch.arange(32000) / 16000
    at_32k = tiny.audio_features(0.3 * torch.sin(2 * math.pi * 440 * t32), sample_rate=32000)["clip"]
    at_16k = tiny.audio_features(0.3 * torch.sin(2 * math.pi * 440 * t16))["clip"]
    assert F.cosine_similarity(at_32k, at_16k).item() > 0.999


def test_bad_waveforms_rejected(tiny):
    bad = tone(1.0)
    bad[100] = float("nan")
    with pytest.raises(m2dclap.AudioError, match=r"NaN.*100"):
        tiny.encode_audio(bad)
    with pytest.raises(m2dclap.AudioError, match="zero samples"):
        tiny.encode_audio(torch.zeros(0))


def test_text_and_similarity(tiny):
    t = tiny.encode_text(["a dog barks", "a high beep repeats", "a dog barks"])
    assert t.shape == (3, 64) and torch.allclose(t[0], t[2], atol=1e-5)
    s = tiny.similarity(tiny.encode_audio(tone(1.0)), t)
    assert s.shape == (1, 3) and (s.abs() <= 1 + 1e-5).all()


def test_bf16_close_to_float32():
    model = audio_only("tiny")
    waves = torch.stack([tone(2.0), tone(2.0, freq=1200)])
    ref = model.encode_audio(waves)
    out = model.to(torch.bfloat16).encode_audio(waves)
    assert out.dtype == torch.float32
    assert F.cosine_similarity(out, ref).min() > 0.99


def test_every_parameter_gets_a_gradient_stage1():
    cfg = m2dclap.get_model_config("tiny", **{"text.kind": "sentence", "text.width": 384})
    trainer = M2DCLAPPretrainer(m2dclap.M2DCLAP(cfg), mask_ratio=0.7, lambda_m2d=1.0, lambda_clap=0.01)
    out = trainer(torch.randn(4, 1, 80, 128), text_emb=torch.randn(4, 384))
    out["loss"].backward()
    missing = [n for n, p in trainer.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(p.grad is None for p in trainer.target.parameters())  # target is EMA-only
    assert torch.isfinite(out["loss"])


def test_stage2_trains_text_and_projector_only(tiny):
    model = m2dclap.create_model("tiny")
    model.set_trainable(audio_encoder=False, audio_proj=True, text=True)
    trainer = M2DCLAPPretrainer(model, mask_ratio=0.3, lambda_m2d=0.0, lambda_clap=1.0)
    assert trainer.predictor is None
    out = trainer(torch.randn(3, 1, 80, 128), texts=["a beep", "a siren", "noise"])
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.audio_proj.sem_token.grad is not None
    assert any(p.grad is not None for p in model.text_encoder.parameters())


def test_masking_counts_and_ema():
    keep, masked, restore = random_masking(3, 190, 0.7)
    assert keep.shape == (3, 57) and masked.shape == (3, 133)
    assert torch.equal(torch.cat([keep, masked], 1).gather(1, restore), torch.arange(190).expand(3, -1))
    assert ema_momentum(0, 100) == pytest.approx(0.99995) and ema_momentum(99, 100) == pytest.approx(0.99999)


def test_m2d_loss_is_eq1():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    std = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    ref = (F.normalize(pred, dim=-1) - F.normalize(std, dim=-1)).pow(2).sum(-1).mean()
    assert m2d_loss(pred, target).item() == pytest.approx(ref.item(), abs=1e-5)


def test_contrastive_loss_is_eq4():
    torch.manual_seed(0)
    a, t = torch.randn(6, 16), torch.randn(6, 16)
    tau = 0.07
    S = F.normalize(a, dim=-1) @ F.normalize(t, dim=-1).T
    ref = -(
        torch.diag(S / tau - torch.logsumexp(S / tau, 0)).sum()
        + torch.diag(S / tau - torch.logsumexp(S / tau, 1)).sum()
    ) / (2 * 6)
    got = ContrastiveLoss()(a, t, torch.tensor(1 / tau))["contrastive_loss"]
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)


def test_logit_scale_init_and_clamp(tiny):
    assert tiny.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        tiny.logit_scale.fill_(10.0)
    tiny.clamp_logit_scale()
    assert tiny.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        tiny.logit_scale.fill_(math.log(1 / 0.07))


def test_projectors_ignore_padding():
    torch.manual_seed(0)
    for proj in (AudioProjector(16, ProjectorCfg(num_heads=1)), MLPProjector(16)):
        x = torch.randn(1, 5, 16)
        padded = torch.cat([x, torch.randn(1, 3, 16)], 1)
        mask = torch.tensor([[False] * 5 + [True] * 3])
        assert torch.allclose(proj(x), proj(padded, mask), atol=1e-5)


def test_state_dict_round_trip(tmp_path, tiny):
    path = tiny.save_pretrained(tmp_path / "m")
    again = m2dclap.load(path)
    w = tone(1.5)
    assert torch.equal(again.encode_audio(w), tiny.encode_audio(w))
    assert torch.equal(again.encode_text(["a beep"]), tiny.encode_text(["a beep"]))


def test_base_geometry_on_10s_clip():
    """The paper's ViT-B geometry (depth cut to 1 for speed): 10 s -> 63 frames of 3840 dims at 80x608."""
    model = audio_only("base", **{"encoder.depth": 1})
    f = model.audio_features(torch.zeros(16000 * 10))
    assert f["frame"].shape == (1, 63, 3840) and f["clip"].shape == (1, 3840)
    model = audio_only("base-1001", **{"encoder.depth": 1})
    assert model.audio_features(torch.zeros(16000 * 10))["frame"].shape == (1, 62, 3840)


@pytest.mark.slow
def test_model_import_does_not_import_accelerate():
    code = "import sys, m2dclap, m2dclap.model; print('accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bf16_cast_keeps_statistics_and_frontend_in_float32():
    model = audio_only("tiny").to(torch.bfloat16)
    assert model.norm_stats.dtype == torch.float32 and model.norm_stats.tolist() == pytest.approx([-7.1, 4.2])
    assert model.frontend.mel_fb.dtype == torch.float32 and model.encoder.pos_embed.dtype == torch.bfloat16


def test_audio_features_with_clap_matches_encode_audio(tiny):
    waves = [tone(2.0), tone(1.3, freq=600)]
    feats = tiny.audio_features(waves, clap=True)
    assert torch.allclose(feats["clap"], tiny.encode_audio(waves), atol=1e-5)


def test_mixed_length_batch_equals_one_by_one():
    """Chunks of clips of different lengths are encoded together; results equal encoding each clip alone."""
    model = audio_only("tiny")
    waves = [tone(3.3), tone(1.0, freq=700), tone(2.6, freq=300, seed=3), tone(0.5, freq=1500)]
    together = model.audio_features(waves)
    for i, w in enumerate(waves):
        alone = model.audio_features(w)
        assert torch.allclose(together["frame"][i], alone["frame"][0], atol=1e-5)
        assert torch.allclose(together["clip"][i], alone["clip"][0], atol=1e-5)


@pytest.mark.parametrize("preset", m2dclap.list_models())
def test_presets_pass_validation_and_round_trip_through_json(preset):
    cfg = m2dclap.get_model_config(preset)
    assert cfg.validate() is cfg
    assert m2dclap.ModelCfg.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_from_json_checks_types_and_relations():
    from m2dclap.config import ConfigError

    good = m2dclap.get_model_config("tiny").to_dict()
    cases = [
        ("encoder", "mlp_ratio", "4", "encoder.mlp_ratio='4' is not a number"),
        ("encoder", "qkv_bias", 1, "encoder.qkv_bias=1 is not true or false"),
        ("encoder", "patch_size", [16, 256], r"encoder.patch_size=\[16, 256\] is larger than input_size"),
        ("predictor", "num_heads", 0, "predictor.num_heads=0 must be at least 1"),
        ("frontend", "win_length", 800, "frontend.win_length=800 exceeds n_fft=400"),
        ("frontend", "norm_stats", [-7.1, 0], r"frontend.norm_stats=\[-7.1, 0.0\] needs a positive std"),
        ("text", "pooling", "max", "text.pooling='max' is not cls or mean"),
        ("text", "width", 1.5, "text.width=1.5 is not an integer"),
    ]
    for section, name, value, message in cases:
        d = json.loads(json.dumps(good))
        d[section][name] = value
        with pytest.raises(ConfigError, match=message):
            m2dclap.ModelCfg.from_dict(d)
    with pytest.raises(ConfigError, match="init_temperature=0.0 must be positive"):
        m2dclap.ModelCfg.from_dict({**good, "init_temperature": 0})


def test_model_built_from_a_bad_config_names_the_field():
    from m2dclap.config import ConfigError

    cfg = m2dclap.get_model_config("tiny", **{"text.kind": "none"})
    cfg.encoder.num_heads = 3  # set directly, past get_model_config's check
    with pytest.raises(ConfigError, match="encoder.num_heads=3 does not divide embed_dim=64"):
        m2dclap.M2DCLAP(cfg)
