"""The training engine: the one Accelerate loop every training task runs on.

    prepare -> [skip_first_batches] -> accumulate -> backward -> clip_grad_norm_ -> step -> after_update (EMA)
            -> log -> save_state (atomic, the data position inside) -> evaluate (gather_for_metrics) -> keep best

A task brings its model, optimiser, loader and a step function ``batch -> {"loss": ..., ...}``, optionally an
evaluation function ``() -> {metric: value}`` and hooks; the engine owns the loop (audiocraft's solvers, HF
Trainer's callbacks). The step counter and the position in the epoch live in the saved state
(``TrainState``), never in a directory name, so every task resumes mid-epoch after a kill exactly where it
stopped: the samplers are seeded per epoch and ``skip_first_batches`` skips what was already trained on.

    accelerator, out = start_run(cfg, "config.json")
    engine = Engine(accelerator, LoopCfg(output_dir=str(out), epochs=10, metric="val_map"), model, optimizer,
                    loader, step_fn=lambda model, batch: {"loss": loss_of(model, batch)},
                    schedule=cosine_schedule(peak, floor, warmup_epochs), evaluate=validate,
                    keep=KeepBest(lambda entry: out / "best", save_model))
    engine.resume("run", cfg.to_dict()) if resume else engine.start_trackers("run", cfg.to_dict())
    history = engine.fit()  # engine.state: step, epoch, evals, kept (best first)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

# the run's saved state and checkpoints live in checkpoints.py, the optimiser and schedule in optim.py;
# public from here as before
from .checkpoints import KeepBest, TrainState, latest_checkpoint, save_checkpoint
from .optim import cosine_schedule, loader_and_adamw, lr_at, param_groups, shuffled_loader  # noqa: F401

log = logging.getLogger(__name__)

Batch = dict[str, Any]
StepFn = Callable[[torch.nn.Module, Batch], dict[str, torch.Tensor]]  # (prepared model, batch) -> {"loss": ...}


RUN_FIELDS = "output_dir epochs max_steps batch_size clip_grad checkpoint_every keep_checkpoints log_every".split()


@dataclass
class LoopCfg:
    """How the engine runs a task; each task fills it from its own options."""

    output_dir: str  # run folder: checkpoints and the kept models live under it
    epochs: int  # passes over the training loader
    max_steps: int = 0  # stop after this many optimiser steps (0 = all epochs)
    batch_size: int = 0  # rows per process a batch that lost bad clips is refilled to (0 = no refill)
    clip_grad: float = 0.0  # gradient-norm clip (0 = off)
    checkpoint_every: int = 0  # optimiser steps between resumable checkpoints (0 = none mid-epoch)
    checkpoint_epochs: bool = False  # also save a resumable checkpoint after every epoch
    keep_checkpoints: int = 2  # resumable checkpoints kept
    checkpoint_dir: str = "checkpoints"  # folder of the resumable checkpoints, inside output_dir
    log_every: int = 10  # optimiser steps between log lines
    eval_epochs: bool = True  # evaluate after every epoch (when the task has an evaluation)
    eval_at_start: bool = False  # evaluate once before training (the starting point of a fine-tuning)
    metric: str = ""  # evaluation key that selects the kept models (higher is better; empty = keep none)
    keep_top: int = 1  # models kept by the metric
    name: str = "train"  # progress bar and log prefix

    @classmethod
    def from_run(cls, run: Any, **fields: Any) -> "LoopCfg":
        """A loop whose run-level fields (output folder, epochs, steps, batch, clip, checkpointing, logging) come
        from a task's config where it has them; ``fields`` give the task's own choices."""
        return cls(**{k: getattr(run, k) for k in RUN_FIELDS if hasattr(run, k) and k not in fields}, **fields)


def make_accelerator(
    mixed_precision: str, grad_accum: int, out_dir: Path, tracker: str = "none", split_batches: bool = False
) -> Accelerator:
    """The run's accelerator: seedable samplers (exact resume), TensorBoard when asked for and installed."""
    log_with = None
    if tracker in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401  (optional)

            log_with = "tensorboard"
        except ImportError:
            if tracker == "tensorboard":
                raise ImportError("--tracker tensorboard needs the tensorboard package") from None
    # Without a GPU, ask for the CPU explicitly: then `accelerate launch --multi_gpu --num_processes N`
    # (torchrun) gives real multi-process CPU training instead of N unrelated single-process runs.
    has_gpu = torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    return Accelerator(
        cpu=not has_gpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=split_batches),
    )


def start_run(cfg: Any, config_name: str, split_batches: bool = False) -> tuple[Accelerator, Path]:
    """The accelerator of a run (from ``cfg``'s mixed_precision, grad_accum, tracker, seed, output_dir),
    the seed set, and the resolved config written into the run folder."""
    out_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(
        cfg.mixed_precision, getattr(cfg, "grad_accum", 1), out_dir, getattr(cfg, "tracker", "none"), split_batches
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / config_name).write_text(json.dumps(cfg.to_dict(), indent=2))
    return accelerator, out_dir


def repeat_rows(batch: Batch, size: int, n: int, keep: Sequence[str] = ("skipped",)) -> Batch:
    """The batch with its ``n`` rows repeated cyclically up to ``size``: every tensor with ``n`` rows and every
    list of ``n`` items, except the entries named in ``keep`` (per-batch, not per-row)."""
    idx = torch.arange(size) % n
    return {
        k: v
        if k in keep
        else v[idx]
        if isinstance(v, torch.Tensor) and v.shape[:1] == (n,)
        else [v[i] for i in idx.tolist()]
        if isinstance(v, list) and len(v) == n
        else v
        for k, v in batch.items()
    }


# ------------------------------------------------------------------------------------------- evaluation
def gather_for_metrics(
    accelerator: Accelerator, loader, fn: Callable[[Batch], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """``fn`` over an evaluation loader, its outputs gathered from every process (duplicates that pad the
    last batch dropped by ``gather_for_metrics``) and concatenated on the CPU."""
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for batch in loader:
            out = accelerator.gather_for_metrics(tuple(fn(batch)))
            parts = parts or [[] for _ in out]
            for acc_list, t in zip(parts, out):
                acc_list.append(t.cpu())
    return tuple(torch.cat(p) for p in parts)


# -------------------------------------------------------------------------------------------------- loop
class Engine:
    """One training run of a task. ``fit()`` trains to the end (or resumes to it) and returns the log history.

    ``step_fn(model, batch) -> {"loss": tensor, ...}`` runs the forward pass of one micro-batch on the
    prepared model (the engine calls ``backward``); ``schedule(engine) -> lr`` at ``engine.state.step``;
    ``after_update(engine)`` runs after every optimiser step, before the step counter moves (M2D's EMA
    target, the temperature clamp); ``evaluate(engine) -> {metric: value}``;
    ``rows(batch)`` counts a batch's good rows (0 = every clip was bad) for the bad-batch refill; ``refill``
    repeats rows up to ``cfg.batch_size``; ``on_epoch(epoch)`` reseeds the dataset's per-epoch draws;
    ``keep`` saves the models the metric ranks in the top k; ``after_eval(engine, entry)`` sees each
    evaluation (run summaries).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: LoopCfg,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader,
        step_fn: StepFn,
        schedule: Callable[[Engine], float],
        *,
        evaluate: Callable[[Engine], dict[str, Any]] | None = None,
        after_update: Callable[[Engine], None] | None = None,
        on_epoch: Callable[[int], None] | None = None,
        rows: Callable[[Batch], int] | None = None,
        refill: Callable[[Batch, int], Batch] | None = None,
        keep: KeepBest | None = None,
        after_eval: Callable[[Engine, dict[str, Any]], None] | None = None,
        state: TrainState | None = None,
        params: Sequence[torch.nn.Parameter] | None = None,
    ):
        self.acc, self.cfg = accelerator, cfg
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        self.step_fn, self.schedule, self.evaluate_fn = step_fn, schedule, evaluate
        self.after_update, self.on_epoch, self.rows, self.keep = after_update, on_epoch, rows, keep
        self.after_eval = after_eval
        self.refill = refill or (lambda batch, size: repeat_rows(batch, size, self.rows(batch)))
        self.params = list(params) if params is not None else [p for p in self.model.parameters() if p.requires_grad]
        self.state = state or TrainState()
        accelerator.register_for_checkpointing(self.state)
        self.out_dir = Path(cfg.output_dir)
        # Accelerate also steps on an epoch's last micro-batch (sync_with_dataloader): a short tail is a step
        self.steps_per_epoch = max(1, math.ceil(len(self.loader) / accelerator.gradient_accumulation_steps))
        horizon = cfg.epochs * self.steps_per_epoch
        self.stop = min(cfg.max_steps, horizon) if cfg.max_steps > 0 else horizon
        self.skipped_items: set[str] = set()  # what this process skipped since this start
        self.history: list[dict[str, float]] = []
        self._saved_step, self._epoch_losses, self._last_good = -1, [], None

    @property
    def done(self) -> bool:
        return self.state.step >= self.stop or self.state.epoch >= self.cfg.epochs

    def resume(self, run_name: str, config: dict[str, Any]) -> bool:
        """Load the latest complete checkpoint (the state object is restored with it); then start the
        trackers. True when a checkpoint was loaded."""
        ckpt = latest_checkpoint(self.out_dir, self.cfg.checkpoint_dir)
        if ckpt is None:
            log.info("no complete checkpoint in %s: starting from scratch", self.out_dir / self.cfg.checkpoint_dir)
        else:
            self.acc.load_state(str(ckpt))
            self._saved_step = self.state.step
            (log.info if self.acc.is_main_process else log.debug)(
                "resumed from %s at step %d (epoch %d)", ckpt, self.state.step, self.state.epoch
            )
        self.start_trackers(run_name, config)
        return ckpt is not None

    def start_trackers(self, run_name: str, config: dict[str, Any]) -> None:
        if self.acc.log_with and not self.acc.trackers:
            self.acc.init_trackers(run_name, config={k: str(v) for k, v in config.items()})

    def fit(self) -> list[dict[str, float]]:
        """Train to the stop step; evaluations and checkpoints as configured; returns the log history."""
        cfg, state = self.cfg, self.state
        if cfg.eval_at_start and not state.evals and self.evaluate_fn is not None:
            self.run_evaluation(train_loss=math.nan)
        bar = tqdm(
            total=self.stop,
            initial=state.step,
            desc=cfg.name,
            unit="step",
            disable=not self.acc.is_local_main_process,
            dynamic_ncols=True,
        )
        while not self.done:  # train/eval modes are the task's: its evaluation restores the mode it found
            if not self._epoch(bar):
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            if self.evaluate_fn is not None and cfg.eval_epochs:
                self.run_evaluation()
            if cfg.checkpoint_epochs:
                self.save()
        bar.close()
        if self.evaluate_fn is not None and (not state.evals or state.evals[-1]["step"] != state.step):
            self.run_evaluation()  # stopped mid-epoch: the last weights are evaluated too
        if self._saved_step != state.step:
            self.save()
        return self.history

    def _epoch(self, bar) -> bool:
        """Train on the rest of the current epoch; False when the stop step came first."""
        cfg, state, acc = self.cfg, self.state, self.acc
        if self.on_epoch is not None:
            self.on_epoch(state.epoch)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(state.epoch)
        batches = acc.skip_first_batches(self.loader, state.batch_in_epoch) if state.batch_in_epoch else self.loader
        running: dict[str, Any] = {}
        t0 = time.time()
        for batch in batches:
            state.batch_in_epoch += 1
            skipped = batch.get("skipped", []) if isinstance(batch, dict) else []
            state.skipped += len(skipped)
            self.skipped_items.update(str(s) for s in skipped)
            if self.rows is not None:
                n = self.rows(batch)
                if n == 0:  # every clip was bad: repeat the last good batch so that all processes
                    if self._last_good is None:  # still meet in the same collectives
                        raise ValueError(f"the first batch had only unreadable clips: {skipped}")
                    batch = self._last_good
                elif cfg.batch_size and n != cfg.batch_size:
                    batch = self.refill(batch, cfg.batch_size)
                self._last_good = batch
            with acc.accumulate(self.model):
                out = self.step_fn(self.model, batch)
                acc.backward(out["loss"])
                lr = self.schedule(self)
                if acc.sync_gradients and cfg.clip_grad > 0:
                    acc.clip_grad_norm_(self.params, cfg.clip_grad)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.optimizer.step()  # inside accumulate, Accelerate skips it until the gradients sync
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in out.items():  # summed on the device: a host sync only when a line is logged
                running[k] = running.get(k, 0.0) + v.detach()
            running["n"] = running.get("n", 0) + 1
            if self.evaluate_fn is not None:  # the epoch's mean loss goes into its evaluation entry
                self._epoch_losses.append(out["loss"].detach())
            if not acc.sync_gradients:
                continue
            if self.after_update is not None:
                self.after_update(self)
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == self.stop:
                self._log(running, lr, time.time() - t0, bar)
                running, t0 = {}, time.time()
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                self.save()
            if state.step >= self.stop:
                return state.batch_in_epoch >= len(self.loader)  # a stop on the last batch ends the epoch
        return True

    def _log(self, running: dict[str, Any], lr: float, seconds: float, bar) -> None:
        n = running.pop("n")
        logs = {k: float(v) / n for k, v in running.items()}
        rows = self.cfg.batch_size or 1
        logs.update(
            lr=lr,
            step=self.state.step,
            epoch=self.state.epoch,
            samples_per_s=n * rows * self.acc.num_processes / max(seconds, 1e-9),
        )
        self.history.append(logs)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        self.acc.log(logs, step=self.state.step)
        (log.info if self.acc.is_main_process else log.debug)(
            "%s step %d: %s",
            self.cfg.name,
            self.state.step,
            " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "step"),
        )

    def save(self) -> None:
        """A resumable checkpoint of this step."""
        save_checkpoint(self.acc, self.state, self.out_dir / self.cfg.checkpoint_dir, self.cfg.keep_checkpoints)
        self._saved_step = self.state.step

    def run_evaluation(self, train_loss: float | None = None) -> dict[str, Any]:
        """Evaluate, record the entry in the state, keep the model when the metric ranks it in the top k."""
        state = self.state
        if train_loss is None:
            train_loss = float(torch.stack(self._epoch_losses).mean()) if self._epoch_losses else math.nan
        self._epoch_losses = []
        t0 = time.perf_counter()
        metrics = self.evaluate_fn(self)
        partial = state.batch_in_epoch > 0  # stopped inside an epoch: it counts as that epoch, by its step
        entry = {
            "epoch": state.epoch + partial,
            "step": state.step,
            "train_loss": train_loss,
            **metrics,
            "eval_seconds": round(time.perf_counter() - t0, 2),
        }
        if partial:
            entry["partial_epoch"] = True
        state.evals.append(entry)
        self.acc.log({k: v for k, v in entry.items() if isinstance(v, (int, float))}, step=state.step)
        if self.cfg.metric and self.keep is not None:
            entry["kept"] = self._keep(entry)
        if self.acc.is_main_process:
            log.info(
                "%s step %d: evaluation %s%s",
                self.cfg.name,
                state.step,
                " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))),
                " (kept)" if entry.get("kept") else "",
            )
        if self.after_eval is not None:
            self.after_eval(self, entry)
        return entry

    def _keep(self, entry: dict[str, Any]) -> bool:
        score = entry.get(self.cfg.metric)
        if score is None or not score == score:  # NaN: nothing to rank
            return False
        folder = self.keep.folder(entry)
        ranked = sorted(
            self.state.kept
            + [{"score": float(score), "step": entry["step"], "epoch": entry["epoch"], "folder": str(folder)}],
            key=lambda k: (-k["score"], k["step"]),
        )
        kept, dropped = ranked[: self.cfg.keep_top], ranked[self.cfg.keep_top :]
        new = any(k["step"] == entry["step"] and k["folder"] == str(folder) for k in kept)
        if self.acc.is_main_process:
            if new:
                self.keep.save(folder, entry)
            for k in dropped:
                if all(k["folder"] != other["folder"] for other in kept):
                    shutil.rmtree(k["folder"], ignore_errors=True)
        self.acc.wait_for_everyone()
        self.state.kept = kept
        return new
