"""The training engine on a toy regression task: mid-epoch resume equals a straight run, gradient
accumulation equals the large batch, top-k keeping, the bad-batch refill, evaluation gathering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from m2dclap.train.engine import (
    Engine,
    KeepBest,
    LoopCfg,
    gather_for_metrics,
    latest_checkpoint,
    lr_at,
    make_accelerator,
    repeat_rows,
)


class Points(Dataset):
    """y = x . w + 0.1 noise, 32 points in 3-D; item ``i`` is dropped as "bad" when listed in ``bad``."""

    def __init__(self, bad: set[int] = frozenset()):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(32, generator=g)
        self.bad = bad

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        return {"bad": i} if i in self.bad else {"x": self.x[i], "y": self.y[i], "i": i}


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "bad" not in it]
    return {
        "x": torch.stack([it["x"] for it in good]) if good else None,
        "y": torch.stack([it["y"] for it in good]) if good else None,
        "skipped": [f"item{it['bad']}" for it in items if "bad" in it],
        "rows": len(good),
    }


def step(model: torch.nn.Module, batch: dict) -> dict:
    return {"loss": ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()}


def make_engine(
    out: Path,
    *,
    epochs: int = 3,
    max_steps: int = 0,
    batch: int = 8,
    accum: int = 1,
    evaluate=None,
    keep: KeepBest | None = None,
    metric: str = "",
    keep_top: int = 1,
    data: Dataset | None = None,
    rows=None,
    checkpoint_every: int = 0,
) -> Engine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    acc = make_accelerator("no", accum, out)
    loader = DataLoader(
        data or Points(), batch_size=batch, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    cfg = LoopCfg(
        output_dir=str(out),
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch,
        log_every=1,
        checkpoint_every=checkpoint_every,
        metric=metric,
        keep_top=keep_top,
    )
    return Engine(
        acc,
        cfg,
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        step,
        lambda engine: lr_at(engine.state.step, 12, 2, 0.1, 0.01),
        evaluate=evaluate,
        keep=keep,
        rows=rows,
    )


def weights(engine: Engine) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in engine.acc.unwrap_model(engine.model).parameters()])


def test_mid_epoch_resume_equals_a_straight_run(tmp_path):
    straight = make_engine(tmp_path / "a")
    straight.fit()
    first = make_engine(tmp_path / "b", max_steps=6)  # 4 batches per epoch: stops at batch 2 of epoch 1
    first.fit()
    saved = json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())
    assert saved == {"step": 6, "epoch": 1, "batch_in_epoch": 2}
    resumed = make_engine(tmp_path / "b")
    assert resumed.resume("toy", {})
    assert resumed.state.step == 6
    resumed.fit()
    assert resumed.state.step == straight.state.step == 12
    assert torch.equal(weights(resumed), weights(straight))
    assert not torch.equal(weights(first), weights(straight))


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    big = make_engine(tmp_path / "big", batch=8)
    big.fit()
    small = make_engine(tmp_path / "small", batch=4, accum=2)  # the seeded sampler: the same 8 items per step
    assert small.steps_per_epoch == big.steps_per_epoch == 4
    small.fit()
    assert small.state.step == big.state.step == 12
    assert torch.allclose(weights(small), weights(big), atol=1e-6)
    assert not torch.allclose(weights(make_engine(tmp_path / "untrained", epochs=0)), weights(big))  # it trained


def test_top_k_keeps_the_best_folders_and_deletes_the_rest(tmp_path):
    scores = iter([0.1, 0.5, 0.3, 0.5, float("nan")])

    def save(folder: Path, entry: dict) -> None:
        folder.mkdir(parents=True)
        (folder / "score").write_text(str(entry["score"]))

    engine = make_engine(
        tmp_path,
        epochs=4,
        evaluate=lambda engine: {"score": next(scores)},
        metric="score",
        keep_top=2,
        keep=KeepBest(lambda e: tmp_path / "kept" / f"e{e['epoch']}", save),
    )
    engine.cfg.eval_at_start = True
    engine.fit()
    assert [e["epoch"] for e in engine.state.evals] == [0, 1, 2, 3, 4]
    assert [(k["epoch"], k["score"]) for k in engine.state.kept] == [(1, 0.5), (3, 0.5)]  # ties: the earlier first
    assert sorted(d.name for d in (tmp_path / "kept").iterdir()) == ["e1", "e3"]


def test_one_best_folder_is_overwritten_only_by_a_better_model(tmp_path):
    scores = iter([0.2, 0.1, 0.4])
    saved = []
    engine = make_engine(
        tmp_path,
        epochs=3,
        evaluate=lambda engine: {"acc": next(scores)},
        metric="acc",
        keep=KeepBest(lambda e: tmp_path / "best", lambda f, e: saved.append(e["epoch"])),
    )
    engine.fit()
    assert saved == [1, 3] and engine.state.best["score"] == 0.4


def test_bad_rows_are_refilled_and_an_all_bad_first_batch_is_an_error(tmp_path):
    seen = []

    def counting_step(model, batch):
        seen.append(batch["x"].shape[0])
        return step(model, batch)

    engine = make_engine(tmp_path / "a", epochs=1, data=Points(bad={0, 1, 2}), rows=lambda b: b["rows"])
    engine.step_fn = counting_step
    engine.fit()
    assert set(seen) == {8} and engine.state.skipped == 3
    assert engine.skipped_items == {"item0", "item1", "item2"}
    first_batch = set(range(32))  # every item bad: the first batch cannot be refilled
    engine = make_engine(tmp_path / "b", epochs=1, data=Points(bad=first_batch), rows=lambda b: b["rows"])
    with pytest.raises(ValueError, match="only unreadable clips: .*item"):
        engine.fit()


def test_repeat_rows_keeps_per_batch_entries():
    batch = {"x": torch.arange(2), "names": ["a", "b"], "skipped": ["c"], "size": 2}
    out = repeat_rows(batch, 5, 2)
    assert out["x"].tolist() == [0, 1, 0, 1, 0] and out["names"] == ["a", "b", "a", "b", "a"]
    assert out["skipped"] == ["c"] and out["size"] == 2


def test_gather_for_metrics_concatenates_every_batch(tmp_path):
    acc = make_accelerator("no", 1, tmp_path)
    loader = acc.prepare(DataLoader(Points(), batch_size=5, collate_fn=collate))
    xs, ys = gather_for_metrics(acc, loader, lambda b: (b["x"], b["y"]))
    assert xs.shape == (32, 3) and torch.equal(ys, Points().y)


def test_downstream_packages_use_only_the_public_engine_of_m2dclap_train():
    import ast

    root = Path(__file__).resolve().parents[1]
    bad = []
    for package in ("retrieval", "zeroshot", "captioning"):
        for path in sorted((root / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("m2dclap"):
                    if node.module.startswith("m2dclap.train") and node.module != "m2dclap.train.engine":
                        bad.append(f"{path.name}: {node.module}")
                    bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def test_checkpoints_beyond_keep_checkpoints_are_pruned_and_half_written_ones_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "ckpt-00000099").mkdir(parents=True)
    (root / "ckpt-00000099" / "state.json").write_text("{")  # killed while writing its marker
    engine = make_engine(tmp_path, epochs=1, checkpoint_every=1)  # 4 steps, a checkpoint after each
    engine.fit()
    complete = sorted(d.name for d in root.glob("ckpt-*") if d.name != "ckpt-00000099")
    assert complete == ["ckpt-00000003", "ckpt-00000004"]  # keep_checkpoints=2: the two latest
    assert latest_checkpoint(tmp_path).name == "ckpt-00000004"
