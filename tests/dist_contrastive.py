"""Run by tests/test_distributed.py under ``accelerate launch --multi_gpu --num_processes 2` (torchrun; the
script asks for the CPU)`.

Each process takes its half of one global batch; the DDP-averaged gradients and the loss must equal those
of a single process on the whole batch (computed here on rank 0 with a copy of the same model).
"""

import copy
import json
import sys

import torch
from accelerate import Accelerator

import m2dclap
from m2dclap.clap import ContrastiveLoss
from m2dclap.m2d import M2DCLAPPretrainer


def loss_modes(acc: Accelerator) -> dict:
    """ContrastiveLoss alone, local rows and full logits, with and without positive groups: this process's
    loss value and feature gradients against one process on the global batch. The gather's backward sums the
    gradient of every copy of a feature into its owner, so each process's feature gradient is world_size
    times the single-process one (DDP's average over processes then restores the scale of the parameters)."""
    g = torch.Generator().manual_seed(2)
    a, t = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 2, 5])  # clips 0 and 2 twice, in both halves
    scale = torch.tensor(7.0)
    n = 8 // acc.num_processes
    part = slice(acc.process_index * n, (acc.process_index + 1) * n)
    out = {}
    for local in (True, False):
        for use_groups in (False, True):
            ref_a, ref_t = a.clone().requires_grad_(), t.clone().requires_grad_()
            ref = ContrastiveLoss()(ref_a, ref_t, scale, groups if use_groups else None)["contrastive_loss"]
            ref.backward()
            la, lt = a[part].clone().requires_grad_(), t[part].clone().requires_grad_()
            loss = ContrastiveLoss(acc.num_processes, acc.process_index, local_loss=local)(
                la, lt, scale, groups[part] if use_groups else None
            )["contrastive_loss"]
            loss.backward()
            grad_diff = max(
                (la.grad / acc.num_processes - ref_a.grad[part]).abs().max().item(),
                (lt.grad / acc.num_processes - ref_t.grad[part]).abs().max().item(),
            )
            out[f"local={local},groups={use_groups}"] = {
                "loss_diff": abs(loss.item() - ref.item()),
                "grad_diff": grad_diff,
            }
    return out


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = m2dclap.get_model_config("tiny", **{"text.kind": "sentence", "text.width": 48, "encoder.depth": 1})
    model = m2dclap.M2DCLAP(cfg)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    lms, text = torch.randn(8, 1, 80, 64, generator=g), torch.randn(8, 48, generator=g)
    # Masking off (mask_ratio 0) and lambda_m2d 0: the batch's random masks are drawn per process, so a split
    # batch would get other masks than the global one; without masking the two runs see the same tokens and
    # only the gathering of the contrastive loss differs, which is what this checks.
    trainer = M2DCLAPPretrainer(
        model, mask_ratio=0.0, lambda_m2d=0.0, lambda_clap=1.0, world_size=acc.num_processes, rank=acc.process_index
    )
    modes = loss_modes(acc)
    trainer = acc.prepare(trainer)
    n = 8 // acc.num_processes
    part = slice(acc.process_index * n, (acc.process_index + 1) * n)
    out = trainer(lms[part], text_emb=text[part])
    acc.backward(out["loss"])
    grads = {k: p.grad.clone() for k, p in acc.unwrap_model(trainer).model.named_parameters() if p.grad is not None}
    if acc.is_main_process:
        single = M2DCLAPPretrainer(reference, mask_ratio=0.0, lambda_m2d=0.0, lambda_clap=1.0)
        ref_out = single(lms, text_emb=text)
        ref_out["loss"].backward()
        ref = {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}
        diffs = {k: (grads[k] - ref[k]).abs().max().item() for k in ref}
        close = all(torch.allclose(grads[k], ref[k], rtol=1e-5, atol=1e-5) for k in ref)
        scale = max(ref[k].abs().max().item() for k in ref)
        json.dump(
            {
                "world": acc.num_processes,
                "loss": out["loss"].item(),
                "ref_loss": ref_out["loss"].item(),
                "max_grad_diff": max(diffs.values()),
                "grad_scale": scale,
                "n_params": len(ref),
                "allclose_1e-5": close,
                "missing": sorted(set(ref) - set(grads)),
                "loss_modes": modes,
            },
            open(out_path, "w"),
        )
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
