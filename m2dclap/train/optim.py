"""Optimiser and schedule helpers of the training engine: AdamW parameter groups, the shuffled training loader,
and the warm-up + half-cosine learning rate of the official M2D code."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from .engine import Engine


def shuffled_loader(ds, cfg: Any, collate_fn, what: str = "training clips") -> DataLoader:
    """The training loader of a run: ``cfg``'s batch_size, num_workers and seed, shuffled, last partial batch
    dropped (the sampler's generator is seeded, so a resumed run sees the same order)."""
    loader = DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    if len(loader) == 0:
        raise ValueError(f"{len(ds)} {what} are fewer than one batch of {cfg.batch_size}")
    return loader


def param_groups(module: torch.nn.Module, weight_decay: float, no_decay_names: set[str]) -> list[dict]:
    """AdamW groups: no decay for biases, norms and other 1-D parameters or tokens."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        short = name.split("model.", 1)[-1]
        (no_decay if p.ndim <= 1 or short in no_decay_names or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def loader_and_adamw(
    cfg: Any,
    ds,
    collate_fn,
    module: torch.nn.Module,
    no_weight_decay: set[str],
    num_processes: int,
    what: str = "training clips",
):
    """The shuffled training loader and AdamW of a contrastive run (pretraining, stage 2.1 fine-tuning) from
    ``cfg``'s batch_size, grad_accum, lr, blr, weight_decay, betas, num_workers and seed:
    ``(loader, optimizer, peak lr, effective batch)``; the peak is ``lr`` or ``blr`` x effective batch / 256."""
    loader = shuffled_loader(ds, cfg, collate_fn, what)
    eff_batch = cfg.batch_size * cfg.grad_accum * num_processes
    peak = cfg.lr if cfg.lr > 0 else cfg.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(
        param_groups(module, cfg.weight_decay, no_weight_decay), lr=peak, betas=tuple(cfg.betas)
    )
    return loader, optimizer, peak, eff_batch


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak`` then half-cosine to ``floor``, per optimiser step.

    Written out rather than transformers' ``get_cosine_schedule_with_warmup``: that one ends at 0, the official
    M2D schedule at ``min_lr``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def cosine_schedule(
    peak: float, floor: float, warmup_epochs: float, total_epochs: int = 0
) -> Callable[[Engine], float]:
    """The engine's ``schedule`` for :func:`lr_at`: warm-up in epochs; the cosine ends at the engine's stop
    step, or after ``total_epochs`` when given (then ``--max-steps`` stops part-way down the cosine)."""

    def schedule(engine: Engine) -> float:
        spe = engine.steps_per_epoch
        total = total_epochs * spe if total_epochs else engine.stop
        return lr_at(engine.state.step, total, int(warmup_epochs * spe), peak, floor)

    return schedule
