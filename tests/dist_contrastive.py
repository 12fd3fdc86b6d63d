"""Run by tests/test_distributed.py under ``accelerate launch --multi_gpu --num_processes 2` (torchrun; the script asks for the CPU)`.

Each process takes its half of one global batch; the DDP-averaged gradients and the loss must equal those
of a single process on the whole batch (computed here on rank 0 with a copy of the same model).
"""
import copy
import json
import sys

import torch
from accelerate import Accelerator

import m2dclap
from m2dclap.m2d import M2DCLAPPretrainer


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = m2dclap.get_model_config("tiny", **{"text.kind": "sentence", "text.width": 48, "encoder.depth": 1})
    model = m2dclap.M2DCLAP(cfg)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    lms, text = torch.randn(8, 1, 80, 64, generator=g), torch.randn(8, 48, generator=g)
    # Mask ratio 0.7 with lambda_m2d 0: masking is random per sample; a per-sample generator keeps the masks
    # of the split batches equal to the global batch's.
    trainer = M2DCLAPPretrainer(model, mask_ratio=0.0, lambda_m2d=0.0, lambda_clap=1.0,
                                world_size=acc.num_processes, rank=acc.process_index)
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
        json.dump({"world": acc.num_processes, "loss": out["loss"].item(), "ref_loss": ref_out["loss"].item(),
                   "max_grad_diff": max(diffs.values()), "grad_scale": scale, "n_params": len(ref), "allclose_1e-5": close,
                   "missing": sorted(set(ref) - set(grads))}, open(out_path, "w"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
