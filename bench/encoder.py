"""Throughput of the M2D audio path: frontend, chunked ViT encoder, whole ``audio_features``.

    python bench/encoder.py [--preset base] [--threads N] [--batch 4] [--seconds 10] [--repeats 5]

Prints figures, asserts nothing. Every figure is the median of ``--repeats`` timed runs after
``--warmup`` untimed ones, on a batch of ``--batch`` clips of ``--seconds`` s of noise. The text tower
is switched off (``text.kind = none``) so no BERT weights are needed. On a CUDA machine the same
figures are printed again for bf16 autocast on the GPU.

Reference figures:
  * fp32 ``torch.matmul`` on 4096x4096 (2*4096^3 FLOPs): what this machine's GEMM reaches.
  * nnAudio's ``MelSpectrogram`` (the official frontend), when installed.
  * the official runtime's chunk loop: each chunk of the batch through ``forward_features`` in turn.
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import m2dclap
from m2dclap.audio import LogMelSpectrogram
from m2dclap.config import EncoderCfg, FrontendCfg


# -- analytic FLOPs ------------------------------------------------------------------------------------
def vit_chunk_flops(cfg: EncoderCfg, frames: int) -> float:
    """FLOPs (2 per multiply-add) of one chunk of ``frames`` log-mel frames through the encoder.

    Counts the patch-embedding conv, the qkv / proj / fc1 / fc2 matmuls and attention's QK^T and AV.
    LayerNorm, GELU, softmax and the residual adds are not counted (they are O(N*D), not O(N*D^2)).
    """
    pf, pt = cfg.patch_size
    n_patch = (cfg.input_size[0] // pf) * (frames // pt)
    n = n_patch + 1  # + CLS
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    macs = n_patch * d * pf * pt  # patch embedding: a (pf*pt) -> d projection per patch
    per_block = n * d * 3 * d + n * d * d + 2 * n * d * hidden  # qkv, proj, fc1 + fc2
    per_block += 2 * n * n * d  # QK^T and AV over all heads: H * N^2 * (D/H) each
    return 2.0 * (macs + cfg.depth * per_block)


def chunk_frames(cfg: EncoderCfg, total_frames: int) -> list[int]:
    """Frames of each chunk after the official padding rule (see ``AudioEncoder.encode_lms``)."""
    unit, p = cfg.input_size[1], cfg.patch_size[1]
    total = total_frames + (p - (total_frames % unit % p)) % p
    return [min(unit, total - s) for s in range(0, total, unit)]


# -- timing --------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int, sync: Callable[[], None],
                  n: int = 4096) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: torch.matmul(a, b), repeats=max(3, repeats // 2), warmup=1, sync=sync)
    return 2.0 * n ** 3 / sec / 1e9


def official_chunk_loop(model: m2dclap.M2DCLAP, lms: torch.Tensor) -> torch.Tensor:
    """The public runtime's ``encode_lms``: pad, then one ``forward_features`` call per chunk index."""
    enc = model.encoder
    unit, p = enc.cfg.input_size[1], enc.cfg.patch_size[1]
    pad = (p - (lms.shape[-1] % unit % p)) % p
    x = F.pad(lms, (0, pad)) if pad else lms
    outs = []
    for i in range(math.ceil(x.shape[-1] / unit)):
        z = enc.forward_features(x[..., i * unit:(i + 1) * unit])[:, 1:]  # drop CLS: (B, F'*t, D)
        outs.append(z.unflatten(1, (enc.grid_size[0], -1)))  # (B, F', t, D)
    return torch.cat(outs, dim=2)


def per_clip_chunk_loop(model: m2dclap.M2DCLAP, lms: torch.Tensor) -> torch.Tensor:
    """One clip and one chunk per forward (batch size 1), the slowest way to run the same model."""
    return torch.cat([official_chunk_loop(model, lms[i:i + 1]) for i in range(lms.shape[0])])


# -- the bench -----------------------------------------------------------------------------------------
def bench_device(args: argparse.Namespace, model: m2dclap.M2DCLAP, device: torch.device, amp: bool) -> None:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    label = f"{device.type}, {'bf16 autocast' if amp else 'fp32'}"
    model = model.to(device)
    sr = model.sample_rate
    gen = torch.Generator().manual_seed(0)
    waves = (0.1 * torch.randn(args.batch, int(args.seconds * sr), generator=gen)).to(device)
    audio_s = args.batch * args.seconds

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    print(f"\n== {args.preset} on {label}: {args.batch} clips x {args.seconds:g} s at {sr} Hz, "
          f"{torch.get_num_threads()} CPU threads ==")

    # GEMM reference, in the precision the encoder runs in.
    gemm = matmul_gflops(device, torch.float32, args.repeats, sync)
    print(f"fp32 matmul 4096x4096:            {gemm:9.1f} GFLOP/s")
    if amp:
        gemm_bf16 = matmul_gflops(device, torch.bfloat16, args.repeats, sync)
        print(f"bf16 matmul 4096x4096:            {gemm_bf16:9.1f} GFLOP/s")

    # Frontend: ours vs nnAudio on the same batch.
    fe = LogMelSpectrogram(model.cfg.frontend).to(device)
    with torch.no_grad():
        t_ours = timed(lambda: fe(waves), args.repeats, args.warmup, sync)
    print(f"frontend LogMelSpectrogram:       {audio_s / t_ours:9.0f} audio-s/s  ({t_ours * 1e3:.2f} ms)")
    try:
        from nnAudio.features import MelSpectrogram
    except ImportError:
        print("frontend nnAudio:                 not installed (pip install nnAudio) - no ratio")
    else:
        c: FrontendCfg = model.cfg.frontend
        ref = MelSpectrogram(sr=c.sample_rate, n_fft=c.n_fft, win_length=c.win_length, hop_length=c.hop_length,
                             n_mels=c.n_mels, fmin=c.f_min, fmax=c.f_max, center=True, power=2,
                             verbose=False).to(device)
        eps = torch.finfo().eps
        with torch.no_grad():
            t_ref = timed(lambda: (ref(waves) + eps).log(), args.repeats, args.warmup, sync)
            diff = ((ref(waves) + eps).log() - fe(waves)).abs().max().item()
        print(f"frontend nnAudio (official):      {audio_s / t_ref:9.0f} audio-s/s  ({t_ref * 1e3:.2f} ms)")
        print(f"frontend speed-up vs nnAudio:     {t_ref / t_ours:9.2f} x   (target >= 1.3; "
              f"max |log-mel diff| {diff:.2e})")

    # Whole audio path.
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), autocast():
        t_all = timed(lambda: model.audio_features(waves), args.repeats, args.warmup, sync)
    mem = (f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB" if cuda
           else f"peak RSS {peak_rss_mib():.0f} MiB")
    print(f"audio_features:                   {args.batch / t_all:9.2f} clips/s, real-time factor "
          f"{audio_s / t_all:.1f} audio-s per wall-s ({t_all * 1e3:.0f} ms; {mem})")

    # Encoder alone, on the normalised log-mel.
    with torch.no_grad():
        lms = model.log_mel(waves)  # (B, 1, F, T)
    chunks = chunk_frames(model.cfg.encoder, lms.shape[-1])
    flops = args.batch * sum(vit_chunk_flops(model.cfg.encoder, f) for f in chunks)
    print(f"encoder input: {lms.shape[-1]} frames -> chunks of {chunks} frames; "
          f"{flops / 1e9:.1f} GFLOP for the batch")
    with torch.no_grad(), autocast():
        t_enc = timed(lambda: model.encoder.encode_lms(lms), args.repeats, args.warmup, sync)
        t_loop = timed(lambda: official_chunk_loop(model, lms), args.repeats, args.warmup, sync)
        t_clip = timed(lambda: per_clip_chunk_loop(model, lms), args.repeats, args.warmup, sync)
    achieved = flops / t_enc / 1e9
    print(f"encoder encode_lms (batched):     {achieved:9.1f} GFLOP/s = {achieved / gemm:.2f} of fp32 matmul "
          f"(target >= 0.8) ({t_enc * 1e3:.0f} ms)")
    print(f"baseline: chunk loop (official):  {flops / t_loop / 1e9:9.1f} GFLOP/s ({t_loop * 1e3:.0f} ms; "
          f"batched is {t_loop / t_enc:.2f}x)")
    print(f"baseline: one clip, one chunk:    {flops / t_clip / 1e9:9.1f} GFLOP/s ({t_clip * 1e3:.0f} ms; "
          f"batched is {t_clip / t_enc:.2f}x)")
    if not cuda:
        print(f"peak RSS after all runs:          {peak_rss_mib():9.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="base", help="architecture preset (m2dclap.list_models())")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--batch", type=int, default=4, help="clips per batch")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length in seconds")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA figures even if a GPU is present")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = m2dclap.M2DCLAP(m2dclap.get_model_config(args.preset, **{"text.kind": "none"})).eval()
    print(f"torch {torch.__version__}; preset {args.preset}: encoder {model.cfg.encoder.input_size} chunks, "
          f"patch {model.cfg.encoder.patch_size}, D {model.cfg.encoder.embed_dim}, depth {model.cfg.encoder.depth}")
    bench_device(args, model, torch.device("cpu"), amp=False)
    if torch.cuda.is_available() and not args.cpu_only:
        bench_device(args, model, torch.device("cuda"), amp=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
