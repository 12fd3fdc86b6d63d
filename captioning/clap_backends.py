"""CLAP audio encoders behind one small interface, so the captioner never depends on a particular CLAP.

    backend = get_backend("m2d-clap", checkpoint="path/or/name")
    emb = backend.embed_audio([wave1, wave2], sample_rate=16000)   # (B, backend.dim) float32

A new CLAP (e.g. laion-clap) is added by subclassing :class:`ClapBackend` and decorating it with
``@register_backend("laion-clap")``; nothing else changes.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch


class BackendError(ValueError):
    """An unknown backend name or a backend that cannot be built; the message lists the known names."""


class ClapBackend(abc.ABC):
    """A CLAP audio encoder: waveforms in, one float32 embedding per clip out."""

    name: str = "unset"

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Size D of the audio embedding."""

    @abc.abstractmethod
    def embed_audio(self, waves: Sequence[torch.Tensor | np.ndarray] | torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Mono waveforms (a list of (T_i,) or a (B, T) tensor) at ``sample_rate`` -> (B, D) float32 on CPU."""

    def describe(self) -> dict:
        """What to record in run metadata so a cache can tell which encoder made it."""
        return {"clap": self.name, "dim": self.dim}


_REGISTRY: dict[str, Callable[..., ClapBackend]] = {}


def register_backend(name: str) -> Callable[[Callable[..., ClapBackend]], Callable[..., ClapBackend]]:
    """Class decorator: make ``get_backend(name, ...)`` build this backend."""

    def deco(factory: Callable[..., ClapBackend]) -> Callable[..., ClapBackend]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise BackendError(f"a CLAP backend named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, **kwargs) -> ClapBackend:
    """Build the backend registered as ``name`` with ``kwargs`` (e.g. ``checkpoint=...``)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown CLAP backend {name!r}; known backends: {', '.join(list_backends())}") from None
    return factory(**kwargs)


@register_backend("m2d-clap")
class M2DClapBackend(ClapBackend):
    """The suite's M2D-CLAP, through its public API only: ``m2dclap.load(..., audio_only=True)`` and
    ``model.encode_audio``. ``checkpoint``: a saved folder, an official ``.pth`` file or a registered name."""

    name = "m2d-clap"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        normalize: bool = False,
    ):
        import m2dclap

        if checkpoint is None or str(checkpoint) == "":
            raise BackendError(
                "the m2d-clap backend needs a checkpoint (a folder, a .pth file or a name from "
                f"m2dclap.list_pretrained(): {', '.join(m2dclap.list_pretrained())})"
            )
        self.checkpoint = str(checkpoint)
        self.model = m2dclap.load(checkpoint, device=device, audio_only=True).eval()
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.embed_audio([torch.zeros(self.model.sample_rate)], self.model.sample_rate).shape[1])
        return self._dim

    @torch.no_grad()
    def embed_audio(self, waves, sample_rate: int) -> torch.Tensor:
        if isinstance(waves, (torch.Tensor, np.ndarray)) and np.ndim(waves) == 1:
            waves = [waves]
        waves = [torch.as_tensor(w, dtype=torch.float32) for w in waves]
        emb = self.model.encode_audio(
            waves, sample_rate=sample_rate, normalize=self.normalize, batch_size=self.batch_size
        )
        emb = emb.detach().float().cpu()
        self._dim = int(emb.shape[1])
        return emb

    def describe(self) -> dict:
        return {**super().describe(), "checkpoint": self.checkpoint, "normalize": self.normalize}
