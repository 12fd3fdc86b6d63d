"""EnCodec tokens for EnCLAP-style captioning.

EnCLAP uses Meta's ``encodec`` package: the causal 24 kHz model at a target bandwidth of 12 kbps, which keeps
the first 16 of its 32 residual codebooks (``n_q = 1000 * bw // (75 * 10)``), 1024 codes each, at 75 frames/s.

    codec = load_codec("pretrained")              # or a folder / a .th state-dict file, or "random" (tests)
    tokens = encode_tokens(codec, wave, 16000)    # LongTensor (16, T), T = ceil(24000 * seconds / 320)

The published weights are ``encodec_24khz-d7cc33bc.th`` from ``https://dl.fbaipublicfiles.com/encodec/v0/``;
``load_codec("pretrained")`` downloads them into the torch hub cache, and fails offline with an error that
names the file, the URL and where to put it.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from m2dclap.audio import AudioError, check_waveform, resample

CODEC_SAMPLE_RATE = 24_000
CODEC_FRAME_RATE = 75  # 24000 / hop 320
CODEC_HOP = 320
CODEBOOK_SIZE = 1024
DEFAULT_BANDWIDTH = 12.0  # kbps -> 16 codebooks
CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + CHECKPOINT_NAME


class CodecError(RuntimeError):
    """The codec cannot be loaded or used; the message says what is missing and how to get it."""


def num_codebooks(bandwidth: float = DEFAULT_BANDWIDTH) -> int:
    """Codebooks the 24 kHz model uses at ``bandwidth`` kbps (10 bits per codebook per frame at 75 Hz)."""
    return int(1000 * bandwidth // (CODEC_FRAME_RATE * 10))


def _encodec():
    try:
        import encodec
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CodecError("the 'encodec' package is not installed; run `pip install encodec`") from e
    return encodec


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def pretrained_checkpoint_path() -> Path:
    """Where ``load_codec("pretrained")`` looks for (and downloads) the published weights: the torch hub cache."""
    return _hub_dir() / CHECKPOINT_NAME


def _load_state_file(path: Path) -> dict:
    """A state dict from ``path``; checks the sha256 prefix when the name carries it (as published)."""
    stem = path.stem
    if "-" in stem:
        expected = stem.rsplit("-", 1)[1]
        if all(c in "0123456789abcdef" for c in expected) and len(expected) >= 8:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if not h.hexdigest().startswith(expected):
                raise CodecError(
                    f"{path}: checksum mismatch (sha256 does not start with {expected}); "
                    f"the file is corrupt or incomplete: download {CHECKPOINT_URL} again"
                )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CodecError(f"{path}: cannot read the EnCodec state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CodecError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _random_codec(model, seed: int) -> None:
    """Give the (unpretrained) model random but usable codebooks.

    ``encodec_model_24khz(pretrained=False)`` builds codebooks of zeros awaiting k-means, so every code would
    be 0. Like a k-means initialisation, each codebook is drawn (seeded) from the residual vectors that the
    random encoder produces on probe signals, so tests see varied codes in [0, 1024).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # probe signals: noise and tones at several loudnesses, so the codebooks cover the encoder's range
        n = CODEC_SAMPLE_RATE // 8
        t = torch.arange(n) / CODEC_SAMPLE_RATE
        probes = []
        for k, amp in enumerate((0.01, 0.05, 0.2, 0.6)):
            freq = 110.0 * 2 ** (k + torch.rand(1, generator=g).item() * 2)
            probes.append(amp * torch.randn(n, generator=g))
            probes.append(amp * torch.sin(2 * math.pi * freq * t) + 0.1 * amp * torch.randn(n, generator=g))
        emb = model.encoder(torch.stack(probes)[:, None])  # (P, D, T)
        residual = emb.transpose(1, 2).reshape(-1, emb.shape[1])  # (N, D)
        for layer in model.quantizer.vq.layers:
            cb = layer._codebook
            size = cb.embed.shape[0]
            pick = torch.randint(0, residual.shape[0], (size,), generator=g)
            jitter = torch.randn(cb.embed.shape, generator=g) * 0.5 * residual.std(dim=0, keepdim=True)
            embed = residual[pick] + jitter
            cb.embed.copy_(embed)
            cb.embed_avg.copy_(embed)
            cb.cluster_size.fill_(1.0)
            cb.inited.fill_(1.0)
            residual = residual - cb.dequantize(cb.quantize(residual))  # later codebooks see the residual


def load_codec(
    source: str | Path = "pretrained",
    bandwidth: float = DEFAULT_BANDWIDTH,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """The EnCodec 24 kHz model, in eval mode, set to ``bandwidth`` kbps.

    ``source``: ``"pretrained"`` (the published weights, downloaded into the torch hub cache if absent),
    a folder holding ``encodec_24khz-d7cc33bc.th``, a state-dict file, or ``"random"`` (the same architecture
    with seeded random weights, for tests; its tokens mean nothing).
    """
    encodec = _encodec()
    EncodecModel = encodec.EncodecModel
    src = str(source)
    if src == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = EncodecModel.encodec_model_24khz(pretrained=False)
        _random_codec(model, seed)
    else:
        model = EncodecModel.encodec_model_24khz(pretrained=False)
        if src == "pretrained":
            cached = pretrained_checkpoint_path()
            if cached.is_file():
                state = _load_state_file(cached)
            else:
                try:
                    state = torch.hub.load_state_dict_from_url(CHECKPOINT_URL, map_location="cpu", check_hash=True)
                except Exception as e:
                    raise CodecError(
                        f"cannot download the EnCodec 24 kHz weights ({type(e).__name__}: {e}). "
                        f"Download {CHECKPOINT_URL} on a machine with internet access and either put it at "
                        f"{cached} or pass its folder/file as the codec source (--codec PATH)"
                    ) from None
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                path = path / CHECKPOINT_NAME
            if not path.is_file():
                raise CodecError(
                    f"{path}: no such EnCodec checkpoint; download {CHECKPOINT_URL} and put it "
                    f"there (or pass 'pretrained' to download it, or 'random' for tests)"
                )
            state = _load_state_file(path)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CodecError(f"{source}: not an EnCodec 24 kHz state dict ({str(e).splitlines()[0]})") from None
        model.name = "encodec_24khz"
    model.set_target_bandwidth(float(bandwidth))
    return model.eval().to(device)


def _prepare(wave: torch.Tensor | np.ndarray, sample_rate: int, where: str) -> torch.Tensor:
    """Any (T,) or (C, T) waveform -> mono float32 (T,) at 24 kHz."""
    w = torch.as_tensor(wave, dtype=torch.float32)
    if w.dim() == 2:
        w = w.mean(dim=0)
    if w.dim() != 1:
        raise AudioError(f"{where}: expected a (T,) or (channels, T) waveform, got shape {tuple(w.shape)}")
    check_waveform(w, where)
    return resample(w, int(sample_rate), CODEC_SAMPLE_RATE)


@torch.no_grad()
def encode_batch(
    codec, waves: Sequence[torch.Tensor | np.ndarray], sample_rate: int, batch_size: int = 16
) -> list[torch.Tensor]:
    """Tokens (K, T_i) for each waveform; clips of the same length (after resampling) run as one batch.

    Clips of different lengths are not zero-padded into one batch: the last, partial frame would then
    see the padding, so the tokens would depend on the batch. Grouping by length keeps results identical
    to encoding each clip alone.
    """
    device = next(codec.parameters()).device
    prepared = [_prepare(w, sample_rate, f"audio item {i}") for i, w in enumerate(waves)]
    out: list[torch.Tensor | None] = [None] * len(prepared)
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(prepared):
        by_len.setdefault(w.shape[0], []).append(i)
    for idx in by_len.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            x = torch.stack([prepared[i] for i in chunk])[:, None, :].to(device)  # (B, 1, T)
            frames = codec.encode(x)  # list of (codes (B, K, T'), scale)
            codes = torch.cat([c for c, _ in frames], dim=-1).long().cpu()
            for j, i in enumerate(chunk):
                out[i] = codes[j]
    return out  # type: ignore[return-value]


def encode_tokens(codec, wave: torch.Tensor | np.ndarray, sample_rate: int) -> torch.Tensor:
    """EnCodec tokens (K, T) of one waveform, int64, K = 16 at 12 kbps, T = ceil(seconds * 75)."""
    return encode_batch(codec, [wave], sample_rate)[0]


class LazyCodec:
    """Loads the codec on first use, so a resumed run with every clip cached never loads it."""

    def __init__(self, source: str, bandwidth: float, device: str):
        if str(source) not in ("pretrained", "random") and not Path(source).expanduser().exists():
            load_codec(source, bandwidth=bandwidth, device="cpu")  # raises a CodecError naming the file
        self.source, self.bandwidth, self.device, self._codec = source, bandwidth, device, None

    def get(self):
        if self._codec is None:
            self._codec = load_codec(self.source, bandwidth=self.bandwidth, device=self.device)
        return self._codec
