"""Throughput of the M2D audio path: frontend, chunked ViT encoder, whole ``audio_features``.

    python bench/encoder.py [--preset base] [--threads N] [--batch 4] [--seconds 10] [--repeats 5]

Prints figures, asserts nothing. Every figure is the median of ``--repeats`` timed runs after
``--warmup`` untimed ones (the best run in brackets), on a batch of ``--batch`` clips of ``--seconds`` s
of noise; a figure and its reference are timed in turns. The text tower is switched off
(``text.kind = none``) so no BERT weights are needed. On a CUDA machine the same figures are printed
again for bf16 autocast on the GPU. Encoder FLOPs are counted analytically (``vit_chunk_flops``; its
matmul and conv part equals ``torch.utils.flop_counter`` on the base preset).

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
def timed(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, tuple[float, float]]:
    """(median, best) wall seconds of each ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    The functions take turns (a b c a b c ...), so a figure and its reference see the same machine load.
    On a shared machine the best run is the steadier estimate of what the code can do; the median is
    what a user sees. Both are reported.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def line(label: str, text: str) -> None:
    print(f"{label + ':':<34}{text}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def square_matmul(device: torch.device, dtype: torch.dtype, n: int = 4096) -> tuple[Callable[[], object], float]:
    """A GEMM reference: (run it, its FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.matmul(a, b)), 2.0 * n**3


def official_chunk_loop(model: m2dclap.M2DCLAP, lms: torch.Tensor) -> torch.Tensor:
    """The public runtime's ``encode_lms``: pad, then one ``forward_features`` call per chunk index."""
    enc = model.encoder
    unit, p = enc.cfg.input_size[1], enc.cfg.patch_size[1]
    pad = (p - (lms.shape[-1] % unit % p)) % p
    x = F.pad(lms, (0, pad)) if pad else lms
    outs = []
    for i in range(math.ceil(x.shape[-1] / unit)):
        z = enc.forward_features(x[..., i * unit : (i + 1) * unit])[:, 1:]  # drop CLS: (B, F'*t, D)
        outs.append(z.unflatten(1, (enc.grid_size[0], -1)))  # (B, F', t, D)
    return torch.cat(outs, dim=2)


def per_clip_chunk_loop(model: m2dclap.M2DCLAP, lms: torch.Tensor) -> torch.Tensor:
    """One clip and one chunk per forward (batch size 1), the slowest way to run the same model."""
    return torch.cat([official_chunk_loop(model, lms[i : i + 1]) for i in range(lms.shape[0])])


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
    R, W = args.repeats, args.warmup

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    print(
        f"\n== {args.preset} on {label}: {args.batch} clips x {args.seconds:g} s at {sr} Hz, "
        f"{torch.get_num_threads()} CPU threads =="
    )

    # 1. The whole audio path: waveform -> log-mel -> chunked encoder -> clip / frame features.
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mib()
    with torch.no_grad(), autocast():
        t_all, best_all = timed({"all": lambda: model.audio_features(waves)}, R, W, sync)["all"]
    mem = (
        f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        if cuda
        else f"peak RSS {peak_rss_mib():.0f} MiB, {rss_before:.0f} MiB before the first call"
    )
    line(
        "audio_features",
        f"{args.batch / t_all:.2f} clips/s, real-time factor {audio_s / t_all:.1f} "
        f"(best {audio_s / best_all:.1f}) audio-s per wall-s; {t_all * 1e3:.0f} ms per batch",
    )
    line("memory", mem)

    # 2. Frontend: ours vs nnAudio (the official frontend) on the same batch.
    fe = LogMelSpectrogram(model.cfg.frontend).to(device)
    fns = {"ours": lambda: fe(waves)}
    try:
        from nnAudio.features import MelSpectrogram
    except ImportError:
        ref = None
    else:
        c: FrontendCfg = model.cfg.frontend
        ref = MelSpectrogram(
            sr=c.sample_rate,
            n_fft=c.n_fft,
            win_length=c.win_length,
            hop_length=c.hop_length,
            n_mels=c.n_mels,
            fmin=c.f_min,
            fmax=c.f_max,
            center=True,
            power=2,
            verbose=False,
        ).to(device)
        eps = torch.finfo().eps
        fns["nnAudio"] = lambda: (ref(waves) + eps).log()
    with torch.no_grad():
        t = timed(fns, R * 4, W, sync)  # milliseconds each: cheap to repeat more
    for name, label in (("ours", "LogMelSpectrogram"), ("nnAudio", "nnAudio (official)")):
        if name in t:
            line(
                f"frontend {label}",
                f"{audio_s / t[name][0]:.0f} audio-s/s (best {audio_s / t[name][1]:.0f}); "
                f"{t[name][0] * 1e3:.2f} ms per batch",
            )
    if ref is None:
        line("frontend nnAudio", "not installed (pip install nnAudio): no ratio")
    else:
        with torch.no_grad():
            diff = (fns["nnAudio"]() - fe(waves)).abs().max().item()
        line(
            "frontend speed-up",
            f"{t['nnAudio'][0] / t['ours'][0]:.2f}x nnAudio "
            f"(best-run ratio {t['nnAudio'][1] / t['ours'][1]:.2f}; target >= 1.3); max |log-mel diff| {diff:.2e}",
        )

    # 3. Encoder alone on the normalised log-mel, against this machine's GEMM and the chunk loops.
    with torch.no_grad():
        lms = model.log_mel(waves)  # (B, 1, F, T)
    chunks = chunk_frames(model.cfg.encoder, lms.shape[-1])
    flops = args.batch * sum(vit_chunk_flops(model.cfg.encoder, f) for f in chunks)
    line("encoder input", f"{lms.shape[-1]} frames -> chunks of {chunks} frames; {flops / 1e9:.1f} GFLOP per batch")
    mm32, mm_flops = square_matmul(device, torch.float32)
    fns = {"fp32 matmul": mm32}
    if amp:
        fns["bf16 matmul"] = square_matmul(device, torch.bfloat16)[0]
    fns["batched"] = lambda: model.encoder.encode_lms(lms)
    fns["loop"] = lambda: official_chunk_loop(model, lms)
    if not args.no_per_clip:
        fns["per clip"] = lambda: per_clip_chunk_loop(model, lms)
    with torch.no_grad(), autocast():
        t = timed(fns, R, W, sync)
    rate = {
        k: (f / t[k][0] / 1e9, f / t[k][1] / 1e9) for k, f in [(k, mm_flops if "matmul" in k else flops) for k in t]
    }  # GFLOP/s (median, best)
    for k in ("fp32 matmul", "bf16 matmul"):
        if k in rate:
            line(f"{k} 4096x4096", f"{rate[k][0]:.1f} GFLOP/s (best {rate[k][1]:.1f})")
    ref_name = "bf16 matmul" if amp else "fp32 matmul"
    enc = rate["batched"]
    line("encoder encode_lms", f"{enc[0]:.1f} GFLOP/s (best {enc[1]:.1f}); {t['batched'][0] * 1e3:.0f} ms per batch")
    line(
        "encoder / matmul",
        f"{enc[0] / rate[ref_name][0]:.2f} of {ref_name} (best-run ratio "
        f"{enc[1] / rate[ref_name][1]:.2f}; target >= 0.8)",
    )
    if amp:
        line("encoder / fp32 matmul", f"{enc[0] / rate['fp32 matmul'][0]:.2f}")
    for k, label in (("loop", "chunk loop (official)"), ("per clip", "one clip, one chunk")):
        if k in t:
            speedup, best_speedup = t[k][0] / t["batched"][0], t[k][1] / t["batched"][1]
            line(
                f"baseline {label}",
                f"{rate[k][0]:.1f} GFLOP/s (best {rate[k][1]:.1f}); {t[k][0] * 1e3:.0f} ms per "
                f"batch; time / encode_lms time = {speedup:.2f} (best-run {best_speedup:.2f})",
            )
    if not cuda:
        line("peak RSS after all runs", f"{peak_rss_mib():.0f} MiB (includes the 4096x4096 matrices)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="base", help="architecture preset (m2dclap.list_models())")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--batch", type=int, default=4, help="clips per batch")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length in seconds")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    ap.add_argument("--no-per-clip", action="store_true", help="skip the slow batch-size-1 baseline")
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA figures even if a GPU is present")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = m2dclap.M2DCLAP(m2dclap.get_model_config(args.preset, **{"text.kind": "none"})).eval()
    print(
        f"torch {torch.__version__}; preset {args.preset}: encoder {model.cfg.encoder.input_size} chunks, "
        f"patch {model.cfg.encoder.patch_size}, D {model.cfg.encoder.embed_dim}, depth {model.cfg.encoder.depth}"
    )
    bench_device(args, model, torch.device("cpu"), amp=False)
    if torch.cuda.is_available() and not args.cpu_only:
        bench_device(args, model, torch.device("cuda"), amp=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
