"""Stage 1.1 (AudioSet-style fine-tuning): the loop, resume, saved model + head, structured patchout,
SpecAugment, mixup, LARS and the mAP metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import m2dclap
from m2dclap.augment import mask_bands, mix, mixup, random_structured_mask, sample_bands, spec_augment, visible_indices
from m2dclap.data.labelled import read_labelled
from m2dclap.data.manifest import ManifestError, read_manifest
from m2dclap.data.synthetic import generate_corpus
from m2dclap.metrics import average_precision as _ap
from m2dclap.metrics import mean_average_precision
from m2dclap.tagging import AudioTagger, load_finetuned, tag_audio
from m2dclap.train.engine import latest_checkpoint
from m2dclap.train.finetune import finetune, finetune_config, main
from m2dclap.train.lars import LARS

from conftest import tone

FAST = dict(
    input_size="80x208", batch_size=4, epochs=2, warmup_epochs=0.5, checkpoint_every=100, log_every=1, tracker="none"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    manifest = generate_corpus(root / "synthetic", n_clips=40, seed=2)
    torch.manual_seed(0)
    stage1 = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    stage1.save_pretrained(root / "stage1")
    return manifest, root / "stage1"


def _cfg(setup, out, **kw):
    manifest, init = setup
    return finetune_config(**{**FAST, "init": str(init), "data": str(manifest), "output_dir": str(out), **kw})


def test_finetune_runs_saves_and_the_model_loads(setup, tmp_path):
    summary = finetune(_cfg(setup, tmp_path, max_steps=3))
    assert summary["steps"] == 3 and summary["pooling"] == "tokens" and summary["skipped_clips"] == 0
    assert np.isfinite(summary["final_losses"]["loss"])
    assert summary["best_step"] == 3 and 0.0 < summary["best_map"] <= 1.0  # validated at the stop
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["step"] == 3

    train_labels = {lab for r in read_manifest(setup[0], split="train") for lab in r.labels}
    before = m2dclap.load(setup[1])
    for folder in ("model", "best"):
        model, tagger = load_finetuned(tmp_path / folder)
        assert tagger.classes == sorted(train_labels)
        assert tagger.head.norm.num_batches_tracked > 0  # the trained head, BatchNorm statistics included
        assert model.cfg.encoder.input_size == (80, 208) and model.encoder.pos_embed.shape[1] == 1 + 5 * 13
        after = m2dclap.load(tmp_path / folder)  # the plain loader reads it too
        for k, v in before.state_dict().items():  # CLAP parts untouched, encoder trained
            if not k.startswith("encoder."):
                assert torch.equal(v, after.state_dict()[k]), k
        assert not torch.equal(before.encoder.blocks[0].attn.qkv.weight, after.encoder.blocks[0].attn.qkv.weight)
        probs = tag_audio(model, tagger, [tone(1.0), tone(3.5, freq=880.0)])  # 3.5 s: two chunks
        assert probs.shape == (2, len(train_labels)) and ((probs >= 0) & (probs <= 1)).all()
        assert tagger(torch.randn(3, 1, 80, 208)).shape == (3, len(train_labels))


def test_cli_resume_equals_uninterrupted(setup, tmp_path):
    manifest, init = setup
    args = ["--init", str(init), "--data", str(manifest)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    assert main(args + ["--output-dir", str(tmp_path / "a"), "--max-steps", "2"]) == 0
    assert main(args + ["--output-dir", str(tmp_path / "a"), "--max-steps", "4", "--resume"]) == 0
    straight = finetune(_cfg(setup, tmp_path / "b", max_steps=4))
    resumed = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert resumed["steps"] == straight["steps"] == 4 and resumed["resumed_from"] == 2
    (ma, ta), (mb, tb) = load_finetuned(tmp_path / "a" / "model"), load_finetuned(tmp_path / "b" / "model")
    for k, v in ma.state_dict().items():
        assert torch.allclose(v, mb.state_dict()[k], atol=1e-6), k
    for k, v in ta.head.state_dict().items():  # incl. the BatchNorm running statistics
        assert torch.allclose(v.float(), tb.head.state_dict()[k].float(), atol=1e-6), k
    assert resumed["val_history"][-1]["val_map"] == pytest.approx(straight["val_history"][-1]["val_map"])


def test_cli_errors(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--training-mask" in capsys.readouterr().out
    assert main(["--data", str(setup[0]), "--output-dir", str(tmp_path / "a")]) == 2  # no --init
    assert "--init" in capsys.readouterr().err
    assert (
        main(
            [
                "--init",
                str(setup[1]),
                "--data",
                str(setup[0]),
                "--optimizer",
                "rmsprop",
                "--output-dir",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "optimizer must be lars, sgd or adamw" in capsys.readouterr().err
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before training
    with pytest.raises(SystemExit) as e:
        main(["--init", str(setup[1]), "--epochs", "many"])
    assert e.value.code == 2 and "--epochs" in capsys.readouterr().err


def test_label_column(tmp_path):
    (tmp_path / "m.csv").write_text("audio,tags,split\na.wav,dog; bark,train\n\nb.wav,,val\n")
    recs = read_labelled(tmp_path / "m.csv", "tags")
    assert [r.labels for r in recs] == [["dog", "bark"], []]
    with pytest.raises(ManifestError, match="mids"):
        read_labelled(tmp_path / "m.csv", "mids")


# ------------------------------------------------------------------------------------ structured patchout
def test_structured_mask_shapes_and_ratio():
    g = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(400):
        mask = random_structured_mask(6, (5, 62), 0.5, generator=g)
        assert mask.shape == (6, 5, 62) and mask.dtype == torch.bool
        rows, cols = mask.all(2), mask.all(1)  # (B, F') fully dropped rows, (B, T') fully dropped columns
        assert torch.equal(mask, rows[:, :, None] | cols[:, None, :])  # only whole rows and columns
        assert (rows.sum(1) == rows[0].sum()).all() and (cols.sum(1) == cols[0].sum()).all()
        assert (~rows).any(1).all()  # never every frequency row
        kept = (~mask).flatten(1).sum(1)
        assert (kept == kept[0]).all()
        fractions.append(mask.float().mean().item())
    assert abs(np.mean(fractions) - 0.487) < 0.03  # the recipe's expectation for a 5x62 grid at 0.5
    assert not random_structured_mask(4, (5, 62), 0.0, generator=g).any()

    mask = random_structured_mask(3, (5, 13), 0.5, generator=g)
    ids = visible_indices(mask)
    for b in range(3):
        assert torch.equal(ids[b], torch.nonzero(~mask[b].flatten()).flatten())


def test_tagger_drops_patches_only_in_training(monkeypatch):
    model = m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none"}))
    model.encoder.set_input_size((80, 208))
    tagger = AudioTagger(model.encoder, 7, "tokens", training_mask=0.5)
    seen = []
    inner = model.encoder.forward_tokens
    monkeypatch.setattr(model.encoder, "forward_tokens", lambda t: seen.append(t.shape[1]) or inner(t))
    x = torch.randn(4, 1, 80, 208)
    assert tagger.train()(x).shape == (4, 7) and 0 < seen[-1] < 65
    assert tagger.eval()(x).shape == (4, 7) and seen[-1] == 65
    frames = AudioTagger(model.encoder, 7, "frames")
    assert frames.head.fc.in_features == 5 * 64 and frames.eval()(x).shape == (4, 7)
    with pytest.raises(ValueError, match="Eq. 2"):
        AudioTagger(model.encoder, 7, "frames", training_mask=0.5)


# ------------------------------------------------------------------------------------- SpecAugment, mixup
def test_spec_augment_masks_the_drawn_bands():
    x = torch.ones(2, 1, 6, 10)
    out = mask_bands(x, -2, torch.tensor([1, 4]), torch.tensor([2, 0]))
    assert torch.equal(out[0, 0, :, 0], torch.tensor([1.0, 0, 0, 1, 1, 1])) and torch.equal(out[1], x[1])
    out = mask_bands(x, -1, torch.tensor([7, 0]), torch.tensor([3, 1]))
    assert out[0, 0, 0].tolist() == [1] * 7 + [0] * 3 and out[1, 0, 0].tolist() == [0] + [1] * 9

    B = 16
    masked = spec_augment(torch.ones(B, 1, 80, 208), 30, 192, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    (fs, fw), (ts, tw) = sample_bands(B, 80, 30, g), sample_bands(B, 208, 192, g)
    assert (fw < 30).all() and (tw < 192).all() and (fs + fw <= 80).all() and (ts + tw <= 208).all()
    assert len(set(fw.tolist())) > 1  # one band per clip, not one per batch
    zero = masked[:, 0] == 0
    assert torch.equal(zero.all(2).sum(1), fw) and torch.equal(zero.all(1).sum(1), tw)
    for b in range(B):
        assert zero[b, fs[b] : fs[b] + fw[b]].all() and zero[b, :, ts[b] : ts[b] + tw[b]].all()
    assert zero.float().mean() < 1


def test_mixup_mixes_labels_and_log_mels():
    torch.manual_seed(0)
    lms = torch.randn(4, 1, 8, 5) - 7.0
    y = torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]])
    lam, perm = torch.tensor([0.25, 1.0, 0.0, 0.6]), torch.tensor([1, 2, 3, 0])
    x, t = mix(lms, y, lam, perm)
    assert torch.allclose(t.sum(1), lam * y.sum(1) + (1 - lam) * y[perm].sum(1))
    assert torch.allclose(t[0], torch.tensor([0.25, 0.75, 0.75]))
    expected = torch.log(0.25 * lms[0].exp() + 0.75 * lms[1].exp())
    assert torch.allclose(x[0], expected, atol=1e-5)
    assert torch.allclose(x[1], lms[1]) and torch.allclose(x[2], lms[3])  # lam 1 and 0 keep one side exactly
    lin, _ = mix(lms, y, lam, perm, log_mixup_exp=False)
    assert torch.allclose(lin[3], 0.6 * lms[3] + 0.4 * lms[0])

    one_hot = torch.eye(5)[torch.randint(0, 5, (64,))]
    x, t = mixup(torch.randn(64, 1, 8, 5), one_hot, alpha=0.5)
    assert torch.allclose(t.sum(1), torch.ones(64)) and ((t >= 0) & (t <= 1)).all()
    assert (t.max(1).values < 1).any()  # something was mixed
    assert mixup(lms, y, 0.0)[1] is y


# -------------------------------------------------------------------------------------------------- LARS
def test_lars_step_matches_the_formula():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w, b]}], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])  # ||g|| = 2
    opt.step()
    ratio = 0.01 * 5 / (2 + 0.1 * 5 + 1e-8)
    step1 = ratio * (torch.tensor([[0.0, 2.0]]) + 0.1 * torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * step1)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 0.5]))  # 1-D: no ratio, no decay
    w0 = w.detach().clone()
    w.grad, b.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([0.5])
    opt.step()
    ratio2 = 0.01 * w0.norm() / (1.0 + 0.1 * w0.norm() + 1e-8)
    step2 = 0.9 * step1 + ratio2 * (torch.tensor([[1.0, 0.0]]) + 0.1 * w0)
    assert torch.allclose(w.detach(), w0 - 0.5 * step2, atol=1e-6)
    assert torch.allclose(b.detach(), torch.tensor([0.75 - 0.5 * (0.9 * 0.5 + 0.5)]))


def test_lars_without_decay_is_momentum_sgd_as_the_official_run():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    lars = LARS(a.parameters(), lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, opt in ((a, lars), (b, sgd)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)


def test_lars_converges_on_a_toy_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    true = nn.Linear(8, 4)
    y = true(x).detach()
    model = nn.Linear(8, 4)
    opt = LARS(
        [{"params": [model.weight]}, {"params": [model.bias], "lars_adapt": False}],
        lr=1.0,
        trust_coefficient=0.02,
        always_adapt=True,
    )
    first = None
    for step in range(400):
        for g in opt.param_groups:
            g["lr"] = 0.5 * (1 + np.cos(np.pi * step / 400))  # cosine, as the fine-tuning schedule
        loss = (model(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first
    assert torch.allclose(model.weight, true.weight, atol=0.02)


# --------------------------------------------------------------------------------------------------- mAP
def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    return _ap(target.numpy(), scores.double().numpy())


def test_map_hand_computed():
    scores = torch.tensor([[0.9, 0.9, 0.5], [0.8, 0.8, 0.5], [0.7, 0.7, 0.1], [0.6, 0.6, 0.2]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0]])
    # class 0: hits at ranks 1 and 3 -> 1/2 * 1 + 1/2 * 2/3; class 1: ranks 2 and 4 -> 1/2 * 1/2 + 1/2 * 2/4
    assert average_precision(scores[:, 0], targets[:, 0]) == pytest.approx(5 / 6)
    assert average_precision(scores[:, 1], targets[:, 1]) == pytest.approx(0.5)
    # class 2: the two 0.5s tie (one threshold: P = 1/2 at R = 1/2), then 0.2 (P = 2/3 at R = 1)
    ties = torch.tensor([0.5, 0.5, 0.1, 0.2])
    assert average_precision(ties, torch.tensor([1, 0, 0, 1])) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    mAP, aps, _ = mean_average_precision(targets[:, :2], scores[:, :2], no_positive="exclude")
    assert mAP == pytest.approx((5 / 6 + 0.5) / 2)
    mAP, aps, _ = mean_average_precision(
        torch.cat([targets[:, :2], torch.zeros(4, 1)], 1), scores, no_positive="exclude"
    )
    assert np.isnan(aps[2]) and mAP == pytest.approx((5 / 6 + 0.5) / 2)  # no positive: left out


def test_map_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = (rng.random((50, 6)) < 0.3).astype(int)
    s = np.round(rng.random((50, 6)), 1)  # rounded: many ties
    mAP, aps, _ = mean_average_precision(torch.from_numpy(y), torch.from_numpy(s), no_positive="exclude")
    assert np.allclose(aps, metrics.average_precision_score(y, s, average=None))
    assert mAP == pytest.approx(metrics.average_precision_score(y, s, average="macro"))


@pytest.mark.slow
def test_importing_the_tagger_does_not_import_accelerate():
    import subprocess
    import sys

    code = (
        "import sys, m2dclap.tagging, m2dclap.augment, m2dclap.data.labelled; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'accelerate' or m.startswith('m2dclap.train')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
