"""Training-time augmentation of log-mel spectrograms: structured patchout, SpecAugment and mixup
(the stage-1.1 recipe of the paper, Table IV, after EVAR and the official M2D runtime)."""

from __future__ import annotations

import torch


def random_structured_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Structured patchout over a (F', T') patch grid -> (B, F', T') bool, True = dropped.

    The official recipe: n_f = floor(u * (F' * ratio + 1)) frequency rows (u ~ U[0, 1), at most F' - 1), then
    n_t = floor(T' * max(ratio + 0.5 / T' - n_f / F', 0)) time columns, so rows and columns together drop about
    ``ratio`` of the patches. The counts are drawn once per batch (the kept tokens must stack); which rows and
    columns are dropped is drawn per clip.
    """
    Fp, Tp = grid
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"structured mask ratio must be in [0, 1), got {ratio}")
    u = float(torch.rand((), generator=generator))
    n_f = min(Fp - 1, int((Fp * ratio + 1) * u))
    n_t = min(Tp - 1, int(Tp * max(ratio + 0.5 / Tp - n_f / Fp, 0.0)))
    rows = _choose(batch, Fp, n_f, generator)  # (B, F'), exactly n_f True per clip
    cols = _choose(batch, Tp, n_t, generator)  # (B, T'), exactly n_t True per clip
    return (rows[:, :, None] | cols[:, None, :]).to(device)


def _choose(batch: int, size: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    ranks = torch.rand(batch, size, generator=generator).argsort(1).argsort(1)  # a random permutation per row
    return ranks < n


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, F', T') dropped-patch mask -> (B, n_keep) indices of the kept tokens, in (f t) token order."""
    flat = mask.flatten(1)  # (B, F', T') -> (B, F'*T'), frequency-major like the patch tokens
    n_keep = int((~flat[0]).sum())
    return flat.to(torch.uint8).argsort(dim=1, stable=True)[:, :n_keep]


def sample_bands(
    batch: int, size: int, max_width: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpecAugment band per clip: width = floor(u * max_width) (in [0, max_width), as torchaudio's masking)
    and a start uniform over the positions where the band fits. Returns (starts, widths), each (B,)."""
    widths = (torch.rand(batch, generator=generator) * max_width).long().clamp(max=size)
    starts = (torch.rand(batch, generator=generator) * (size - widths + 1)).long().clamp(max=size - widths)
    return starts, widths


def mask_bands(x: torch.Tensor, dim: int, starts: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Set ``x[b, ..., starts[b]:starts[b] + widths[b], ...]`` along ``dim`` to 0 (the mean, after normalising)."""
    idx = torch.arange(x.shape[dim], device=x.device)
    band = (idx >= starts.to(x.device)[:, None]) & (idx < (starts + widths).to(x.device)[:, None])  # (B, size)
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = x.shape[dim]
    return x.masked_fill(band.view(shape), 0.0)


def spec_augment(
    lms: torch.Tensor, freq_mask: int, time_mask: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One frequency and one time mask per clip on a normalised log-mel (B, 1, F, T)."""
    B, _, n_mels, frames = lms.shape
    if freq_mask > 0:
        lms = mask_bands(lms, -2, *sample_bands(B, n_mels, freq_mask, generator))
    if time_mask > 0:
        lms = mask_bands(lms, -1, *sample_bands(B, frames, time_mask, generator))
    return lms


def mix(
    lms: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, log_mixup_exp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix clip b with clip perm[b] at weight lam[b]: un-normalised log-mels (B, 1, F, T), targets (B, C).

    Log-mixup-exp, log(l e^a + (1 - l) e^b), adds the mel powers, i.e. it sounds like the two clips played
    together (what mixing waveforms gives, as EVAR does for wave inputs); a linear mix of log-mels would be a
    geometric mean of powers, which no real mixture produces. Targets always mix linearly.
    """
    lam = lam.to(lms.device, torch.float32)
    w = lam.view(-1, *([1] * (lms.dim() - 1)))
    if log_mixup_exp:
        mixed = torch.logaddexp(lms + w.log(), lms[perm] + (1 - w).log())  # log 0 = -inf drops a side exactly
    else:
        mixed = w * lms + (1 - w) * lms[perm]
    return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets[perm]


def mixup(
    lms: torch.Tensor, targets: torch.Tensor, alpha: float, log_mixup_exp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """EVAR's Mixup: per-clip lam ~ Beta(alpha, alpha) and a random partner from the same batch."""
    if alpha <= 0:
        return lms, targets
    B = lms.shape[0]
    lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((B,))
    return mix(lms, targets, lam, torch.randperm(B), log_mixup_exp)
